"""launch/compare_runs.py: variants of one recipe run as real training processes and are summarised."""
import argparse
import json
import subprocess
import sys

import pytest

from helpers import REPO, load_launch_script

TINY = ["deepspeed.zero_stage=0", "train.steps=2", "train.eval_size=4", "hybrid.enabled=false"]


def test_variant_syntax():
    parse = load_launch_script("compare_runs").parse_variant
    assert parse("fp32:deepspeed.precision=fp32, train.steps=5") == ("fp32", ["deepspeed.precision=fp32",
                                                                             "train.steps=5"])
    assert parse("as-written:") == ("as-written", [])
    assert parse("b:optim.betas=[0.9,0.95],optim.lr=1e-5") == ("b", ["optim.betas=[0.9,0.95]", "optim.lr=1e-5"])
    for bad in ("no-colon", ":a=1", "x:precision", "x:seed=3", "x:train.steps=2,output_dir=/tmp"):
        with pytest.raises(argparse.ArgumentTypeError, match="--variant"):
            parse(bad)


def test_same_seed_same_curve_and_a_changed_setting_shows(tmp_path):
    """Two unchanged variants with one seed learn identically (the comparison is fair); a variant with
    another learning rate trains differently; the summary has every variant's curve."""
    cmd = [sys.executable, "launch/compare_runs.py", "recipes/tiny/ppo-zero3.yaml", "--seeds", "3",
           "--variant", "a:", "--variant", "b:", "--variant", "slow:optim.lr=1e-6",
           "--workdir", str(tmp_path), "--plot", str(tmp_path / "curves.png"), *[f"--set={s}" for s in TINY]]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("COMPARE_JSON "))
    summary = json.loads(line.split(" ", 1)[1])["summary"]
    a, b, slow = summary["a"], summary["b"], summary["slow"]
    assert len(a["train_score_curve_mean"]) == 2 and a["seeds"] == [3]
    assert a["eval_before"] == b["eval_before"] and a["eval_after"] == b["eval_after"]
    assert a["train_score_curve_mean"] == b["train_score_curve_mean"]
    assert slow["eval_before"] == a["eval_before"]  # same seed, same untrained model
    # lr 1e-3 vs 1e-6: after one update the policies differ, so does the KL of step 2's samples (continuous)
    assert slow["kl_last"] != a["kl_last"]
    assert "eval after" in out.stdout  # the table
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failing_variant_is_reported_not_hidden(tmp_path):
    cmd = [sys.executable, "launch/compare_runs.py", "recipes/tiny/ppo-zero3.yaml", "--seeds", "1",
           "--variant", "broken:train.mini_batch_size=3", "--workdir", str(tmp_path), *[f"--set={s}" for s in TINY]]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    run = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RUN_JSON ")).split(" ", 1)[1])
    assert "exit code" in run["error"] and run["log_tail"]
