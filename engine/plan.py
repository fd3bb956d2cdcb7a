"""Memory planner: per-rank peak bytes of an RL (or supervised) recipe, by phase and component, from configs only.

``plan_recipe(recipe, gpus_per_node, nodes, gpu_memory_gib)`` reads each model's config.json (preset,
local folder, a config shipped in ``engine/model_configs/`` for the hub ids the recipes use, the HF
cache, or the hub when online), builds it on the meta device to count parameters exactly, and adds up:

- static, every phase: weights of the four models (ZeRO-3: 1/world of them), optimizer states and
  fp32 master weights (ZeRO 1-3: 1/world; offloaded: host memory instead);
- generate: the hybrid engine's gathered actor (whole, or ``hybrid.layers_per_group`` layers plus the
  non-layer weights; a ``generation.dtype`` cast copy), the static KV cache, sampling logits;
- score (no grad): one gathered layer per ZeRO-3 model, one layer's activations, logits of the response;
- train: gradients, saved activations (fewer with gradient checkpointing), logits and their gradient,
  gathered layers and ZeRO buckets.
Activation sizes are elements per token per layer, measured with saved-tensor hooks on Llama-style
models here (``ACT_*`` below); docs/benchmarks.md ("Memory planner") compares the totals with measured peaks.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from rlhf_engine.config import ModelConfig, Recipe, RecipeError, derive_batch_sizes

GIB = 2 ** 30
SHIPPED = Path(__file__).with_name("model_configs")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# saved activations per token and decoder layer, in elements (measured with saved_tensors_hooks on
# Llama-style layers, sdpa attention): lean MLP/RMSNorm (engine/backends/cpu/lean.py, CPU ranks only) vs HF's own
ACT_H, ACT_I_LEAN, ACT_I_HF = 8.3, 2.0, 5.25
ZERO_BUCKET = int(5e7)  # reduce / allgather / prefetch bucket elements set by distributed.ds_config
OPTIONS = ("micro_batch_size", "gradient_checkpointing", "layers_per_group", "generation_batch_size", "zero_stage",
           "offload_optimizer", "lora", "offload_params")  # fixes tried, cheapest (least slowdown) first


# --------------------------------------------------------------------------------------------
# model shapes from configs
@dataclass
class Shape:
    source: str
    params: int  # all parameters
    layer_params: int  # the largest decoder layer
    num_layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value width per layer (kv heads x head dim)
    vocab: int
    heads: int
    linears: tuple  # (in, out) of every nn.Linear in the layers (LoRA targets for 'all-linear')


def config_source(cfg: ModelConfig, aliases: Optional[dict] = None) -> str:
    """Where the config of ``cfg`` comes from: an alias (``--model-config``), a preset folder, a local
    folder, a shipped config, the HF cache or the hub; RecipeError when none is available."""
    name = (aliases or {}).get(cfg.name_or_path, cfg.name_or_path)
    from rlhf_engine.presets import PRESETS, cache_root

    if name in PRESETS:
        return str(PRESETS[name].materialize(cache_root()))
    local = Path(name).expanduser()
    if (local / "config.json").is_file() or (local.suffix == ".json" and local.is_file()):
        return str(local)
    shipped = SHIPPED / (name.replace("/", "--") + ".json")
    if shipped.is_file():
        return str(shipped)
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)  # HF cache, or the hub when online
        return name
    except Exception:
        raise RecipeError(
            f"no model config for '{cfg.name_or_path}' (model.name_or_path): not a preset, a folder with config.json, "
            f"a shipped config ({', '.join(sorted(p.stem.replace('--', '/') for p in SHIPPED.glob('*.json')))}) or a "
            f"reachable hub id. Pass --model-config '{cfg.name_or_path}=<hub id, folder or config.json>' (e.g. the "
            "model a reward model was trained from)") from None


def load_config(source: str):
    from transformers import AutoConfig, PretrainedConfig

    if source.endswith(".json"):
        data = json.loads(Path(source).read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data) if "model_type" in data else \
            PretrainedConfig(**data)
    return AutoConfig.from_pretrained(source)


def meta_model(config, scalar: bool = False) -> torch.nn.Module:
    """The model of ``config`` on the meta device (no memory): causal LM (seq2seq LM for encoder-decoder
    configs), or num_labels=1 classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    from rlhf_engine.models import is_encoder

    config = config.__class__.from_dict(config.to_dict())
    with torch.device("meta"):
        if scalar or is_encoder(config):
            config.num_labels = 1
            return AutoModelForSequenceClassification.from_config(config)
        if getattr(config, "is_encoder_decoder", False):
            return AutoModelForSeq2SeqLM.from_config(config)
        return AutoModelForCausalLM.from_config(config)


