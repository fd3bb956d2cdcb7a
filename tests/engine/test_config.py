"""Typed recipes: good ones load, bad ones fail with file, line, key and a suggestion."""
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_engine.config import RecipeError, derive_batch_sizes, load_recipe

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "recipes/smoke/ppo-smollm2.yaml"


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """name: t
stage: rl
model: {name_or_path: tiny-llama}
reward: {type: sentiment}
data: {path: prompts.jsonl}
train: {steps: 2, rollout_batch_size: 4, mini_batch_size: 4, micro_batch_size: 2}
"""


def test_good_recipe_and_typed_overrides(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["train.steps=7", "ppo.kl_coef=0.1", 'generation.stop_strings=["\\n"]',
                                            "deepspeed.zero_stage=3"])
    assert r.train.steps == 7 and isinstance(r.train.steps, int)
    assert r.ppo.kl_coef == 0.1 and r.deepspeed.zero_stage == 3
    assert r.generation.stop_strings == ["\n"]


def test_misspelled_key_suggests_and_names_line(tmp_path):
    p = write(tmp_path, BASE + "ppo:\n  kl_coeff: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"unknown key 'ppo.kl_coeff' in {p}, line 8; did you mean 'kl_coef'?" in msg


def test_misspelled_override_names_the_flag(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, BASE), ["train.step=3"])
    assert "unknown key 'train.step' in --set train.step; did you mean 'steps'?" in str(e.value)


def test_wrong_type_and_literal(tmp_path):
    p = write(tmp_path, BASE.replace("steps: 2", "steps: many") + "ppo: {kl_estimator: k9}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "'train.steps'" in msg and "line 6" in msg and "valid integer" in msg and "'many'" in msg
    assert "'ppo.kl_estimator'" in msg and "'k1', 'k2' or 'k3'" in msg


def test_missing_key_and_cross_field_rules(tmp_path):
    with pytest.raises(RecipeError, match="missing required key 'train'"):
        load_recipe(write(tmp_path, BASE.replace("train: {steps: 2, rollout_batch_size: 4, mini_batch_size: 4, "
                                                 "micro_batch_size: 2}\n", "")))
    with pytest.raises(RecipeError, match="needs ppo.group_size >= 2"):
        load_recipe(write(tmp_path, BASE), ["ppo.algorithm=grpo"])
    with pytest.raises(RecipeError, match="offload_params needs zero_stage: 3"):
        load_recipe(write(tmp_path, BASE), ["deepspeed.offload_params=true"])


def test_yaml_syntax_error_gives_line(tmp_path):
    p = write(tmp_path, BASE + "ppo: {kl_coef: 0.1\nbad: [\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "YAML syntax error" in str(e.value) and str(p) in str(e.value) and "line" in str(e.value)


def test_batch_sizes_divide_or_fail(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    s = derive_batch_sizes(r, 2)
    assert (s.local_rollout_sequences, s.num_mini_batches, s.gradient_accumulation_steps) == (2, 1, 1)
    r = load_recipe(write(tmp_path, BASE), ["train.rollout_batch_size=6", "train.mini_batch_size=6"])
    with pytest.raises(RecipeError, match="mini_batch_size 6 must divide by micro_batch_size x world = 4"):
        derive_batch_sizes(r, 2)


def test_cli_validate_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "validate", str(SMOKE), "--set", "train.steps=3"],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "steps: 3" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "validate", str(SMOKE), "--set", "ppo.kl_coeff=1"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown key 'ppo.kl_coeff'" in bad.stderr and "did you mean 'kl_coef'?" in bad.stderr


def test_critic_lora_comes_from_critic_lora_only():
    from rlhf_engine.trainer import critic_model_config
    base = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml")
    assert critic_model_config(base).lora is None
    actor_lora = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", ["model.lora.r=4"])
    assert actor_lora.model.lora.r == 4 and critic_model_config(actor_lora).lora is None  # full critic
    both = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", ["critic.lora.r=8", "critic.gradient_checkpointing=true"])
    cfg = critic_model_config(both)
    assert cfg.lora.r == 8 and cfg.gradient_checkpointing and cfg.name_or_path == both.model.name_or_path


def test_critic_gradient_checkpointing_defaults_to_the_actors_whatever_the_backbone():
    """critic.gradient_checkpointing unset: the actor's setting, also when the backbone is the reward model's."""
    from rlhf_engine.trainer import critic_model_config
    sets = ["reward.type=model", "reward.kwargs={}", "reward.model.name_or_path=tiny-llama",
            "reward.model.gradient_checkpointing=false", "critic.init_from=reward"]
    on = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", [*sets, "model.gradient_checkpointing=true"])
    assert critic_model_config(on).gradient_checkpointing is True
    off = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", [*sets, "model.gradient_checkpointing=false",
                                                             "reward.model.gradient_checkpointing=true"])
    assert critic_model_config(off).gradient_checkpointing is False
    own = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", [*sets, "critic.gradient_checkpointing=true"])
    assert critic_model_config(own).gradient_checkpointing is True
