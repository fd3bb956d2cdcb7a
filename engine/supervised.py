"""The one supervised loop behind stages 1 and 2 (SFT and reward model).

`train_supervised(recipe, dist, task)` reads top to bottom:
1. build: tokenizer, data, model (ZeRO-3 partitioned at construction if configured), DeepSpeed engine.
2. evaluate once before training.
3. for each optimizer step: draw the global mini-batch, run this rank's micro-batches
   (forward, weighted loss, backward; DeepSpeed steps at the accumulation boundary).
4. log, evaluate every `train.eval_every` steps, and at the end; checkpoint every
   `checkpoint.save_every` steps and at the end (engine/checkpoint.py: atomic, `keep_last`, resumable
   with `--resume auto|PATH`, exportable with `rlhf-engine export`).
5. save the trained model as a Hugging Face folder `<run_dir>/final/`.

What differs between SFT and reward modelling lives in a small task object (engine/sft.py,
engine/reward_model.py): model, data, collator, loss, evaluation sums. A task counts its loss in
"units" (response tokens for SFT, pairs for the reward model); the loop weights every micro-batch so
the accumulated gradient is exactly that of the mean over all units of the global mini-batch.

Steps and epochs: `train.steps` is the budget of optimizer steps; each epoch is a fresh seeded
permutation of the training rows cut into `train.mini_batch_size` batches (the ragged tail is
dropped), and `train.epochs` caps the passes, so the run makes min(steps, epochs x steps_per_epoch)
optimizer steps.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import nn

from rlhf_engine.batching import EpochSampler, chunks
from rlhf_engine.checkpoint import CheckpointManager, prepare_run_dir
from rlhf_engine.config import Recipe, RecipeError, derive_batch_sizes
from rlhf_engine.distributed import (DistInfo, all_reduce_sum, barrier, create_train_engine, ds_config,
                                     gather_full_state_dict, init_distributed, unwrap, zero_init_context)
from rlhf_engine.models import load_tokenizer, merge_lora_state_dict
from rlhf_engine.tracking import Tracker, plot_metrics, run_dir_for


class SupervisedTask(Protocol):
    """What a supervised stage plugs into the loop (see engine/sft.py and engine/reward_model.py)."""

    stage: str  # progress label: "sft" | "reward"
    kind: str  # what save_hf_folder writes: "causal" | "scalar"

    def build_model(self, recipe: Recipe) -> nn.Module:
        """The trainable model (called inside the ZeRO-3 init context)."""

    def load_data(self, recipe: Recipe, tokenizer) -> tuple:
        """(train dataset, eval dataset or None, DataReport)."""

    def units(self, item: dict) -> int:
        """Loss units in one dataset item (response tokens, or 1 pair)."""

    def collate(self, items: list[dict]) -> dict:
        """Items -> batch of CPU tensors."""

    def loss(self, engine: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss = mean over the batch's units, {name: mean over units} detached stats)."""

    def eval_sums(self, engine: nn.Module, batch: dict) -> dict:
        """{name: scalar tensor summed over the batch}; added up over batches and ranks."""

    def eval_metrics(self, sums: dict) -> dict:
        """Global sums -> eval metrics (floats)."""


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _eval_share(ds, size: int, dist: DistInfo) -> list:
    """This rank's strided share of the first ``size`` eval rows (0 = evaluation off); equal shares on every
    rank so ZeRO-3 forwards stay in step (up to world_size - 1 rows are left out)."""
    n = min(size, len(ds))
    n -= n % dist.world_size
    return [ds[i] for i in range(dist.rank, n, dist.world_size)]


