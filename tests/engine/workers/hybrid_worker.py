"""2-rank worker for tests/engine/test_hybrid.py: exactness of the hybrid engine round trip.

Prints lines `HYBRID {json}` (one per check group, rank 0 and 1); the test asserts on them.
Checks: ZeRO-3 (whole and layer-group modes) vs an unsharded copy, shards/optimizer/hooks/flags
restored, training after the round trip equals training without it; stage 2; LoRA on stages 3 and 0.
"""
from __future__ import annotations

import argparse
import json
import time

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from rlhf_engine.distributed import init_distributed
from rlhf_engine.hybrid import HybridEngine, original_linear

NEW_TOKENS = 16


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def ds_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # partition every weight of the tiny model (the default keeps small ones whole)
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def build_model(stage: int, seed: int = 0):
    """Tiny Llama; for stage 3 built partitioned (zero.Init through HfDeepSpeedConfig)."""
    torch.manual_seed(seed)
    if stage == 3:
        keep = HfDeepSpeedConfig(ds_config(3))  # noqa: F841  (alive while constructing)
    model = AutoModelForCausalLM.from_config(tiny_config())
    unset_hf_deepspeed_config()
    model.generation_config.pad_token_id = 0
    return model


def initialize(model, stage: int):
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2),
                                      config=ds_config(stage))
    return engine


def full_state(module) -> dict:
    """Full (unsharded) copy of every parameter, on every rank."""
    params = list(module.parameters())
    with GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def plain_copy(state: dict, lora: LoraConfig | None = None):
    """An unsharded model with the given weights (LoRA: merged into the base, then unloaded)."""
    model = build_model(stage=0, seed=123)
    if lora is not None:
        model = get_peft_model(model, lora)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    model = model.merge_and_unload() if lora is not None else model
    return model.eval()


def prompts(rank: int):
    """Left-padded prompts [3, 7] that differ per rank (so ranks may finish at different steps)."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(3, 1000, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 4]):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def greedy(model, ids, mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)


def shards(module) -> list:
    return [p.ds_tensor.detach().clone() if hasattr(p, "ds_tensor") else p.detach().clone()
            for p in module.parameters()]


def optimizer_tensors(engine) -> list:
    """Optimizer state and the master weights it steps (fp32 partitions for ZeRO)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out = [t.detach().clone() for st in inner.state.values() for t in st.values() if torch.is_tensor(t)]
    return out + [p.detach().clone() for g in inner.param_groups for p in g["params"]]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def hook_ids(module) -> list:
    return [(tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for m in module.modules()]


def deepspeed_hooks(module) -> int:
    """Forward hooks defined by DeepSpeed code (ZeRO-3 fetch/release, engine bookkeeping)."""
    hooks = [h for m in module.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values()]
    return sum(getattr(h, "__module__", "").startswith("deepspeed") for h in hooks)


def train_step(engine, batch) -> float:
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def check_round_trip(engine, ids, mask, reference, **hybrid_kw) -> dict:
    """Generate inside the hybrid engine; compare with `reference`; check what must be restored."""
    module = engine.module
    before = dict(shards=shards(module), optim=optimizer_tensors(engine), hooks=hook_ids(module),
                  training=[m.training for m in module.modules()], ckpt=module.is_activation_checkpointing,
                  use_cache=module.config.use_cache, attn=module.config._attn_implementation,
                  data=[(p.data_ptr(), p.dtype) for p in module.parameters()])
    with original_linear():  # the reference runs as it would in a process without ZeRO-3
        ref_out, ref_logits = greedy(reference, ids, mask), reference(ids, attention_mask=mask).logits
    hybrid = HybridEngine(engine, **hybrid_kw)
    with hybrid.inference() as model:
        inside = dict(training=model.training, ckpt=model.is_activation_checkpointing,
                      use_cache=model.config.use_cache,
                      hooks=sum(len(a) + len(b) for a, b in hook_ids(module)),
                      deepspeed_hooks=deepspeed_hooks(module), attn=model.config._attn_implementation,
                      dtypes=sorted({str(p.dtype) for p in model.parameters() if p.numel()}))
        out = greedy(model, ids, mask)
        logits = model(ids, attention_mask=mask).logits
    return dict(
        tokens_equal=torch.equal(out, ref_out), logits_equal=torch.equal(logits, ref_logits),
        new_tokens=out.shape[1] - ids.shape[1], inside=inside,
        hooks_before=sum(len(a) + len(b) for a, b in before["hooks"]), deepspeed_hooks_after=deepspeed_hooks(module),
        shards_same=same(before["shards"], shards(module)), optim_same=same(before["optim"], optimizer_tensors(engine)),
        hooks_same=before["hooks"] == hook_ids(module),
        training_same=before["training"] == [m.training for m in module.modules()],
        ckpt_restored=module.is_activation_checkpointing == before["ckpt"],
        use_cache_restored=module.config.use_cache == before["use_cache"],
        attn_restored=module.config._attn_implementation == before["attn"],
        same_tensors=before["data"] == [(p.data_ptr(), p.dtype) for p in module.parameters()]
        if not any(hasattr(p, "ds_id") for p in module.parameters()) else True,
        adapters_unmerged=not any(getattr(m, "merged", False) for m in module.modules()),
        timings=hybrid.last_timings)


def stage3_checks(rank: int, ids, mask, emit) -> None:
    model_a, model_b = build_model(3), build_model(3, seed=1)
    with GatheredParameters(list(model_a.parameters())), \
            GatheredParameters(list(model_b.parameters()), modifier_rank=0):
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            pb.data.copy_(pa.data)  # B: same weights, trained without any hybrid round trip
    for m in (model_a, model_b):
        m.activation_checkpointing_enable()
        m.config.use_cache = False
    engine_a, engine_b = initialize(model_a, 3), initialize(model_b, 3)
    batch = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(rank))
    losses_a, losses_b = [train_step(engine_a, batch)], [train_step(engine_b, batch)]

    reference = plain_copy(full_state(engine_a.module))
    emit("zero3_whole", check_round_trip(engine_a, ids, mask, reference))
    emit("zero3_groups", check_round_trip(engine_a, ids, mask, reference, layers_per_group=1))

    # training continues exactly as without the round trips
    for _ in range(2):
        losses_a.append(train_step(engine_a, batch))
        losses_b.append(train_step(engine_b, batch))
    emit("zero3_training", dict(losses_a=losses_a, losses_b=losses_b,
                                shards_equal=same(shards(engine_a.module), shards(engine_b.module)),
                                optim_equal=same(optimizer_tensors(engine_a), optimizer_tensors(engine_b))))

    # speed and the cost of the round trip itself (tiny model: indicative only)
    hybrid, sharded = HybridEngine(engine_a), HybridEngine(engine_a, enabled=False)
    with hybrid.inference():
        pass
    empty = hybrid.last_timings
    t0 = time.perf_counter()
    with sharded.inference() as model:
        greedy(model, ids, mask)
    t_sharded = time.perf_counter() - t0
    t0 = time.perf_counter()
    with hybrid.inference() as model:
        greedy(model, ids, mask)
    t_hybrid = time.perf_counter() - t0
    emit("zero3_speed", dict(empty_round_trip=empty, sharded_s=t_sharded, hybrid_s=t_hybrid))


