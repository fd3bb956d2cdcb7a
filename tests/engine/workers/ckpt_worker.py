"""2-rank ZeRO-3 worker for tests/engine/test_checkpoint.py: save, prune, crash leftovers, exact resume.

Usage: deepspeed --num_gpus 2 ckpt_worker.py WORKDIR
Builds three trained engines on the tiny-llama preset (actor, critic = ScalarModel, lora = LoRA actor),
trains and saves steps 1-3 (keep_last=2), records reference outputs of step 3 to WORKDIR/reference.pt
(for the export tests), trains step 4, leaves a crashed save behind, then builds fresh engines, loads
the latest checkpoint and checks weights, optimizer, LR schedule, RNG and the next step are identical.
Prints `RESULT {json}` lines.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rlhf_engine.checkpoint import CheckpointManager
from rlhf_engine.config import LoraConfig, Recipe, derive_batch_sizes
from rlhf_engine.distributed import barrier, create_train_engine, ds_config, gather_full_state_dict, init_distributed, \
    zero_init_context
from rlhf_engine.models import load_policy, load_scalar_model, load_tokenizer
from rlhf_engine.tracking import Tracker, plot_metrics

SEQ = 12
START = time.time()


def report(check: str, **values) -> None:
    sys.stdout.write("RESULT " + json.dumps({"check": check, "rank": dist.get_rank(),
                                                    "seconds": round(time.time() - START, 1), **values}) + "\n")
    sys.stdout.flush()


def make_recipe(workdir: Path) -> Recipe:
    return Recipe.model_validate(dict(
        name="ckpt-run", stage="sft", output_dir=str(workdir), model={"name_or_path": "tiny-llama"},
        data={"path": "data/sft.jsonl"}, train={"steps": 4, "mini_batch_size": 4, "micro_batch_size": 2},
        deepspeed={"zero_stage": 3}, optim={"lr": 1e-2, "scheduler": "linear", "warmup_steps": 2},
        checkpoint={"keep_last": 2}))


def build_engines(recipe: Recipe, sizes) -> dict:
    """actor (causal LM), critic (ScalarModel, seq-cls inside), lora (LoRA adapters on the causal LM)."""
    cfg = ds_config(recipe, sizes)
    with zero_init_context(cfg):
        actor = load_policy(recipe.model)
        critic = load_scalar_model(recipe.model, init_head_seed=recipe.seed)
        lora = load_policy(recipe.model.model_copy(update={"lora": LoraConfig(r=4, alpha=8)}))
    return {name: create_train_engine(model, recipe, sizes, total_steps=recipe.train.steps)
            for name, model in (("actor", actor), ("critic", critic), ("lora", lora))}


def batch(step: int, rank: int, vocab: int) -> torch.Tensor:
    """This rank's [2, SEQ] token ids for `step` (ids >= 10 avoid special / pad tokens)."""
    return torch.randint(10, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1000 * step + rank))


def train_step(engines: dict, ids: torch.Tensor) -> dict:
    losses = {}
    for name, engine in engines.items():
        if name == "critic":
            loss = (engine(ids, torch.ones_like(ids)) - 1.0).pow(2).mean()
        else:
            loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses[name] = loss.item()
    return losses


