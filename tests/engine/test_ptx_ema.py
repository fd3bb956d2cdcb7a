"""PTX loss and the EMA actor on the tiny PPO recipe.

- ptx_coef 0 is exactly the run without PTX; ptx_coef > 0 lowers the held-out PTX loss and changes
  the update (one rank, in process).
- the EMA equals the hand-computed average of the actor's weights after each step, on 1 rank and
  on 2 ZeRO-3 ranks (stitched from the partitions), and a resumed run restores it exactly.
"""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rlhf_engine.checkpoint import export_run
from rlhf_engine.config import load_recipe
from rlhf_engine.models import load_policy
from rlhf_engine.tracking import read_jsonl
from rlhf_engine.trainer import train_rl
from helpers import REPO, run_deepspeed

RECIPE = "recipes/tiny/ppo-zero3.yaml"
PTX = (f"ptx_data.path={REPO}/recipes/data/sft.jsonl", "ptx_data.max_length=96", "ptx_data.limit=48",
       "ptx_data.eval_size=8")
EMA = ("ppo.ema_decay=0.5", "checkpoint.save_every=1", "checkpoint.keep_last=3")
COMPARED = ("score/mean", "kl/mean", "loss/policy", "loss/value", "entropy", "policy/approx_kl")


def run_in_process(tmp_path, name, *overrides):
    recipe = load_recipe(REPO / RECIPE, [f"output_dir={tmp_path}", f"name={name}", "deepspeed.zero_stage=0",
                                         "num_threads=2", *overrides])
    train_rl(recipe)
    return read_jsonl(tmp_path / name / "metrics.jsonl"), read_jsonl(tmp_path / name / "eval.jsonl")


def weights(folder) -> dict:
    return load_file(folder / "model.safetensors")


def assert_ema_is_the_average(tmp_path, run, steps: int, decay: float):
    """EMA_k = decay * EMA_{k-1} + (1 - decay) * weights after step k, from EMA_0 = the preset's weights."""
    init = {k: v.float() for k, v in load_policy(load_recipe(REPO / RECIPE).model).state_dict().items()}
    expected = dict(init)
    for step in range(1, steps + 1):
        actor = weights(export_run(run, tmp_path / f"actor-{step}", step=step))
        expected = {k: decay * expected[k] + (1 - decay) * actor[k].float() for k in actor}
    ema = weights(export_run(run, tmp_path / "ema", step=steps, ema=True))
    assert set(ema) == set(expected)
    moved = 0
    for k, v in ema.items():
        torch.testing.assert_close(v.float(), expected[k], rtol=0, atol=1e-6, msg=k)
        moved += not torch.equal(v.float(), init[k])
    assert moved > len(ema) // 2  # the average really left the initial weights


def test_ptx_coef_zero_is_the_plain_run_and_positive_ptx_trains_on_ptx_data(tmp_path, restore_env):
    plain, _ = run_in_process(tmp_path, "plain", "train.steps=1")
    zero, _ = run_in_process(tmp_path, "zero", "train.steps=1", *PTX, "ppo.ptx_coef=0")
    for key in COMPARED:
        assert zero[0][key] == plain[0][key], key
    assert "loss/ptx" not in zero[0]

    mixed, evals = run_in_process(tmp_path, "ptx", "train.steps=2", *PTX, "ppo.ptx_coef=1.0", *EMA)
    assert all(m["loss/ptx"] > 0 for m in mixed)
    assert evals[-1]["ptx/loss"] < evals[0]["ptx/loss"] - 0.05, evals  # held-out PTX rows
    assert mixed[0]["policy/approx_kl"] != pytest.approx(plain[0]["policy/approx_kl"], rel=1e-3)
    assert {"ema/score/mean", "ema/kl/mean"} <= set(evals[-1])
    assert_ema_is_the_average(tmp_path, tmp_path / "ptx", steps=2, decay=0.5)


def test_ema_under_zero3_two_ranks_and_resume_restores_it(tmp_path):
    args = [RECIPE, f"--set=output_dir={tmp_path}", "--set=deepspeed.zero_stage=3", "--set=train.steps=2",
            *[f"--set={o}" for o in PTX + EMA + ("ppo.ptx_coef=0.5",)]]
    run_deepspeed("launch/train.py", *args, "--set=name=z3")
    run = tmp_path / "z3"
    assert_ema_is_the_average(tmp_path, run, steps=2, decay=0.5)

    # resume from step 1 in a copy of the run: step 2 and its EMA come out exactly the same
    shutil.copytree(run, tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step-2")
    run_deepspeed("launch/train.py", *args, "--set=name=again", "--resume=auto")
    for rank in (0, 1):
        first = load_file(run / "checkpoints" / "step-2" / "ema" / f"rank{rank}.safetensors")
        again = load_file(tmp_path / "again" / "checkpoints" / "step-2" / "ema" / f"rank{rank}.safetensors")
        assert first.keys() == again.keys()
        for k in first:
            torch.testing.assert_close(again[k], first[k], rtol=0, atol=1e-7, msg=k)
    a, b = read_jsonl(run / "metrics.jsonl"), read_jsonl(tmp_path / "again" / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2]
    for key in COMPARED + ("loss/ptx",):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-6, abs=1e-7), key
