"""PPO end to end on the tiny model: real 2-rank runs through the deepspeed launcher on CPU.

- a few PPO steps give finite losses and move the actor away from the reference;
- ZeRO stage 0 and stage 3 give the same losses (same data, same sampling);
- micro-batch 1 x 4 accumulation steps equals micro-batch 4 x 1.
"""
import math

import pytest
from safetensors.torch import load_file

from rlhf_engine.checkpoint import export_run
from rlhf_engine.tracking import read_jsonl
from helpers import run_deepspeed

RECIPE = "recipes/tiny/ppo-zero3.yaml"
LOSSES = ("loss/policy", "loss/value", "score/mean", "kl/mean", "entropy")


def ppo_run(tmp_path, name, *overrides):
    run_deepspeed("launch/train.py", RECIPE, f"--set=output_dir={tmp_path}", f"--set=name={name}",
                  *[f"--set={o}" for o in overrides])
    return read_jsonl(tmp_path / name / "metrics.jsonl"), read_jsonl(tmp_path / name / "eval.jsonl")


@pytest.fixture(scope="module")
def zero3_and_zero0(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo")
    return ppo_run(tmp, "z3", "deepspeed.zero_stage=3"), ppo_run(tmp, "z0", "deepspeed.zero_stage=0")


def test_ppo_steps_are_finite_and_move_the_actor(zero3_and_zero0):
    (metrics, evals), _ = zero3_and_zero0
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in LOSSES + ("policy/clipfrac", "value/clipfrac", "kl/beta", "time/generate", "tokens_per_s"):
            assert m[key] is not None and math.isfinite(m[key]), (key, m)
    # two mini-batches per step: the second one sees weights the first one changed
    assert all(m["policy/approx_kl"] > 0 for m in metrics)
    assert evals[0]["kl/mean"] == 0.0  # before training the actor is the reference
    assert abs(evals[-1]["kl/mean"]) > 1e-4  # after training it is not


def test_zero_stage_0_and_3_agree(zero3_and_zero0):
    (m3, e3), (m0, e0) = zero3_and_zero0
    for a, b in zip(m3, m0):
        for key in LOSSES:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (a["step"], key, a[key], b[key])
    assert e3[-1]["score/mean"] == pytest.approx(e0[-1]["score/mean"], abs=1e-6)


def test_micro_batch_accumulation_is_exact(tmp_path):
    """Micro-batch 1 x 4 accumulation steps (old log-probs from the fused update forward) equals
    micro-batch 4 x 1 (old log-probs from a separate scoring pass): accumulation and fused scoring."""
    common = ("deepspeed.zero_stage=0", "train.steps=2", "train.mini_batch_size=8")
    m1, _ = ppo_run(tmp_path, "micro1", *common, "train.micro_batch_size=1", "ppo.fuse_scoring=true")
    m4, _ = ppo_run(tmp_path, "micro4", *common, "train.micro_batch_size=4", "ppo.fuse_scoring=false")
    assert "time/train_forward" in m1[0] and "time/train_forward" not in m4[0]
    assert len(m1) == len(m4) == 2
    for a, b in zip(m1, m4):
        for key in ("score/mean", "kl/mean", "advantages/mean", "returns/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    # step 2's rollout is sampled from the updated actor: equal scores mean equal updates
    assert m1[1]["kl/mean"] == pytest.approx(m4[1]["kl/mean"], rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("stage, epochs", [(0, 2), (3, 1)])
def test_fused_first_mini_batch_equals_a_separate_scoring_pass(tmp_path, stage, epochs):
    """Two mini-batches (x two epochs at stage 0): only the first mini-batch's old log-probs come
    from its update forward (values and the other rows from the scoring pass); the run is the same
    as scoring every row separately, and the second mini-batch still sees a moved policy.
    The separate run also scores each rank's 4 rows in one forward (train.scoring_batch_size)
    instead of micro-batches of 2: that changes nothing either."""
    common = (f"deepspeed.zero_stage={stage}", "train.steps=2", f"ppo.ppo_epochs={epochs}")
    fused, _ = ppo_run(tmp_path, "fused", *common, "ppo.fuse_scoring=true")
    separate, _ = ppo_run(tmp_path, "separate", *common, "ppo.fuse_scoring=false", "train.scoring_batch_size=4")
    assert "time/train_forward" in fused[0] and "time/train_forward" not in separate[0]
    assert len(fused) == len(separate) == 2
    for a, b in zip(fused, separate):
        assert a["policy/approx_kl"] > 0  # mini-batch 2 (and epoch 2) ran on updated weights
        for key in LOSSES + ("advantages/mean", "returns/mean", "policy/clipfrac", "policy/approx_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])


def test_fused_scoring_equals_a_separate_scoring_pass_zero3(tmp_path):
    """One epoch of one mini-batch: old log-probs and values taken from the update's own forward
    are the scoring pass's, so the run is the same (ZeRO-3 allows it with one micro-batch per rank)."""
    common = ("deepspeed.zero_stage=3", "train.steps=2", "train.mini_batch_size=8", "train.micro_batch_size=4")
    fused, _ = ppo_run(tmp_path, "fused", *common, "ppo.fuse_scoring=true")
    separate, _ = ppo_run(tmp_path, "separate", *common, "ppo.fuse_scoring=false")
    assert "time/train_forward" in fused[0] and "time/train_forward" not in separate[0]
    for a, b in zip(fused, separate):
        for key in LOSSES + ("advantages/mean", "returns/mean", "policy/clipfrac"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])


def test_lora_actor_and_lora_critic_train_resume_and_export_under_zero3(tmp_path):
    """model.lora and critic.lora together (ZeRO-3, 2 ranks): the run trains, a run resumed from its
    step-2 checkpoint repeats its step 3, and the critic exports as an adapter with a full value head."""
    lora = ("train.steps=3", "model.lora.r=4", "critic.lora.r=4", "checkpoint.save_every=2")
    metrics, _ = ppo_run(tmp_path, "lora", *lora)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in LOSSES + ("policy/clipfrac", "value/clipfrac"):
            assert math.isfinite(m[key]), (key, m)
        assert m["policy/approx_kl"] > 0  # the second mini-batch saw adapters the first one moved
    step2 = tmp_path / "lora" / "checkpoints" / "step-2"
    run_deepspeed("launch/train.py", RECIPE, f"--set=output_dir={tmp_path}", "--set=name=resumed",
                  *[f"--set={o}" for o in lora], f"--resume={step2}")
    resumed = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert resumed[-1]["step"] == 3
    for key in LOSSES + ("advantages/mean", "returns/mean"):
        assert resumed[-1][key] == pytest.approx(metrics[-1][key], rel=1e-6, abs=1e-7), key

    export = export_run(tmp_path / "lora", tmp_path / "critic", which="critic")
    saved = load_file(export / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any("score" in k for k in saved), sorted(saved)[:6]
    assert not any(k.endswith("q_proj.weight") and "lora" not in k for k in saved)  # no base weights


def test_reward_model_sharing_the_reference_backbone_changes_nothing_but_the_work(tmp_path):
    """Reward model = the reference's checkpoint + a scalar head (TRL's workload): scored from the
    reference forward, the run is the same as with the reward model's own copy."""
    common = ("deepspeed.zero_stage=0", "train.steps=2", "reward.type=model", "reward.kwargs={}",
              "reward.model.name_or_path=tiny-llama")
    runs = {}
    for name, extra in (("shared", ()), ("own", ("reward.share_reference_backbone=false",))):
        proc = run_deepspeed("launch/train.py", RECIPE, f"--set=output_dir={tmp_path}", f"--set=name={name}",
                             *[f"--set={o}" for o in common + extra])
        runs[name] = (read_jsonl(tmp_path / name / "metrics.jsonl"), proc.stdout)
    (shared, shared_log), (own, own_log) = runs["shared"], runs["own"]
    assert "backbone is the reference's" in shared_log and "backbone is the reference's" not in own_log
    assert len(shared) == len(own) == 2 and shared[0]["score/std"] > 0
    for a, b in zip(shared, own):
        for key in ("score/mean", "score/std", "kl/mean", "loss/policy", "loss/value"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key, a[key], b[key])
