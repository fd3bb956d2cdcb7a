"""GRPO, RLOO and REINFORCE++ end to end in one launcher run (2 ranks, ZeRO-3), one after the other.

Usage: deepspeed --num_gpus 2 critic_free_worker.py WORKDIR
Each algorithm's run folder is WORKDIR/<algorithm>; its final checkpoint lists the engines built.
"""
from __future__ import annotations

import sys

import torch.distributed as dist

from rlhf_engine.config import load_recipe
from rlhf_engine.distributed import init_distributed
from rlhf_engine.trainer import train_rl
from helpers import REPO

ALGORITHMS = ("grpo", "rloo", "reinforce++")


def main(workdir: str) -> None:
    info = init_distributed(1)
    for algorithm in ALGORITHMS:
        recipe = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", [
            f"output_dir={workdir}", f"name={algorithm}", f"ppo.algorithm={algorithm}", "ppo.group_size=2",
            "deepspeed.zero_stage=3", "train.steps=2", "train.rollout_batch_size=4", "optim.lr=3e-3"])
        train_rl(recipe, info)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(next(a for a in sys.argv[1:] if not a.startswith("--")))
