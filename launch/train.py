"""The script the deepspeed launcher runs on every rank.

    deepspeed --num_gpus 2 launch/train.py recipes/tiny/ppo-zero3.yaml --set train.steps=2
    deepspeed --hostfile launch/hostfile --num_nodes 2 --num_gpus 8 launch/train.py recipes/gpu/llama3-70b-ppo.yaml

Single process: `rlhf-engine train RECIPE` (or `--nproc N` to start this launcher for you).
"""
import sys

from rlhf_engine.worker import main

if __name__ == "__main__":
    sys.exit(main())
