"""2-rank ZeRO-3 checks of engine/distributed.py, run by the deepspeed launcher (CPU, gloo).

Usage: deepspeed --num_gpus 2 zero3_step.py WORKDIR      (ZeRO-3 checks on 2 ranks)
       python zero3_step.py WORKDIR --single               (no launcher: world of 1, ZeRO-0 bf16 checks)
Prints one line per check: `RESULT {"check": ..., "rank": ..., "seconds": ...}`; tests/engine/test_distributed.py
asserts on them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlhf_engine.config import Recipe, derive_batch_sizes
from rlhf_engine.distributed import (all_reduce_mean, barrier, broadcast_object, create_frozen_engine,
                                create_train_engine, ds_config, gather_full_state_dict, init_distributed, is_zero3,
                                zero_init_context)

VOCAB, SEQ, GLOBAL_BATCH = 1000, 16, 8
START = time.time()


def report(check: str, **values) -> None:
    seconds = round(time.time() - START, 1)
    line = "RESULT " + json.dumps({"check": check, "rank": dist.get_rank(), "seconds": seconds, **values})
    sys.stdout.write(line + "\n")  # one write: both ranks share the launcher's pipe, keep lines whole
    sys.stdout.flush()


def make_recipe(micro: int, precision: str = "fp32", zero_stage: int = 3) -> Recipe:
    # eps 1e-3 keeps Adam's first update a smooth function of the gradient, so float summation
    # order (accumulated vs one big micro-batch) can't flip the sign of near-zero updates
    return Recipe.model_validate(dict(
        name="zero3-test", stage="sft", model={"name_or_path": "tiny"}, data={"path": "unused.jsonl"},
        train={"steps": 4, "mini_batch_size": GLOBAL_BATCH, "micro_batch_size": micro},
        deepspeed={"zero_stage": zero_stage, "precision": precision, "gradient_clipping": 1.0},
        optim={"lr": 1e-2, "eps": 1e-3}))


def save_tiny_model(folder: Path) -> None:
    """Rank 0 writes a seeded 2-layer, 64-wide Llama; every rank then loads the same weights."""
    if dist.get_rank() == 0:
        torch.manual_seed(1234)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(folder)
    barrier()


def load(folder: Path, ds_cfg: dict) -> torch.nn.Module:
    with zero_init_context(ds_cfg):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def shard_checks(engine, name: str) -> None:
    """Each rank holds a different slice of `name`; the slices concatenate to the full parameter."""
    param = dict(engine.module.named_parameters())[name]
    shard = param.ds_tensor.detach().float().flatten()
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, shard)
    with deepspeed.zero.GatheredParameters([param]):
        full = param.detach().float().flatten().clone()
    joined = torch.cat(shards)[: full.numel()]
    report("shards", param=name, full_numel=full.numel(), shard_numel=shard.numel(),
           local_numel=param.numel(), shard_sums=[float(s.sum()) for s in shards],
           shards_differ=not torch.equal(shards[0], shards[1]) if len(shards) > 1 else None,
           joined_equals_full=bool(torch.equal(joined, full)))


def train_steps(engine, batch: torch.Tensor, micro: int, steps: int, watch: str):
    """Run `steps` optimizer steps over this rank's rows of `batch`; returns per-step global mean losses.

    Also records whether `watch`'s local shard changed after each micro-batch (only boundaries may)."""
    param = dict(engine.module.named_parameters())[watch]
    losses, changed_mid, changed_at_boundary = [], [], []
    for _ in range(steps):
        step_losses = []
        for start in range(0, batch.shape[0], micro):
            before = param.ds_tensor.detach().clone()
            ids = batch[start:start + micro]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            changed = not torch.equal(before, param.ds_tensor)
            (changed_at_boundary if boundary else changed_mid).append(changed)
            step_losses.append(loss.detach())
        losses.append(float(all_reduce_mean(torch.stack(step_losses).mean())))
    return losses, changed_mid, changed_at_boundary


