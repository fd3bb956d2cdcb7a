"""Up-front checks of what a recipe points at, so a run fails in one clean line (exit code 2) before
any model is built or an earlier run is moved aside: data files, models, the reward function, and
a writable `output_dir`. `rlhf-engine validate` runs the same checks (except the output folder)."""
from __future__ import annotations

import os
from pathlib import Path

from rlhf_engine.config import Recipe, RecipeError


def _check_data(key: str, cfg) -> None:
    from rlhf_engine.data import _READERS, read_rows

    path = Path(cfg.path)
    if path.is_file() or path.suffix.lower() in _READERS:
        read_rows(cfg)  # local file: exists, decodes, parses (named file and line otherwise)
    # else a `datasets` name: loaded (and checked) when the run starts


def _check_model(key: str, cfg, cache_dir) -> None:
    from rlhf_engine.models import resolve_model_path
    from rlhf_engine.presets import PRESETS

    if cfg.name_or_path in PRESETS and (cfg.tokenizer is None or cfg.tokenizer in PRESETS):
        return
    try:
        resolve_model_path(cfg, cache_dir)  # local folders and .gguf files must exist; hub ids are not downloaded
    except RecipeError as e:
        raise RecipeError(f"{key}: {e}") from None


def check_inputs(recipe: Recipe) -> None:
    """Raise RecipeError naming the key when a data file, model or reward function cannot be used."""
    _check_data("data", recipe.data)
    if recipe.ptx_data is not None:
        _check_data("ptx_data", recipe.ptx_data)
    _check_model("model", recipe.model, recipe.cache_dir)
    if recipe.reference is not None:
        _check_model("reference", recipe.reference, recipe.cache_dir)
    if recipe.stage == "rl" and recipe.critic.init_from not in ("actor", "reward"):
        _check_model("critic.init_from", recipe.model.model_copy(update={"name_or_path": recipe.critic.init_from,
                                                                         "gguf_file": None}), recipe.cache_dir)
    reward = recipe.reward
    if recipe.stage == "rl" and reward is not None:
        if reward.type == "model" and reward.model is not None:
            _check_model("reward.model", reward.model, recipe.cache_dir)
        if reward.type == "callable":
            from rlhf_engine.rewards import load_function
            load_function(reward.function)


def check_output_dir(recipe: Recipe) -> None:
    """`output_dir` exists (or can be made) and is writable: checked before anything is loaded."""
    out = Path(recipe.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"output_dir {out}: cannot create it ({e.strerror}); set output_dir to a folder you "
                          "can write to") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RecipeError(f"output_dir {out} is not writable; set output_dir to a folder you can write to")
