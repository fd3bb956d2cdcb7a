"""Several short RL runs on 2 ranks in one deepspeed launch (the launcher and imports are paid once):
each entry of RUNS is recipes/tiny/ppo-zero3.yaml with overrides. tests/engine/test_rl_algorithms.py
reads their metrics.jsonl files.

Usage: deepspeed --num_gpus 2 algos_worker.py OUTPUT_DIR
"""
import argparse

from rlhf_engine.config import load_recipe
from rlhf_engine.distributed import init_distributed
from rlhf_engine.trainer import train_rl
from helpers import REPO

COMMON = ["train.steps=2", "checkpoint.save_final=false", "train.eval_size=0", "reward.type=callable", "reward.function=algo_rewards:half_constant", "reward.kwargs={}"]
RUNS = {
    # DAPO-style options together at ZeRO-3, with TIS on the exact (recomputed) old log-probs
    "dapo_tis": ["ppo.algorithm=grpo", "ppo.group_size=2", "ppo.dynamic_sampling=true",
                 "ppo.dynamic_sampling_max_rounds=3", "ppo.cliprange_high=0.28", "ppo.loss_agg=seq-mean-token-sum",
                 "ppo.overlong_buffer=4", "ppo.kl_coef=0.0", "ppo.rollout_correction=tis"],
    # GSPO's sequence ratio against generation log-probs, Dr.GRPO advantages, MIS off (old = generation)
    "gspo_generation": ["ppo.algorithm=dr_grpo", "ppo.group_size=2", "ppo.ratio_level=sequence",
                        "ppo.loss_agg=seq-mean-token-mean", "ppo.old_logprobs=generation", "ppo.cliprange=0.01"],
    "a2c": ["ppo.algorithm=a2c", "ppo.kl_controller=adaptive"],
    "nlpo": ["ppo.algorithm=nlpo", "ppo.nlpo_top_p=0.5", "ppo.nlpo_mask_update_every=1",
             "ppo.kl_controller=adaptive"],
    "trpo": ["ppo.algorithm=trpo", "deepspeed.zero_stage=0", "train.mini_batch_size=8", "ppo.kl_controller=adaptive"],
}


def main(out_dir: str) -> None:
    dist = init_distributed()
    for name, overrides in RUNS.items():
        recipe = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml",
                             [*COMMON, *overrides, f"output_dir={out_dir}", f"name={name}"])
        train_rl(recipe, dist)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--local_rank", type=int, default=None)  # set by the deepspeed launcher
    main(parser.parse_args().out_dir)
