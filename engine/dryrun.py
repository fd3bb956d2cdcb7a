"""`rlhf-engine train RECIPE --dry-run`: everything a run does before its first step, without weights.

Resolves the recipe, reads each model's config (engine.plan.config_source: offline for the shipped
architectures), builds the four models on the meta device (the loaders' steps: causal LM or scalar
model, gradient checkpointing, LoRA adapters), derives the batch sizes and the DeepSpeed configs of the
trained and frozen models, checks the data, and prints the memory plan. Nothing is allocated or
downloaded, so a 70B recipe dry-runs on a laptop CPU.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch

from rlhf_engine.config import ModelConfig, Recipe, RecipeError, derive_batch_sizes
from rlhf_engine.plan import _roles, config_source, load_config, meta_model, plan_recipe, render


def meta_build(cfg: ModelConfig, scalar: bool, trainable: bool, aliases: Optional[dict] = None) -> torch.nn.Module:
    """The model ``cfg`` describes, as the loaders build it (engine.models), on the meta device."""
    from rlhf_engine.models import ScalarModel, _lora, is_encoder

    config = load_config(config_source(cfg, aliases))
    model = meta_model(config, scalar=scalar)
    if trainable and cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if trainable and cfg.lora is not None:
        model = _lora(cfg, "SEQ_CLS" if scalar else "CAUSAL_LM", model)
    if not trainable:
        model.eval().requires_grad_(False)
    return ScalarModel(model, encoder=is_encoder(config)) if scalar else model


def _notes(recipe: Recipe) -> list[str]:
    notes = []
    cfgs = [recipe.model, recipe.reference, *(r.model for r in recipe.reward_configs())]
    if any(c is not None and c.attn_implementation == "flash_attention_2" for c in cfgs):
        if not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
            notes.append("attn_implementation flash_attention_2 needs CUDA and flash-attn (not on this machine)")
    return notes


def check_data(recipe: Recipe, cache_dir: Optional[str] = None) -> str:
    """Read and tokenize the data with the model's tokenizer; without one offline, read and check the fields."""
    from rlhf_engine import data
    from rlhf_engine.models import load_tokenizer

    try:
        from rlhf_engine.models import resolve_model_path

        if resolve_model_path(recipe.model, cache_dir).source == "hub" and not Path(
                resolve_model_path(recipe.model, cache_dir).tokenizer_path).is_dir():
            raise FileNotFoundError("not downloaded")  # a dry run downloads nothing
        tokenizer = load_tokenizer(recipe.model, cache_dir)
    except Exception as e:  # a hub tokenizer not on disk: check the rows without token lengths
        rows = data.read_rows(recipe.data)
        if not rows:
            raise RecipeError(f"data.path {recipe.data.path}: no rows")
        check = {"rl": lambda r: data._prompt(r, recipe.data),
                 "reward": lambda r: (data._text(r, recipe.data, "chosen"), data._text(r, recipe.data, "rejected")),
                 "sft": lambda r: data._text(r, recipe.data, "response")}[recipe.stage]
        for row in rows:
            check(row)
        return (f"{len(rows)} rows with the fields stage {recipe.stage} needs (token lengths not checked: "
                f"no tokenizer on disk: {e})")
    loader = {"rl": data.load_prompts, "reward": data.load_preferences, "sft": data.load_sft}[recipe.stage]
    _, _, report = loader(recipe.data, tokenizer, recipe.seed)
    return str(report)


def dry_run(recipe: Recipe, gpus_per_node: int = 1, nodes: int = 1, gpu_memory_gib: Optional[float] = None,
            aliases: Optional[dict] = None) -> dict:
    """Everything but the training: returns {sizes, models, ds_configs, data, notes, plan} (and prints nothing)."""
    from rlhf_engine.distributed import ds_config

    world = gpus_per_node * nodes
    sizes = derive_batch_sizes(recipe, world)
    models = {}
    for role, (cfg, trainable, scalar) in _roles(recipe).items():
        model = meta_build(cfg, scalar, trainable, aliases)
        params = list(model.parameters())
        assert all(p.device.type == "meta" for p in params), f"{role}: built off the meta device"
        models[role] = {"class": type(model).__name__, "params": sum(p.numel() for p in params),
                        "trainable": sum(p.numel() for p in params if p.requires_grad)}
    ds_configs = {"trained": ds_config(recipe, sizes, trainable=True)}
    if recipe.stage == "rl":
        ds_configs["frozen"] = ds_config(recipe, sizes, trainable=False)
    plan = plan_recipe(recipe, gpus_per_node, nodes, gpu_memory_gib, aliases=aliases)
    return {"sizes": sizes.model_dump(), "models": models, "ds_configs": ds_configs,
            "data": check_data(recipe, recipe.cache_dir), "notes": _notes(recipe), "plan": plan}


def render_dry_run(result: dict) -> str:
    lines = [f"batch sizes: {result['sizes']}"]
    for role, m in result["models"].items():
        lines.append(f"model {role}: {m['class']} on meta, {m['params']:,} params ({m['trainable']:,} trained)")
    for kind, cfg in result["ds_configs"].items():
        zero = cfg["zero_optimization"]
        lines.append(f"deepspeed ({kind}): stage {zero['stage']}, train_batch_size {cfg['train_batch_size']}, "
                     f"micro {cfg['train_micro_batch_size_per_gpu']}, accumulation {cfg['gradient_accumulation_steps']}"
                     + "".join(f", {k}" for k in ("offload_param", "offload_optimizer") if k in zero))
    lines.append(f"data: {result['data']}")
    lines += [f"note: {n}" for n in result["notes"]]
    lines.append(render(result["plan"]))
    return "\n".join(lines)