def single_process_checks(folder: Path) -> None:
    """World of one, ZeRO-0 bf16: the engine casts to bf16, steps only at the accumulation boundary."""
    recipe = make_recipe(micro=2, precision="bf16", zero_stage=0)
    sizes = derive_batch_sizes(recipe, 1)
    batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    engine = create_train_engine(AutoModelForCausalLM.from_pretrained(folder), recipe, sizes, total_steps=4)
    initial = gather_full_state_dict(engine)
    losses = []
    for _ in range(2):
        for start in range(0, GLOBAL_BATCH, sizes.micro_batch_size):
            ids = batch[start:start + sizes.micro_batch_size]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
    final = gather_full_state_dict(engine)
    frozen = create_frozen_engine(AutoModelForCausalLM.from_pretrained(folder), recipe, sizes)
    report("single", accumulation=sizes.gradient_accumulation_steps, global_steps=engine.global_steps,
           micro_losses=losses, param_dtype=str(next(engine.module.parameters()).dtype),
           optimizer=type(engine.optimizer).__name__, master_dtype=str(engine.optimizer.fp32_groups[0][0].dtype),
           is_zero3=is_zero3(engine),
           changed=any(not torch.equal(initial[k], final[k]) for k in initial),
           frozen_type=type(frozen).__name__, frozen_dtype=str(next(frozen.parameters()).dtype),
           frozen_training=frozen.training, frozen_requires_grad=any(p.requires_grad for p in frozen.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--single", action="store_true", help="run the single-process checks")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    info = init_distributed()
    report("dist", world_size=info.world_size, local_rank=info.local_rank, device=str(info.device),
           is_main=info.is_main, threads=torch.get_num_threads(),
           broadcast=broadcast_object({"from": info.rank}),
           mean=float(all_reduce_mean(torch.tensor(float(info.rank)))))
    folder = Path(args.workdir) / "tiny-llama"
    save_tiny_model(folder)
    if args.single:
        return single_process_checks(folder)

    world, rank = info.world_size, info.rank
    generator = torch.Generator().manual_seed(7)
    global_batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator)
    local = global_batch.view(world, GLOBAL_BATCH // world, SEQ)[rank]  # same global batch, split by rank

    # --- A: micro-batch 2 x accumulation 2 (on 2 ranks) -----------------------------------------
    recipe_a = make_recipe(micro=2)
    sizes_a = derive_batch_sizes(recipe_a, world)
    engine_a = create_train_engine(load(folder, ds_config(recipe_a, sizes_a)), recipe_a, sizes_a, total_steps=4)
    initial = gather_full_state_dict(engine_a)
    shard_checks(engine_a, "model.embed_tokens.weight")
    loss_a1, mid, boundary = train_steps(engine_a, local, sizes_a.micro_batch_size, 1, "model.layers.0.mlp.up_proj.weight")
    after_a1 = gather_full_state_dict(engine_a)
    more_losses, mid2, boundary2 = train_steps(engine_a, local, sizes_a.micro_batch_size, 3,
                                               "model.layers.0.mlp.up_proj.weight")
    final = gather_full_state_dict(engine_a)
    report("train", accumulation=sizes_a.gradient_accumulation_steps, losses=loss_a1 + more_losses,
           global_steps=engine_a.global_steps, changed_mid=mid + mid2, changed_at_boundary=boundary + boundary2,
           is_zero3=is_zero3(engine_a), lr=engine_a.get_lr()[0],
           state_dict_is_none=final is None)
    if info.is_main:
        reference = {k: v for k, v in LlamaForCausalLM.from_pretrained(folder).state_dict().items()}
        report("gather", keys_match=sorted(initial) == sorted(reference),
               initial_equals_saved=all(torch.equal(initial[k], reference[k]) for k in reference),
               max_change=max(float((final[k] - initial[k]).abs().max()) for k in initial))

    # --- B: micro-batch 4 x accumulation 1, same start, same global batch --------------------------
    recipe_b = make_recipe(micro=4)
    sizes_b = derive_batch_sizes(recipe_b, world)
    engine_b = create_train_engine(load(folder, ds_config(recipe_b, sizes_b)), recipe_b, sizes_b, total_steps=4)
    loss_b1, _, _ = train_steps(engine_b, local, sizes_b.micro_batch_size, 1, "model.layers.0.mlp.up_proj.weight")
    after_b1 = gather_full_state_dict(engine_b)
    if info.is_main:
        delta_a = torch.cat([(after_a1[k] - initial[k]).flatten() for k in initial])
        delta_b = torch.cat([(after_b1[k] - initial[k]).flatten() for k in initial])
        report("accumulation", accumulation_b=sizes_b.gradient_accumulation_steps, loss_a=loss_a1[0],
               loss_b=loss_b1[0], max_update=float(delta_a.abs().max()),
               max_update_diff=float((delta_a - delta_b).abs().max()))
    del engine_b

    # --- frozen ZeRO-3 engine vs the unsharded model -----------------------------------------------
    recipe_f = make_recipe(micro=2)
    frozen_cfg = ds_config(recipe_f, sizes_a, trainable=False)
    frozen = create_frozen_engine(load(folder, frozen_cfg), recipe_f, sizes_a)
    plain = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits_frozen = frozen(input_ids=local).logits
        logits_plain = plain(input_ids=local).logits
    report("frozen", stage=frozen_cfg["zero_optimization"]["stage"], is_zero3=is_zero3(frozen),
           plain_is_zero3=is_zero3(plain), training=frozen.module.training,
           any_requires_grad=any(p.requires_grad for p in frozen.module.parameters()),
           optimizer=type(frozen.optimizer).__name__,
           max_logit_diff=float((logits_frozen - logits_plain).abs().max()))

    # --- bf16 ZeRO-3 training: bf16 weights, fp32 master copies -----------------------------------
    recipe_h = make_recipe(micro=2, precision="bf16")
    engine_h = create_train_engine(load(folder, ds_config(recipe_h, sizes_a)), recipe_h, sizes_a, total_steps=4)
    losses_h, _, _ = train_steps(engine_h, local, sizes_a.micro_batch_size, 3, "model.layers.0.mlp.up_proj.weight")
    master = engine_h.optimizer.fp32_partitioned_groups_flat[0]
    report("bf16", param_dtype=str(next(engine_h.module.parameters()).dtype), master_dtype=str(master.dtype),
           losses=losses_h)
    barrier()


if __name__ == "__main__":
    sys.exit(main())