def lora_checks(stage: int, ids, mask, emit, dtype=None) -> None:
    """LoRA adapters merged for generation (into gathered or real weights, or, with `dtype`, into
    the cast copies): the same as a merged plain copy, and everything restored after."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)  # random B: the adapters change the outputs
    torch.manual_seed(7)
    model = get_peft_model(build_model(stage), lora)
    engine = initialize(model, stage)
    state = full_state(engine.module)
    base_reference = plain_copy({k.removeprefix("base_model.model.").replace(".base_layer", ""): v
                                 for k, v in state.items() if "lora_" not in k})
    if dtype is None:
        reference = plain_copy(state, lora)
        result = check_round_trip(engine, ids, mask, reference)
    else:  # adapters and base cast first, then merged: what the hybrid engine computes
        reference = get_peft_model(build_model(stage=0, seed=123), lora)
        reference.load_state_dict(state, strict=False)
        for p in reference.parameters():  # parameters only: buffers (rotary inv_freq) stay fp32
            p.data = p.data.to(dtype)
        reference = reference.merge_and_unload().eval()
        reference.set_attn_implementation("eager")
        result = check_round_trip(engine, ids, mask, reference, dtype=dtype, attn_implementation="eager")
    result["adapters_matter"] = not torch.equal(greedy(base_reference, ids, mask), greedy(reference, ids, mask))
    emit(f"{'cast_' if dtype else ''}lora_stage{stage}", result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.parse_args()
    torch.set_num_threads(1)
    init_distributed(num_threads=1)  # ours: also unlinks the CPU shm buffers DeepSpeed leaks
    rank = torch.distributed.get_rank()
    ids, mask = prompts(rank)

    def emit(name, payload):
        print("HYBRID " + json.dumps({"rank": rank, "check": name, **payload}), flush=True)

    stage3_checks(rank, ids, mask, emit)
    engine2 = initialize(build_model(2), 2)
    train_step(engine2, torch.randint(3, 1000, (2, 12)))
    emit("stage2", check_round_trip(engine2, ids, mask, plain_copy(full_state(engine2.module))))
    # generation in bf16 with another attention kernel: same as a bf16 copy; fp32 weights come back
    for stage, engine in (("3", initialize(build_model(3), 3)), ("0", initialize(build_model(0), 0))):
        reference = plain_copy(full_state(engine.module))
        for p in reference.parameters():  # parameters only: buffers (rotary inv_freq) stay fp32
            p.data = p.data.to(torch.bfloat16)
        reference.set_attn_implementation("eager")
        emit(f"cast_stage{stage}", check_round_trip(engine, ids, mask, reference, dtype=torch.bfloat16,
                                                    attn_implementation="eager"))
    lora_checks(3, ids, mask, emit)
    lora_checks(0, ids, mask, emit)
    lora_checks(0, ids, mask, emit, dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
