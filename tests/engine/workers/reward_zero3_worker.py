"""2-rank check of the reward model as a frozen ZeRO-3 engine (CPU, gloo), run by the deepspeed launcher.

Usage: deepspeed --num_gpus 2 reward_zero3_worker.py OUT.json
Rank 0 writes OUT.json: the reward model's total and per-rank local parameter counts, whether any full
weight was left on a rank, and its scores next to those of an unsharded copy of the same model.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from helpers import REPO
from rlhf_engine.config import derive_batch_sizes, load_recipe
from rlhf_engine.distributed import init_distributed, unwrap
from rlhf_engine.models import load_scalar_model, load_tokenizer
from rlhf_engine.rewards import build_reward

OVERRIDES = ["deepspeed.zero_stage=3", "reward.type=model", "reward.kwargs={}", "reward.model.name_or_path=tiny-llama",
             # partition every tensor, norms included, so 'local' is exactly this rank's shard
             "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi", "A reward model reads this sentence.", "Ok."]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    info = init_distributed(1)
    recipe = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", OVERRIDES)
    sizes = derive_batch_sizes(recipe, info.world_size)
    tokenizer = load_tokenizer(recipe.model)
    reward = build_reward(recipe.reward, policy_tokenizer=tokenizer, device=info.device, frozen=(recipe, sizes))
    params = list(unwrap(reward.model).parameters())
    total = sum(p.ds_numel for p in params)
    local = torch.tensor([sum(p.ds_tensor.numel() for p in params)])
    whole_left = torch.tensor([sum(p.data.numel() for p in params)])  # gathered data outside a forward
    locals_ = [torch.zeros_like(local) for _ in range(info.world_size)]
    dist.all_gather(locals_, local)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    sharded = reward.score_tokens(batch["input_ids"], batch["attention_mask"])
    offload = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", OVERRIDES + ["deepspeed.frozen_offload_params=true"])
    offloaded = build_reward(offload.reward, policy_tokenizer=tokenizer, device=info.device, frozen=(offload, sizes))
    offload_cfg = unwrap(offloaded.model).parameters().__next__().ds_tensor.device.type
    offloaded_scores = offloaded.score_tokens(batch["input_ids"], batch["attention_mask"])
    if info.is_main:
        plain = load_scalar_model(recipe.reward.model, init_head_seed=0).eval()
        with torch.no_grad():
            unsharded = plain.scores(batch["input_ids"], batch["attention_mask"]).float()
        with open(args.out, "w") as fh:
            json.dump({"total": total, "local": [int(t) for t in locals_], "whole_left": int(whole_left),
                       "is_engine": type(reward.model).__name__, "sharded": sharded.tolist(),
                       "unsharded": unsharded.tolist(), "offloaded": offloaded_scores.tolist(),
                       "offload_param": offloaded.model.zero_offload_param() is not None,
                       "offload_device": offload_cfg}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
