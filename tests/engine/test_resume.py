"""Kill -9 a 2-rank PPO run after a checkpoint, resume it, and get the uninterrupted run's metrics."""
import sys

import pytest

from rlhf_engine.tracking import read_jsonl
from helpers import free_port, kill_when, run_deepspeed

RECIPE = "recipes/tiny/ppo-zero3.yaml"
COMMON = ("deepspeed.zero_stage=0", "train.steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=2")
COMPARED = ("score/mean", "kl/mean", "loss/policy", "loss/value", "entropy", "kl/beta", "advantages/mean")


def args(tmp_path, name):
    return [RECIPE, f"--set=output_dir={tmp_path}", f"--set=name={name}", *[f"--set={o}" for o in COMMON]]


def test_kill9_and_resume_matches_uninterrupted(tmp_path):
    run_deepspeed("launch/train.py", *args(tmp_path, "full"))
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")

    # start the same run, kill -9 every process once step 2's checkpoint is complete
    # (through the `deepspeed` runner, as a user starts it: the kill takes the runner too)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/train.py", *args(tmp_path, "killed")]
    kill_when(cmd, tmp_path / "killed" / "checkpoints" / "step-2" / "COMPLETE")
    assert (tmp_path / "killed" / "checkpoints" / "step-2" / "COMPLETE").exists()

    run_deepspeed("launch/train.py", *args(tmp_path, "killed"), "--resume=auto")
    resumed = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key, a[key], b[key])
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert ckpts == ["step-3", "step-4"]  # keep_last=2, no leftover temporary folders
