"""Kill -9 a 2-rank PPO run after a checkpoint, resume it, and get the uninterrupted run's metrics."""
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_engine.tracking import read_jsonl
from helpers import REPO, TEST_ENV, free_port, run_deepspeed

RECIPE = "recipes/tiny/ppo-zero3.yaml"
COMMON = ("deepspeed.zero_stage=0", "train.steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=2")
COMPARED = ("score/mean", "kl/mean", "loss/policy", "loss/value", "entropy", "kl/beta", "advantages/mean")


def args(tmp_path, name):
    return [RECIPE, f"--set=output_dir={tmp_path}", f"--set=name={name}", *[f"--set={o}" for o in COMMON]]


def test_kill9_and_resume_matches_uninterrupted(tmp_path):
    run_deepspeed("launch/train.py", *args(tmp_path, "full"))
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")

    # start the same run, kill -9 every process once step 2's checkpoint is complete
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/train.py", *args(tmp_path, "killed")]
    env = {**os.environ, **TEST_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = tmp_path / "killed" / "checkpoints" / "step-2" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None, "the run ended before step 2 was saved"
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "checkpoints" / "step-2" / "COMPLETE").exists()

    run_deepspeed("launch/train.py", *args(tmp_path, "killed"), "--resume=auto")
    resumed = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key, a[key], b[key])
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert ckpts == ["step-3", "step-4"]  # keep_last=2, no leftover temporary folders
