"""The reward model is a frozen DeepSpeed engine under the reference's rules: ZeRO-3 partitioned
across ranks, scoring through the engine, and a PPO run with it (critic initialised from it) trains."""
import json
import math
from pathlib import Path

import pytest

from rlhf_engine.tracking import read_jsonl
from helpers import run_deepspeed

WORKER = Path(__file__).parent / "workers" / "reward_zero3_worker.py"


def test_reward_model_is_partitioned_and_scores_like_an_unsharded_copy(tmp_path):
    run_deepspeed(WORKER, tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["is_engine"] == "DeepSpeedEngine"
    assert out["whole_left"] == 0  # no rank keeps a gathered weight after scoring
    for local in out["local"]:
        assert 0.45 * out["total"] <= local <= 0.55 * out["total"], (local, out["total"])
    assert sum(out["local"]) >= out["total"]  # the shards cover the model (padding only adds)
    assert len(set(out["sharded"])) > 1
    assert out["sharded"] == pytest.approx(out["unsharded"], rel=1e-5, abs=1e-6)
    # deepspeed.frozen_offload_params: the same reward model with its partitions in CPU memory scores the same
    assert out["offload_param"] and out["offload_device"] == "cpu"
    assert out["offloaded"] == pytest.approx(out["unsharded"], rel=1e-5, abs=1e-6)


def test_frozen_offload_params_applies_to_frozen_models_only():
    from rlhf_engine.config import RecipeError, derive_batch_sizes, load_recipe
    from rlhf_engine.distributed import ds_config
    from rlhf_engine.plan import plan_recipe
    from helpers import REPO

    recipe = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", ["deepspeed.frozen_offload_params=true"])
    sizes = derive_batch_sizes(recipe, 2)
    assert "offload_param" in ds_config(recipe, sizes, trainable=False)["zero_optimization"]
    assert "offload_param" not in ds_config(recipe, sizes, trainable=True)["zero_optimization"]
    plain = plan_recipe(load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml"), 2)
    offloaded = plan_recipe(recipe, 2)
    reference = plain.models["reference"]["params"] * 4 / 2  # fp32, half per rank
    assert plain.phases["generate"]["weights"] - offloaded.phases["generate"]["weights"] == pytest.approx(reference, abs=4)
    assert offloaded.host_bytes_per_node == pytest.approx(reference * 2, abs=8)  # both ranks of the node
    with pytest.raises(RecipeError, match="frozen_offload_params needs partitioned frozen models"):
        load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", ["deepspeed.zero_stage=0", "deepspeed.frozen_offload_params=true"])


def test_ppo_with_a_separate_zero3_reward_model_and_critic_from_it_trains(tmp_path):
    run_deepspeed("launch/train.py", "recipes/tiny/ppo-zero3.yaml", f"--set=output_dir={tmp_path}", "--set=name=rm",
                  "--set=train.steps=2", "--set=reward.type=model", "--set=reward.kwargs={}",
                  "--set=reward.model.name_or_path=tiny-llama", "--set=reward.share_reference_backbone=false",
                  "--set=critic.init_from=reward", "--set=deepspeed.zero_stage=3")
    metrics = read_jsonl(tmp_path / "rm" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("loss/policy", "loss/value", "score/mean", "kl/mean"):
            assert math.isfinite(m[key]), (key, m)
    assert metrics[0]["score/std"] > 0  # the reward model tells responses apart
    assert metrics[1]["kl/mean"] != 0  # the actor moved after the first update