@lru_cache(maxsize=32)
def model_shape(source: str, scalar: bool = False) -> Shape:
    config = load_config(source)
    model = meta_model(config, scalar)
    lists = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)}
    layers = max(lists.values(), key=lambda m: sum(p.numel() for p in m.parameters()))
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    num_layers = len(layers)
    if getattr(config, "is_encoder_decoder", False):
        # both stacks, each counted as if it saw the whole sequence (the encoder sees only the prompt and
        # the decoder only the response): activations are an upper bound for encoder-decoder models
        stacks = [m for n, m in lists.items() if not any(n.startswith(o + ".") for o in lists if o != n)]
        num_layers = sum(len(m) for m in stacks)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    linears = tuple((m.in_features, m.out_features) for m in layers.modules() if isinstance(m, torch.nn.Linear))
    return Shape(source=source, params=sum(p.numel() for p in model.parameters()), layer_params=layer_params,
                 num_layers=num_layers, hidden=text.hidden_size,
                 intermediate=next((getattr(text, k) for k in ("intermediate_size", "d_ff", "decoder_ffn_dim")
                                    if getattr(text, k, None)), 4 * text.hidden_size), kv_dim=kv * head_dim,
                 vocab=text.vocab_size, heads=heads, linears=linears)


def lora_params(shape: Shape, lora) -> int:
    """Adapter parameters r x (in + out) of every targeted linear (a name list counts as every linear)."""
    return sum(lora.r * (i + o) for i, o in shape.linears) if lora is not None else 0


# --------------------------------------------------------------------------------------------
# the plan
@dataclass
class Plan:
    recipe: str
    world_size: int
    gpus_per_node: int
    nodes: int
    gpu_memory_gib: Optional[float]
    models: dict  # role -> {source, params, trainable}
    phases: dict  # phase -> {component: bytes}
    peak_phase: str = ""
    peak_bytes: int = 0
    host_bytes_per_node: int = 0
    fits: Optional[bool] = None
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    fixes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _roles(recipe: Recipe) -> dict:
    """role -> (ModelConfig, trainable, scalar) for the models this recipe builds."""
    from rlhf_engine import rl
    from rlhf_engine.trainer import critic_model_config

    if recipe.stage == "dpo" and recipe.dpo.reference == "on_the_fly":  # precompute frees it before training
        return {"model": (recipe.model, True, False), "reference": (recipe.reference or recipe.model, False, False)}
    if recipe.stage != "rl":
        return {"model": (recipe.model, True, recipe.stage == "reward")}
    roles = {"actor": (recipe.model, True, False), "reference": (recipe.reference or recipe.model, False, False)}
    if rl.needs_critic(recipe.ppo.algorithm):
        critic = critic_model_config(recipe)
        roles["critic"] = (critic.model_copy(update={"dtype": recipe.critic.dtype or critic.dtype}), True, True)
    models = [r.model for r in recipe.reward_configs() if r.type == "model"]
    for i, model in enumerate([] if _shares_reference(recipe) else models):
        roles["reward" if len(models) == 1 else f"reward{i + 1}"] = (model, False, True)
    return roles


def _shares_reference(recipe: Recipe) -> bool:
    """The reward scores from the reference forward (rewards.ModelReward.share_backbone): same checkpoint,
    frozen models replicated (stage 0)."""
    from rlhf_engine.distributed import frozen_stage

    ref, reward = recipe.reference or recipe.model, recipe.reward
    return (not isinstance(reward, list) and reward.type == "model" and reward.share_reference_backbone
            and frozen_stage(recipe) == 0 and reward.model.name_or_path == ref.name_or_path)


