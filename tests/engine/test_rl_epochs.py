"""train.epochs caps the RL steps at that many passes over the training prompts (whichever of epochs
and steps comes first); the loop, its progress total and its LR schedule use the capped count."""
from rlhf_engine.config import load_recipe
from rlhf_engine.trainer import _steps_capped_by_epochs
from helpers import REPO


def train(*overrides):
    return load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", list(overrides)).train


def test_epochs_cap_rl_steps(capsys):
    # 60 training prompts, 8 per step: 7 steps per pass (the ragged tail of 4 is dropped)
    capped = _steps_capped_by_epochs(train("train.steps=20", "train.epochs=2"), 60, is_main=True)
    assert capped.steps == 14 and "14 RL steps" in capsys.readouterr().out
    assert _steps_capped_by_epochs(train("train.steps=5", "train.epochs=2"), 60, is_main=True).steps == 5
    assert _steps_capped_by_epochs(train("train.steps=50"), 60, is_main=True).steps == 50  # no cap by default
