"""Every RL algorithm and option of the one loop, end to end on 2 ranks (one launcher run for all):
DAPO's options with TIS at ZeRO-3, GSPO + Dr.GRPO on generation log-probs, A2C, NLPO (ZeRO-3) and
TRPO (ZeRO-0). The train-inference mismatch of our exact path stays at 1 (fp32, ZeRO-3)."""
import math

import pytest

from rlhf_engine.config import RecipeError, load_recipe
from rlhf_engine.tracking import read_jsonl
from helpers import REPO, run_deepspeed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("algos")
    run_deepspeed("tests/engine/workers/algos_worker.py", str(out))
    return {name.name: read_jsonl(name / "metrics.jsonl") for name in out.iterdir() if (name / "metrics.jsonl").exists()}


def finite(m, *keys):
    for k in keys:
        assert m.get(k) is not None and math.isfinite(m[k]), (k, m)


def test_every_algorithm_ran_two_finite_steps(runs):
    assert set(runs) == {"dapo_tis", "gspo_generation", "a2c", "nlpo", "trpo"}
    for name, metrics in runs.items():
        assert [m["step"] for m in metrics] == [1, 2], name
        for m in metrics:
            finite(m, "loss/policy", "score/mean", "kl/mean", "mismatch/exp_abs_mean")


def test_exact_path_mismatch_at_zero3_and_tis(runs):
    for m in runs["dapo_tis"]:
        assert 1.0 <= m["mismatch/exp_abs_mean"] <= 1.0001, m  # NeMo-RL's check passes at <= 1.05
        assert m["mismatch/abs_max"] < 1e-3 and m["mismatch/frac_over"] == 0.0
        assert m["is/weight_mean"] == pytest.approx(1.0, abs=1e-3) and m["is/corrected_frac"] == 0.0
    # generation log-probs as the old ones: measured on the first mini-batch before the policy moves
    for m in runs["gspo_generation"]:
        assert 1.0 <= m["mismatch/exp_abs_mean"] <= 1.0001, m


def test_dynamic_sampling_drops_constant_groups(runs):
    metrics = runs["dapo_tis"]
    # even-length prompts score 0 whatever the reply: their groups must have been dropped
    assert sum(m["dynamic_sampling/dropped_groups"] for m in metrics) > 0
    assert all(1 <= m["dynamic_sampling/rounds"] <= 3 for m in metrics)
    assert all(m["dynamic_sampling/filled_groups"] <= m["dynamic_sampling/dropped_groups"] for m in metrics)


def test_critic_algorithms(runs):
    for name in ("a2c", "nlpo", "trpo"):
        for m in runs[name]:
            finite(m, "loss/value")
    assert any(m["trpo/step_fraction"] > 0 for m in runs["trpo"])  # a step inside the trust region was taken
    assert "policy/clipfrac" not in runs["a2c"][0]  # plain policy gradient: nothing is clipped
    # NLPO's policy is renormalised over the mask model's top-p tokens: away from the (unmasked) reference
    assert runs["nlpo"][0]["kl/mean"] > 0.1


def test_recipe_errors_name_the_key(tmp_path):
    recipe = REPO / "recipes/tiny/ppo-zero3.yaml"
    with pytest.raises(RecipeError, match="old_logprobs: recompute"):
        load_recipe(recipe, ["ppo.rollout_correction=tis", "ppo.old_logprobs=generation"])
    with pytest.raises(RecipeError, match="ppo_epochs: 1"):
        load_recipe(recipe, ["ppo.algorithm=a2c", "ppo.ppo_epochs=2"])
    with pytest.raises(RecipeError, match="group_size >= 2"):
        load_recipe(recipe, ["ppo.algorithm=dr_grpo"])
    from rlhf_engine.trpo import check_trpo_supported
    with pytest.raises(ValueError, match="zero_stage: 0"):
        check_trpo_supported(load_recipe(recipe, ["ppo.algorithm=trpo"]))  # the recipe is ZeRO-3