def optimizer_tensors(engine) -> list:
    """This rank's optimizer state and fp32 master partitions."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out = [t.detach().clone() for st in inner.state.values() for t in st.values() if torch.is_tensor(t)]
    return out + [p.detach().clone() for g in inner.param_groups for p in g["params"]]


def snapshot(engines: dict) -> dict:
    """Everything resume must restore (full weights on rank 0 only)."""
    return {name: dict(weights=gather_full_state_dict(e), optim=optimizer_tensors(e),
                       sched=e.lr_scheduler.state_dict(), global_steps=e.global_steps, lr=e.get_lr()[0])
            for name, e in engines.items()}


def same_tensors(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def compare(a: dict, b: dict, is_main: bool) -> dict:
    return {name: dict(weights=same_tensors(a[name]["weights"], b[name]["weights"]) if is_main else None,
                       optim=same_tensors(a[name]["optim"], b[name]["optim"]),
                       optim_tensors=len(a[name]["optim"]), sched=a[name]["sched"] == b[name]["sched"],
                       global_steps=[a[name]["global_steps"], b[name]["global_steps"]],
                       lr=[a[name]["lr"], b[name]["lr"]]) for name in a}


def draws() -> list:
    return [torch.rand(3).tolist(), random.random(), float(np.random.rand())]


@torch.no_grad()
def reference_outputs(engines: dict, vocab: int) -> dict:
    """Outputs on fixed [2, SEQ] ids for the export tests (collective: ZeRO-3 gathers layers)."""
    ids = batch(99, 0, vocab)
    for e in engines.values():
        e.eval()
    out = {"input_ids": ids, "actor_logits": engines["actor"](input_ids=ids).logits.float(),
           "lora_logits": engines["lora"](input_ids=ids).logits.float(),
           "critic_scores": engines["critic"](ids, torch.ones_like(ids)).float()}
    for e in engines.values():
        e.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    info = init_distributed()
    workdir = Path(args.workdir)
    recipe = make_recipe(workdir)
    sizes = derive_batch_sizes(recipe, info.world_size)
    run_dir = workdir / recipe.name
    tracker = Tracker(recipe, run_dir, is_main=info.is_main, total_steps=4)  # writes recipe.yaml
    tokenizer = load_tokenizer(recipe.model)
    vocab = len(tokenizer)
    manager = CheckpointManager(run_dir, recipe.checkpoint.keep_last, is_main=info.is_main, tokenizer=tokenizer)
    torch.manual_seed(recipe.seed)
    engines = build_engines(recipe, sizes)

    for step in (1, 2, 3):
        losses = train_step(engines, batch(step, info.rank, vocab))
        tracker.log_metrics(step, {"loss/policy": losses["actor"], "loss/value": losses["critic"]})
        manager.save(step, engines, {"sampler": {"epoch": 0, "pos": 4 * step}, "kl": {"value": 0.05 * step}})
    tracker.log_eval(3, {"score/mean": 0.25})
    if info.is_main:
        plot_metrics(run_dir)
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    saved = snapshot(engines)
    rng_after_save = draws()
    ref = reference_outputs(engines, vocab)
    if info.is_main:
        torch.save(ref, workdir / "reference.pt")
    losses4 = train_step(engines, batch(4, info.rank, vocab))
    after4 = snapshot(engines)

    # a save that crashed half-way, and a step folder without its COMPLETE marker
    if info.is_main:
        (run_dir / "checkpoints" / ".tmp-step-4" / "engines" / "actor").mkdir(parents=True)
        (run_dir / "checkpoints" / ".tmp-step-4" / "engines" / "actor" / "partial.pt").write_bytes(b"\0" * 10)
        (run_dir / "checkpoints" / "step-5").mkdir()
    barrier()
    latest = manager.latest()
    report("saved", kept=kept, latest=latest.name if latest else None,
           auto=manager.resolve("auto").name, by_step=manager.resolve("3").name,
           files=sorted(str(p.relative_to(latest)) for p in latest.rglob("*") if p.is_file()))

    # resume: fresh engines (initial weights), scrambled RNG, then load
    fresh = build_engines(recipe, sizes)
    before_load = snapshot(fresh)
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    state = manager.load(latest, fresh)
    restored = snapshot(fresh)
    report("resume", state=state, rng_same=draws() == rng_after_save,
           differed_before=compare(saved, before_load, info.is_main)["actor"],
           restored=compare(saved, restored, info.is_main))
    losses4_resumed = train_step(fresh, batch(4, info.rank, vocab))
    report("continue", losses=losses4, losses_resumed=losses4_resumed,
           after=compare(after4, snapshot(fresh), info.is_main))

    # the next save cleans the crashed leftover and prunes to keep_last
    manager.save(4, fresh, {"sampler": {"epoch": 0, "pos": 16}, "kl": {"value": 0.2}})
    report("resaved", entries=sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
           latest=manager.latest().name)
    tracker.close()


if __name__ == "__main__":
    sys.exit(main())
