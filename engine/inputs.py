"""Up-front checks of what a recipe points at, so a run fails in one clean line (exit code 2) before
any model is built or an earlier run is moved aside: data files, models, the reward function, and
a writable `output_dir`. `rlhf-engine validate` runs the same checks (except the output folder)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from rlhf_engine.config import Recipe, RecipeError


def _check_data(key: str, cfg) -> None:
    from rlhf_engine.data import _READERS, read_rows

    path = Path(cfg.path)
    if path.is_file() or path.suffix.lower() in _READERS:
        read_rows(cfg)  # local file: exists, decodes, parses (named file and line otherwise)
    # else a `datasets` name: loaded (and checked) when the run starts


def _check_model(key: str, cfg, later: Optional[Path] = None) -> None:
    """A local model path (folder with config.json, or .gguf file) must exist; presets and hub ids pass
    (hub ids are resolved, and downloaded if needed, when the run starts). ``later``: a missing path
    inside this folder (the runs folder: an earlier stage's output) is only noted."""
    from rlhf_engine.presets import PRESETS

    for name, what in ((cfg.name_or_path, "name_or_path"), (cfg.tokenizer, "tokenizer")):
        if name is None or name in PRESETS:
            continue
        local = Path(name).expanduser()
        looks_local = name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or name.count("/") > 1
        if not local.exists():
            if looks_local and later is not None and later.resolve() in local.resolve().parents:
                print(f"note: {key}.{what} '{name}' does not exist yet (an earlier run's output?)", file=sys.stderr)
            elif looks_local:
                raise RecipeError(f"{key}.{what}: '{name}' does not exist; give a local model folder, a .gguf file, "
                                  f"a hub id or a preset ({', '.join(PRESETS)})")
            continue
        gguf = local / cfg.gguf_file if local.is_dir() and cfg.gguf_file and what == "name_or_path" else None
        if gguf is not None and not gguf.is_file():
            raise RecipeError(f"{key}.gguf_file: {gguf} does not exist")
        if local.is_dir() and gguf is None and not (local / "config.json").is_file() and not (
                what == "tokenizer" and (local / "tokenizer_config.json").is_file()):
            raise RecipeError(f"{key}.{what}: folder {local} has no config.json; expected a Hugging Face model "
                              "folder (config.json + weights + tokenizer)")


def check_inputs(recipe: Recipe, *, outputs_later: bool = False) -> None:
    """Raise RecipeError naming the key when a data file, model or reward function cannot be used.
    ``outputs_later`` (validate): model paths inside ``output_dir`` may be made by an earlier run."""
    later = Path(recipe.output_dir) if outputs_later else None
    _check_data("data", recipe.data)
    if recipe.ptx_data is not None:
        _check_data("ptx_data", recipe.ptx_data)
    _check_model("model", recipe.model, later)
    if recipe.reference is not None:
        _check_model("reference", recipe.reference, later)
    if recipe.stage == "rl" and recipe.critic.init_from not in ("actor", "reward"):
        _check_model("critic.init_from", recipe.model.model_copy(update={"name_or_path": recipe.critic.init_from,
                                                                         "gguf_file": None, "tokenizer": None}), later)
    rewards = recipe.reward_configs() if recipe.stage == "rl" else []
    for i, reward in enumerate(rewards):
        key = "reward" if len(rewards) == 1 and not isinstance(recipe.reward, list) else f"reward[{i}]"
        if reward.type == "model" and reward.model is not None:
            _check_model(f"{key}.model", reward.model, later)
        if reward.type == "callable":
            from rlhf_engine.rewards import load_function
            load_function(reward.function)
    if recipe.eval.test_data is not None:
        _check_data("eval.test_data", recipe.eval.test_data)


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