def plan_recipe(recipe: Recipe, gpus_per_node: int = 1, nodes: int = 1, gpu_memory_gib: Optional[float] = None,
                host_memory_gib: Optional[float] = None, aliases: Optional[dict] = None, name: str = "",
                suggest: bool = True, on_cpu: bool = False) -> Plan:
    """Per-rank peak bytes by phase and component for ``recipe`` on ``nodes`` x ``gpus_per_node`` ranks
    (``on_cpu``: CPU ranks, where the recipe's ``cpu`` section switches apply)."""
    world = gpus_per_node * nodes
    sizes = derive_batch_sizes(recipe, world)
    ds, t, gen = recipe.deepspeed, recipe.train, recipe.generation
    bw = 2 if ds.precision in ("bf16", "fp16") else 4  # weight bytes (bf16_autocast keeps fp32 weights)
    ba = 2 if ds.precision != "fp32" else 4  # activation bytes
    from rlhf_engine.distributed import frozen_stage

    stages = {True: ds.zero_stage, False: frozen_stage(recipe)}
    P = recipe.data.max_prompt_length
    R = gen.max_new_tokens if recipe.stage == "rl" else 0
    T = P + R if recipe.stage == "rl" else recipe.data.max_length
    phases = {"generate": {}, "score": {}, "train": {}} if recipe.stage == "rl" else {"train": {}}
    host = 0
    models, flops, fused_critic = {}, 0.0, False

    transient = {ph: [] for ph in phases}  # per model: the parts alive only while that model runs

    def add(phase_names, key, value, role=None):
        for ph in phase_names:
            if role is None:
                phases[ph][key] = phases[ph].get(key, 0) + int(value)
                continue
            if not transient[ph] or transient[ph][-1][0] != role:
                transient[ph].append((role, {}))
            part = transient[ph][-1][1]
            part[key] = part.get(key, 0) + int(value)

    everywhere = tuple(phases)
    for role, (cfg, trainable, scalar) in _roles(recipe).items():
        shape = model_shape(config_source(cfg, aliases), scalar)
        stage = stages[trainable]
        n = shape.params
        nt = (lora_params(shape, cfg.lora) + (shape.hidden if scalar else 0)) if trainable and cfg.lora else \
            (n if trainable else 0)
        n_total = n + (nt if trainable and cfg.lora else 0)
        models[role] = {"source": shape.source, "params": n_total, "trainable": nt, "zero_stage": stage}
        shard = world if stage == 3 else 1
        weights = n_total * bw / shard
        if stage == 3 and (ds.offload_params or (not trainable and ds.frozen_offload_params)):
            host += weights * gpus_per_node
        else:
            add(everywhere, "weights", weights)
        if stage == 3:  # one layer being used and one prefetched, in the weight dtype
            add(tuple(p for p in ("score", "train") if p in phases), "gathered_params", min(n, 2 * shape.layer_params + ZERO_BUCKET) * bw, role)
        lean = on_cpu and recipe.cpu.lean_activations  # engine/backends/cpu: applied on CPU ranks only
        act_el = ACT_H * shape.hidden + (ACT_I_LEAN if lean else ACT_I_HF) * shape.intermediate
        if cfg.attn_implementation == "eager":
            act_el += shape.heads * T
        layer_act = act_el * ba  # bytes per token per layer
        score_batch = t.scoring_batch_size or sizes.micro_batch_size
        head_out = 1 if scalar else shape.vocab
        if recipe.stage == "rl":  # one layer's activations in flight (and its input); response logits
            add(("score",), "activations", score_batch * T * layer_act * 2, role)
            add(("score",), "logits", score_batch * (R + 1) * head_out * ba, role)
        tokens = sizes.rollout_sequences * T if recipe.stage == "rl" else sizes.mini_batch_size * T
        flops += 2 * n * tokens
        if not trainable:
            continue
        # ---- trained: optimizer states, master weights, gradients, activations
        opt = nt * (8 + (4 if bw == 2 else 0)) / (world if stage >= 1 else 1)
        if ds.offload_optimizer:
            host += opt * gpus_per_node
        else:
            add(everywhere, "optimizer", opt)
        # ZeRO-3 keeps its gradient partitions allocated; below it the engine frees .grad after each
        # step (set_to_none), so only the model being updated holds gradients
        add(("train",), "gradients", nt * bw / (world if stage >= 2 else 1), None if stage == 3 else role)
        if stage >= 1:
            add(("train",), "zero_buckets", min(nt, ZERO_BUCKET) * bw, role)
        fused = recipe.stage == "rl" and recipe.ppo.fuse_scoring and (
            stage < 3 or sizes.gradient_accumulation_steps == 1) and (role == "actor" or sizes.num_mini_batches == 1)
        rows = (sizes.local_rollout_sequences // sizes.num_mini_batches) if fused else sizes.micro_batch_size
        rows *= 2 if recipe.stage == "reward" else 1  # a preference row is a chosen and a rejected sequence
        ckpt = cfg.gradient_checkpointing
        kept = rows * T * (shape.hidden * ba if ckpt else layer_act) * shape.num_layers
        add(("train",), "activations", kept + sizes.micro_batch_size * T * layer_act * (2 if ckpt else 1), role)
        add(("train",), "logits", rows * (R + 1 if R else T) * head_out * ba * 2, role)  # logits and their gradient
        if fused and role == "critic":  # fused critic: its graph lives beside the actor's
            fused_critic = True
        flops += (4 + (2 if ckpt else 0)) * n * tokens * (recipe.ppo.ppo_epochs if recipe.stage == "rl" else 1)
    if recipe.stage == "rl":
        actor_cfg = recipe.model
        shape = model_shape(config_source(actor_cfg, aliases))
        bg = BYTES[gen.dtype] if gen.dtype else (2 if ds.precision == "bf16_autocast" else bw)
        lpg = recipe.hybrid.layers_per_group
        nonlayer = shape.params - shape.layer_params * shape.num_layers
        if ds.zero_stage == 3 and recipe.hybrid.enabled:
            gathered = (nonlayer + shape.layer_params * lpg) if lpg else shape.params
            add(("generate",), "gathered_params", gathered * bg)
        elif bg != bw:
            add(("generate",), "gathered_params", shape.params * bg)  # the dtype-cast copy
        gb = min(t.generation_batch_size or sizes.local_rollout_sequences, sizes.local_rollout_sequences)
        add(("generate",), "kv_cache", gb * T * shape.num_layers * 2 * shape.kv_dim * bg)
        add(("generate",), "logits", gb * shape.vocab * 4 * 3)  # fp32 last-position logits, probs, sorted copy
        add(("generate",), "activations", gb * P * ACT_H * shape.hidden * bg)  # prefill of one layer
        flops += 2 * shape.params * sizes.rollout_sequences * R
    # models run one after another: a phase holds the largest model's transient parts, or the sum of
    # actor and critic when fused scoring keeps both graphs alive for the first update
    for ph, parts in transient.items():
        if not parts:
            continue
        sums = [sum(p.values()) for _, p in parts]
        chosen = [p for _, p in parts] if ph == "train" and fused_critic else [parts[sums.index(max(sums))][1]]
        for p in chosen:
            for key, value in p.items():
                if key != "gradients":
                    phases[ph][key] = phases[ph].get(key, 0) + value
        # each engine steps (and frees its .grad) before the next one's backward: one gradient set at a time
        grads = max(p.get("gradients", 0) for p in chosen)
        if grads:
            phases[ph]["gradients"] = phases[ph].get("gradients", 0) + grads
    totals = {ph: sum(parts.values()) for ph, parts in phases.items() if parts}
    peak = max(totals, key=totals.get)
    plan = Plan(recipe=name or recipe.name, world_size=world, gpus_per_node=gpus_per_node, nodes=nodes,
                gpu_memory_gib=gpu_memory_gib, models=models, phases={k: phases[k] for k in totals},
                peak_phase=peak, peak_bytes=totals[peak], host_bytes_per_node=int(host),
                tokens_per_step=(sizes.rollout_sequences if recipe.stage == "rl" else sizes.mini_batch_size) * T,
                flops_per_step=flops)
    if gpu_memory_gib is not None:
        plan.fits = plan.peak_bytes <= gpu_memory_gib * GIB
        if host_memory_gib is not None and plan.host_bytes_per_node > host_memory_gib * GIB:
            plan.fits = False
        if not plan.fits and suggest:
            plan.fixes = suggest_fixes(recipe, gpus_per_node, nodes, gpu_memory_gib, host_memory_gib, aliases)
    return plan


def _variant(recipe: Recipe, option: str, world: int) -> Optional[Recipe]:
    """``recipe`` with one memory-saving change applied, or None when it does not apply."""
    r = recipe.model_copy(deep=True)
    ds, t = r.deepspeed, r.train
    if option == "micro_batch_size" and t.micro_batch_size > 1:
        t.micro_batch_size //= 2
    elif option == "gradient_checkpointing" and not r.model.gradient_checkpointing:
        r.model.gradient_checkpointing = True
        r.critic.gradient_checkpointing = True
    elif option == "layers_per_group" and r.stage == "rl" and ds.zero_stage == 3 and r.hybrid.layers_per_group is None:
        r.hybrid.layers_per_group = 4
    elif option == "generation_batch_size" and r.stage == "rl":
        local = derive_batch_sizes(r, world).local_rollout_sequences
        current = min(t.generation_batch_size or local, local)
        if current <= 1:
            return None
        t.generation_batch_size = current // 2
    elif option == "zero_stage" and ds.zero_stage != 3 and world > 1:
        ds.zero_stage = 3
    elif option == "offload_optimizer" and not ds.offload_optimizer:
        ds.zero_stage, ds.offload_optimizer = max(ds.zero_stage, 1), True
    elif option == "lora" and r.model.lora is None:
        from rlhf_engine.config import LoraConfig

        r.model.lora = LoraConfig(r=16, alpha=32)
        r.critic.lora = r.critic.lora or LoraConfig(r=16, alpha=32)
    elif option == "offload_params" and not ds.offload_params:
        ds.zero_stage, ds.offload_params = 3, True
    else:
        return None
    return r


FIX_KEYS = {"micro_batch_size": "train.micro_batch_size", "gradient_checkpointing": "model.gradient_checkpointing",
            "layers_per_group": "hybrid.layers_per_group", "generation_batch_size": "train.generation_batch_size",
            "zero_stage": "deepspeed.zero_stage", "offload_optimizer": "deepspeed.offload_optimizer",
            "lora": "model.lora", "offload_params": "deepspeed.offload_params", "critic_lora": "critic.lora",
            "critic_checkpointing": "critic.gradient_checkpointing"}


def _describe(before: Recipe, after: Recipe) -> list[str]:
    a, b = before.model_dump(), after.model_dump()
    out = []
    for key in FIX_KEYS.values():
        section, name = key.split(".")
        if a[section][name] != b[section][name]:
            value = b[section][name]
            out.append(f"{key}={'{r: 16, alpha: 32}' if name == 'lora' else json.dumps(value)}")
    return out


def suggest_fixes(recipe: Recipe, gpus_per_node: int, nodes: int, gpu_memory_gib: float,
                  host_memory_gib: Optional[float] = None, aliases: Optional[dict] = None) -> list[dict]:
    """The cheapest changes that make the plan fit: each single change that fits (repeated halvings of a
    batch size count as one), else the shortest chain of changes in ``OPTIONS`` order."""
    world = gpus_per_node * nodes

    def peak(r: Recipe) -> Optional[Plan]:
        try:
            p = plan_recipe(r, gpus_per_node, nodes, gpu_memory_gib, host_memory_gib, aliases, suggest=False)
        except RecipeError:
            return None
        return p

    fixes = []
    for option in OPTIONS:
        r = _variant(recipe, option, world)
        while r is not None:
            p = peak(r)
            if p is not None and p.fits:
                fixes.append({"set": _describe(recipe, r), "peak_gib": round(p.peak_bytes / GIB, 1)})
                break
            r = _variant(r, option, world) if option in ("micro_batch_size", "generation_batch_size") else None
    if fixes:
        return fixes
    r = recipe
    for option in OPTIONS:
        nxt = _variant(r, option, world)
        if nxt is None:
            continue
        r = nxt
        p = peak(r)
        if p is not None and p.fits:
            return [{"set": _describe(recipe, r), "peak_gib": round(p.peak_bytes / GIB, 1)}]
    return []


# --------------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def render(plan: Plan) -> str:
    """The plan as a short text table."""
    lines = [f"plan for {plan.recipe}: {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = {plan.world_size} ranks"]
    for role, m in plan.models.items():
        lines.append(f"  {role:9s} {m['params'] / 1e9:7.3f} B params ({m['trainable'] / 1e9:.3f} B trained), "
                     f"ZeRO {m['zero_stage']}, config {m['source']}")
    lines.append("per-rank memory by phase:")
    for phase, parts in plan.phases.items():
        mark = "  <- peak" if phase == plan.peak_phase else ""
        detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v)
        lines.append(f"  {phase:8s} {gib(sum(parts.values())):>10s}{mark}  ({detail})")
    lines.append(f"host memory per node (offload): {gib(plan.host_bytes_per_node)}")
    lines.append(f"tokens per step: {plan.tokens_per_step}   FLOPs per step: {plan.flops_per_step:.3g}")
    if plan.fits is not None:
        lines.append(f"fits in {plan.gpu_memory_gib:g} GiB per GPU: {'yes' if plan.fits else 'NO'}")
    for fix in plan.fixes:
        lines.append(f"  fits with --set {' --set '.join(fix['set'])}  (peak {fix['peak_gib']} GiB)")
    if plan.fits is False and not plan.fixes:
        lines.append("  no single change tried makes it fit: add GPUs (--gpus-per-node / --nodes)")
    return "\n".join(lines)


def header_lines(plan: Plan) -> list[str]:
    """The memory lines a recipes/gpu header carries (tests/recipes/test_plan.py keeps them equal)."""
    out = [f"#   {phase}: {gib(sum(parts.values()))}" + (" (peak)" if phase == plan.peak_phase else "") + ": "
           + ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items() if v >= 0.05 * GIB)
           for phase, parts in plan.phases.items()]
    out.append(f"#   host memory per node: {gib(plan.host_bytes_per_node)}")
    return out