def train_supervised(recipe: Recipe, dist: Optional[DistInfo], task: SupervisedTask,
                     resume: Optional[str] = None) -> dict:
    """Train ``task`` (SFT or reward model) as the recipe says; returns a summary dict
    (eval metrics before / after, losses, timings, run folder, final model folder).

    ``resume``: "auto" (newest checkpoint of the run folder, if any) or a checkpoint path; the
    resumed run continues step for step (the batch order is a function of the step, and the
    checkpoint restores weights, optimizer, LR schedule and RNG)."""
    dist = dist or init_distributed(recipe.num_threads)
    sizes = derive_batch_sizes(recipe, dist.world_size)
    tcfg = recipe.train
    torch.manual_seed(recipe.seed)  # identical initialisation on every rank
    run_dir = run_dir_for(recipe)

    # ---- 1. build: tokenizer, data, model, engine ---------------------------------------------------
    tokenizer = load_tokenizer(recipe.model, recipe.cache_dir)
    train_ds, eval_ds, report = task.load_data(recipe, tokenizer)
    if dist.is_main:
        print(f"[data] {recipe.data.path}: {report}", flush=True)
    sampler = EpochSampler(len(train_ds), sizes.mini_batch_size, recipe.seed)
    if sampler.steps_per_epoch == 0:
        raise RecipeError(f"data: {len(train_ds)} training rows but train.mini_batch_size is "
                          f"{sizes.mini_batch_size}; add rows, lower data.eval_size or lower the batch size")
    total = min(tcfg.steps, tcfg.epochs * sampler.steps_per_epoch) if tcfg.epochs else tcfg.steps
    if dist.is_main and total < tcfg.steps:
        print(f"[train] {total} optimizer steps: train.steps={tcfg.steps} capped by train.epochs={tcfg.epochs} "
              f"x {sampler.steps_per_epoch} steps per epoch", flush=True)
    with zero_init_context(ds_config(recipe, sizes)):
        model = task.build_model(recipe)
    engine = create_train_engine(model, recipe, sizes, total_steps=total)
    resume_from = prepare_run_dir(run_dir, resume, is_main=dist.is_main)  # inputs are checked: now touch the run
    tracker = Tracker(recipe, run_dir, is_main=dist.is_main, total_steps=total)
    ckpt = CheckpointManager(run_dir, recipe.checkpoint.keep_last, is_main=dist.is_main, tokenizer=tokenizer)
    eval_on = "held-out rows" if eval_ds is not None else "training rows (no held-out split: set data.eval_size)"
    eval_items = _eval_share(eval_ds if eval_ds is not None else train_ds, tcfg.eval_size, dist)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        """Task metrics over the fixed eval rows (dropout off), summed over ranks."""
        if not eval_items:
            return {}
        engine.eval()
        sums: dict[str, torch.Tensor] = {}
        for items in chunks(eval_items, sizes.micro_batch_size):
            for k, v in task.eval_sums(engine, _to_device(task.collate(items), dist.device)).items():
                sums[k] = sums.get(k, 0.0) + v.detach().double().cpu()
        keys = sorted(sums)
        totals = all_reduce_sum(torch.stack([sums[k] for k in keys]))
        metrics = task.eval_metrics(dict(zip(keys, totals)))
        engine.train()
        tracker.log_eval(step, metrics)
        if dist.is_main:
            print(f"[eval] step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        return metrics

    # ---- 2. evaluate before training (or restore a checkpoint) ------------------------------------------
    start, losses = 1, []
    if resume_from is not None:
        state = ckpt.load(resume_from, {"model": engine})
        start, before, losses = state["step"] + 1, state["before"], state["losses"]
        tracker.drop_after(state["step"])
        if dist.is_main:
            print(f"[resume] from {resume_from} (step {state['step']})", flush=True)
    else:
        before = evaluate(0)
    engine.train()
    rank_rows = sizes.mini_batch_size // dist.world_size
    metrics: dict = {}  # stays empty when a resumed run has no step left
    t_start = time.perf_counter()
    for step in range(start, total + 1):
        t_step = time.perf_counter()
        # ---- 3. one optimizer step: this rank's share of the global mini-batch ------------------------
        global_rows = sampler.batch(step - 1)
        global_units = sum(task.units(train_ds[i]) for i in global_rows)
        mine = global_rows[dist.rank * rank_rows:(dist.rank + 1) * rank_rows]
        stat_sums: dict[str, torch.Tensor] = {}
        local_tokens = 0
        for rows in chunks(mine, sizes.micro_batch_size):
            items = [train_ds[i] for i in rows]
            units = sum(task.units(it) for it in items)
            batch = _to_device(task.collate(items), dist.device)
            loss, stats = task.loss(engine, batch)
            # DeepSpeed divides by the accumulation steps and averages over ranks; this weight turns
            # the accumulated gradient into that of the mean over the global mini-batch's units
            weight = units / max(global_units, 1) * sizes.gradient_accumulation_steps * dist.world_size
            engine.backward(loss * weight)
            engine.step()
            for k, v in {"loss": loss.detach(), **stats}.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v.detach().double().cpu() * units
            local_tokens += sum(int(v.sum()) for k, v in batch.items() if k.endswith("mask"))

        # ---- 4. log, evaluate -------------------------------------------------------------------------
        keys = sorted(stat_sums)
        totals = all_reduce_sum(torch.stack([stat_sums[k] for k in keys] + [torch.tensor(float(local_tokens))]))
        step_s = time.perf_counter() - t_step
        metrics = {f"{k}/train": float(v) / max(global_units, 1) for k, v in zip(keys, totals[:-1])}
        grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        metrics.update(lr=engine.get_lr()[0], time_step=step_s, tokens_per_s=float(totals[-1]) / step_s)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        losses.append(metrics["loss/train"])
        if not math.isfinite(metrics["loss/train"]):
            raise FloatingPointError(f"step {step}: the {task.stage} loss is {metrics['loss/train']}; lower optim.lr "
                                     "or use deepspeed.precision: fp32")
        if step % recipe.logging.log_every == 0 or step == total:
            tracker.log_metrics(step, metrics)
        tracker.progress(task.stage, step, total, f"loss {metrics['loss/train']:.4f}  lr {metrics['lr']:.2e}  "
                                                  f"{metrics['tokens_per_s']:.0f} tok/s")
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step != total:
            evaluate(step)
        every = recipe.checkpoint.save_every
        if (every and step % every == 0) or (step == total and recipe.checkpoint.save_final):
            ckpt.save(step, {"model": engine}, {"before": before, "losses": losses})

    after = evaluate(total)
    train_seconds = time.perf_counter() - t_start

    # ---- 5. save the trained model as a Hugging Face folder ---------------------------------------------
    final_dir = None
    if recipe.checkpoint.save_final:
        final_dir = save_hf_folder(engine, tokenizer, run_dir / "final", kind=task.kind)
    summary = {"stage": recipe.stage, "run_dir": str(run_dir), "steps": total, "train_seconds": train_seconds,
               "eval_before": before, "eval_after": after, "eval_on": eval_on, "eval_rows": len(eval_items) *
               dist.world_size, "loss_first": losses[0] if losses else None,
               "loss_last": losses[-1] if losses else None, "final_dir": str(final_dir) if final_dir else None}
    if dist.is_main and recipe.logging.plots:
        task_keys = [k for k in metrics if k.endswith("/train") and k != "loss/train"]  # e.g. accuracy/train
        summary["plots"] = [str(p) for p in plot_metrics(run_dir, ["loss/train", "lr", "grad_norm", *task_keys])]
    tracker.close()
    barrier()
    return summary


# --------------------------------------------------------------------------------------------
# final Hugging Face folder
def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_hf_folder(engine_or_module: nn.Module, tokenizer, out_dir, *, kind: str = "causal") -> Path:
    """Write the trained model as a standalone Hugging Face folder (config, safetensors, tokenizer with
    its chat template); returns the folder.

    Collective: every rank calls it (ZeRO-3 parameters are gathered one at a time to rank 0, which
    writes). ``kind="causal"``: an AutoModelForCausalLM folder. ``kind="scalar"``: the ScalarModel's
    ``hf_model``, an AutoModelForSequenceClassification (num_labels=1) folder that a recipe's
    ``reward.model`` / ``critic.init_from`` loads. LoRA adapters are merged, so peft is not needed to
    load it. Written aside and renamed into place: a crash never leaves half a folder.
    """
    if kind not in ("causal", "scalar"):
        raise ValueError(f"save_hf_folder: kind must be 'causal' or 'scalar', got {kind!r}")
    module = unwrap(engine_or_module)
    hf_model = module.hf_model if kind == "scalar" and hasattr(module, "hf_model") else module
    state = gather_full_state_dict(engine_or_module)  # collective; None off rank 0
    out_dir = Path(out_dir)
    if state is not None:
        if hf_model is not module:
            state = {k.removeprefix("hf_model."): v for k, v in state.items()}
        if _is_peft(hf_model):
            state = merge_lora_state_dict(state, hf_model.peft_config[hf_model.active_adapter])
            hf_model = hf_model.get_base_model()
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(tmp, state_dict=state)
        side = tokenizer.padding_side
        # scorers read plain transformers right-padded ([CLS] first for encoders); policies generate left-padded
        tokenizer.padding_side = "right" if kind == "scalar" else "left"
        try:
            tokenizer.save_pretrained(tmp)
        finally:
            tokenizer.padding_side = side
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    barrier()
    return out_dir
