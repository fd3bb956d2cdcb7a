"""2-rank checks of engine/models.py under DeepSpeed ZeRO-3 (CPU, gloo), run by the deepspeed launcher.

Usage: deepspeed --num_gpus 2 models_worker.py WORKDIR
Builds a preset into WORKDIR/cache and writes WORKDIR/rank<N>.jsonl, one `{"check": ..., ...}` per line
(files, not stdout: the launcher interleaves the ranks' output); tests/engine/test_models.py asserts on them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import transformers.integrations.deepspeed as hf_ds

from rlhf_engine.config import LoraConfig, ModelConfig
from rlhf_engine.distributed import init_distributed
from rlhf_engine.models import load_policy, load_scalar_model, load_tokenizer, resolve_model_path

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition even the head
    "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello!"]


WORKDIR = Path(".")


def report(check: str, **values) -> None:
    with open(WORKDIR / f"rank{dist.get_rank()}.jsonl", "a") as fh:
        fh.write(json.dumps({"check": check, "rank": dist.get_rank(), **values}) + "\n")


@contextlib.contextmanager
def zero3_construction():
    """What a ZeRO-3 run does around model loading: HfDeepSpeedConfig alive + zero.Init."""
    keep_alive = hf_ds.HfDeepSpeedConfig(DS_CONFIG)
    try:
        with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
            yield
    finally:
        hf_ds.unset_hf_deepspeed_config()
        del keep_alive


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    global WORKDIR
    WORKDIR = Path(args.workdir)
    race_cache = str(WORKDIR / "cache")
    torch.set_num_threads(1)
    init_distributed(num_threads=1)  # ours: also unlinks the CPU shm buffers DeepSpeed leaks

    # 1. both ranks build the same preset into an empty cache at once, inside a ZeRO-3 context
    dist.barrier()
    with zero3_construction():
        folder = resolve_model_path(ModelConfig(name_or_path="tiny-bert"), cache_dir=race_cache).path
    dist.barrier()
    report("race", folder=folder, entries=sorted(os.listdir(os.path.join(race_cache, "models"))))

    # 1b. rank 1 alone builds a preset (transformers writes nothing off rank 0 unless told to)
    solo_cache = WORKDIR / "cache_rank1"
    if dist.get_rank() == 1:
        resolve_model_path(ModelConfig(name_or_path="tiny-bert"), cache_dir=str(solo_cache))
    dist.barrier()
    report("rank1_build", files=sorted(os.listdir(solo_cache / "models" / "tiny-bert")))

    tiny = ModelConfig(name_or_path="tiny-llama")
    tokenizer = load_tokenizer(tiny)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)

    # 2. critic / reward from the causal LM, partitioned at construction, seeded head
    with zero3_construction():
        scalar = load_scalar_model(tiny, init_head_seed=7)
    params = dict(scalar.named_parameters())
    engine, *_ = deepspeed.initialize(model=scalar, config=DS_CONFIG)
    with torch.no_grad():
        scores = engine(batch["input_ids"], batch["attention_mask"])
        values = engine(batch["input_ids"], batch["attention_mask"], per_token=True)
    report("scalar", all_partitioned=all(hasattr(p, "ds_id") for p in params.values()),
           local_numels=sorted({p.numel() for p in params.values()}),
           scores=scores.tolist(), values_shape=list(values.shape), values_dtype=str(values.dtype))

    # 3. LoRA policy with gradient checkpointing: adapters start at B = 0 and train
    lora_cfg = tiny.model_copy(update={"lora": LoraConfig(r=4, alpha=8), "gradient_checkpointing": True})
    with zero3_construction():
        policy = load_policy(lora_cfg)
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    lora_b = [p for n, p in trainable if "lora_B" in n]
    with deepspeed.zero.GatheredParameters(lora_b):
        b_abs_before = max(float(p.abs().max()) for p in lora_b)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=DS_CONFIG)
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"])
    engine.backward(out.loss)
    engine.step()
    with deepspeed.zero.GatheredParameters(lora_b):
        b_abs_after = max(float(p.abs().max()) for p in lora_b)
    report("lora", trainable=[n for n, _ in trainable], lora_b_before=b_abs_before, lora_b_after=b_abs_after,
           loss=float(out.loss), gradient_checkpointing=bool(policy.get_base_model().is_activation_checkpointing))


if __name__ == "__main__":
    main()
