"""GRPO, RLOO and REINFORCE++ through the RL loop: 2 ranks, ZeRO-3, finite losses, the actor moves,
and no critic is built (one launcher run for the three)."""
import json
import math

import pytest

from rlhf_engine.tracking import read_jsonl
from helpers import REPO, run_deepspeed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("critic-free")
    run_deepspeed(REPO / "tests/engine/workers/critic_free_worker.py", workdir)
    return workdir


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce++"])
def test_critic_free_algorithm_trains_without_a_critic(runs, algorithm):
    workdir = runs
    engines = json.loads((workdir / algorithm / "checkpoints/step-2/checkpoint.json").read_text())["engines"]
    assert sorted(engines) == ["actor"]  # no critic was built
    metrics = read_jsonl(workdir / algorithm / "metrics.jsonl")
    evals = read_jsonl(workdir / algorithm / "eval.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert "loss/value" not in m and "returns/mean" not in m
        for key in ("loss/policy", "score/mean", "kl/mean", "entropy", "advantages/mean"):
            assert m[key] is not None and math.isfinite(m[key]), (key, m)
    assert metrics[-1]["kl/mean"] != 0.0 and abs(evals[-1]["kl/mean"]) > 1e-5  # the actor left the reference
