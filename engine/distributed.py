"""DeepSpeed plumbing: process setup, config dicts from the recipe, train and frozen engines, ZeRO helpers.

Device and backend always come from ``deepspeed.get_accelerator()``, so the same code runs on CPU
ranks (gloo) and GPUs (nccl). Batch sizes come from ``engine.config.derive_batch_sizes`` (computed
once, checked for divisibility there) and are only copied into the DeepSpeed keys here.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from rlhf_engine.config import BatchSizes, OptimConfig, Recipe
from rlhf_engine.console import report_model

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# processes
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(num_threads: Optional[int] = None) -> DistInfo:
    """Join the process group (deepspeed launcher / torchrun env) or make a world of one.

    Without a launcher (no RANK in the environment) a single-rank group is created on a free local
    port so that ``deepspeed.initialize`` works in plain scripts and tests. Torch CPU threads are set
    to ``num_threads`` or cores / ranks-on-this-node, so co-located CPU ranks don't oversubscribe.
    Calling it again is harmless.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)  # before init, so nccl binds the right GPU
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    _unlink_shm_allreduce_buffer(rank)
    local_world = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=local_device(),
                    is_main=rank == 0)


def _unlink_shm_allreduce_buffer(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    DeepSpeed's CPU backend creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    (67 MB per rank) and never unlinks it, so every multi-rank CPU run leaks RAM into /dev/shm until
    reboot (we found 19 GB after a day of test runs). Every rank maps all buffers inside
    ``init_distributed``; after a barrier the names are no longer needed, and unlinking them lets the
    kernel free the memory when the processes exit.
    """
    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(OSError):
        os.unlink(name)


def local_device() -> torch.device:
    """This rank's device: ``cpu`` on CPU ranks, ``<accelerator>:<LOCAL_RANK>`` otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    name = get_accelerator().device_name(local_rank)
    return torch.device(name if name == "cpu" else f"{name}:{local_rank}")


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (any shape, same on every rank); the input is left untouched."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return (all_reduce_sum(tensor) / world).to(tensor.dtype)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Elementwise float64 sum of ``values`` over ranks (a copy; the input is untouched). float64 keeps
    sums of token counts exact (gloo and nccl both reduce it)."""
    out = values.detach().double().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_mean(x) -> float:
    """Mean over all ranks' elements of x (any shapes; one all-reduce)."""
    x = torch.as_tensor(x).detach()
    total, n = all_reduce_sum(torch.stack([x.double().sum(), torch.tensor(float(x.numel()), dtype=torch.float64)]))
    return float(total / n.clamp(min=1))


def global_std(x: torch.Tensor) -> float:
    """Standard deviation (population) over all ranks' elements of x."""
    mean = global_mean(x)
    return global_mean((x.detach().double() - mean) ** 2) ** 0.5


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (pickled; for small things like paths, seeds, metrics)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------
# config
def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge; values from ``extra`` win (recipe ``deepspeed.extra`` is the escape hatch)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def frozen_stage(recipe: Recipe) -> int:
    """ZeRO stage for frozen models: ``frozen_zero_stage`` or 3 if the trained models use 3, else 0.

    Stages 1 and 2 only partition optimizer state and gradients, which a frozen model has none of.
    """
    ds = recipe.deepspeed
    if ds.frozen_zero_stage is not None:
        return ds.frozen_zero_stage
    return 3 if ds.zero_stage == 3 else 0


def ds_config(recipe: Recipe, sizes: BatchSizes, *, trainable: bool = True,
              zero_stage: Optional[int] = None) -> dict:
    """The DeepSpeed config dict for one model.

    ``trainable=False`` builds the config of a frozen (inference-only) model: no optimizer offload,
    no clipping, stage ``frozen_stage(recipe)`` unless ``zero_stage`` is given. Batch keys:
    ``train_batch_size = micro x accumulation x world`` exactly as derived by ``derive_batch_sizes``.
    """
    ds = recipe.deepspeed
    stage = zero_stage if zero_stage is not None else (ds.zero_stage if trainable else frozen_stage(recipe))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {stage!r}")
    pin = get_accelerator().device_name() != "cpu"  # pinned host memory only helps host<->GPU copies
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2, 3):
        # DeepSpeed's default buckets (5e8 elements = 2 GB in fp32 each) dwarf small models on CPU;
        # 5e7 keeps collectives large enough to be efficient and the buffers at 200 MB
        zero.update(reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if stage == 3:
        # keep only tiny params (norms, biases) unpartitioned; whole layers are fetched on demand
        zero.update(stage3_param_persistence_threshold=10_000, stage3_prefetch_bucket_size=5e7,
                    stage3_max_live_parameters=1e9, stage3_gather_16bit_weights_on_model_save=True)
        if ds.offload_params or (not trainable and ds.frozen_offload_params):
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if trainable and ds.offload_optimizer and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": sizes.micro_batch_size,
        "gradient_accumulation_steps": sizes.gradient_accumulation_steps,
        "train_batch_size": sizes.micro_batch_size * sizes.gradient_accumulation_steps * sizes.world_size,
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if trainable:
        cfg["gradient_clipping"] = ds.gradient_clipping
        cfg["zero_allow_untested_optimizer"] = True  # our torch AdamW is what DeepSpeed would build anyway
    if ds.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif ds.precision == "bf16_autocast":
        # fp32 parameters and a plain (fused) AdamW; matmuls in bf16 inside the engine's forward.
        # On CPU DeepSpeed's bf16 optimizer wrappers cost ~1 s per step for a 135M model (master-copy
        # traffic, overflow checks); this path steps in 0.12 s (measured here).
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif ds.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return _merge(cfg, ds.extra)


def config_zero_stage(ds_cfg: dict) -> int:
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))


def autocast_dtype(engine) -> Optional[torch.dtype]:
    """The torch.autocast dtype a DeepSpeed engine runs its forward under (None: no autocast)."""
    enabled = getattr(engine, "torch_autocast_enabled", None)
    return engine.torch_autocast_dtype() if enabled is not None and enabled() else None


def config_dtype(ds_cfg: dict) -> torch.dtype:
    """The weight dtype a DeepSpeed config selects (bf16, fp16 or fp32; autocast keeps fp32 weights)."""
    if ds_cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


@contextlib.contextmanager
def zero_init_context(ds_cfg: dict) -> Iterator[None]:
    """Build models inside this to partition them at construction under ZeRO-3 (no-op otherwise).

    Two mechanisms, both needed: ``HfDeepSpeedConfig`` (kept alive for the whole block) makes
    transformers' ``from_pretrained`` / ``from_config`` partition layer by layer and load or
    initialise the weights into the shards; ``deepspeed.zero.Init`` covers modules built directly
    (a value head, ``nn.Linear``). Parameters come out in the config's dtype.
    """
    if config_zero_stage(ds_cfg) != 3:
        yield
        return
    import transformers.integrations.deepspeed as hf_ds

    previous = hf_ds._hf_deepspeed_config_weak_ref  # an outer HfDeepSpeedConfig (e.g. HF Trainer) is restored
    hf_config = hf_ds.HfDeepSpeedConfig(ds_cfg)  # transformers holds only a weakref: keep this local alive
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
            yield
    finally:
        # unset so later non-ZeRO-3 models are built whole; note transformers' generate() then no longer
        # infers synced_gpus, so pass synced_gpus=True when generating with a still-partitioned model
        hf_ds._hf_deepspeed_config_weak_ref = previous
        del hf_config


# --------------------------------------------------------------------------------------------
# engines
def lr_lambda(optim: OptimConfig, total_steps: int):
    """LR multiplier per optimizer step: linear warmup to 1, then constant / linear / cosine to 0 at total_steps."""
    warmup = optim.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _make_optimizer(params: list[nn.Parameter], optim: OptimConfig, lr: float, offload: bool):
    kwargs = dict(lr=lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if not offload:
        return torch.optim.AdamW(params, **kwargs, fused=True)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    except Exception as err:  # the op is JIT-compiled (C++ toolchain + ninja) on first use
        raise RuntimeError(
            f"deepspeed.offload_optimizer needs DeepSpeed's CPU Adam op, which failed to build/load ({err}). "
            "Install a C++ compiler and ninja (first build takes ~1-2 min), or set deepspeed.offload_optimizer: "
            "false in the recipe.") from err


def create_train_engine(model: nn.Module, recipe: Recipe, sizes: BatchSizes, *, lr: Optional[float] = None,
                        total_steps: int) -> deepspeed.DeepSpeedEngine:
    """Wrap a trainable model in a DeepSpeed engine with AdamW, the recipe's LR schedule and clipping.

    ``lr`` overrides ``optim.lr`` (critic). ``total_steps`` counts optimizer steps (accumulation
    boundaries): DeepSpeed advances the schedule only there. Call ``engine.backward(loss)`` and
    ``engine.step()`` after every micro-batch; the optimizer steps once per accumulation window.
    Precision follows ``deepspeed.precision`` (bf16/fp16 weights, fp32 master copies in the optimizer).
    """
    cfg = ds_config(recipe, sizes, trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("create_train_engine: the model has no parameter with requires_grad=True")
    offload = "offload_optimizer" in cfg["zero_optimization"]
    optimizer = _make_optimizer(params, recipe.optim, lr if lr is not None else recipe.optim.lr, offload)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe.optim, total_steps))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg,
                                      model_parameters=params)
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        # DeepSpeed all-reduces even a world of one, flattening every gradient into buckets and
        # back: ~0.3-1 s per backward of a 135M model on CPU, for nothing
        engine.enable_backward_allreduce = False
    report_model(engine, zero_stage=engine.zero_optimization_stage(), trained=True,
                 autocast=bool(cfg.get("torch_autocast", {}).get("enabled")))
    return engine


def create_frozen_engine(model: nn.Module, recipe: Recipe, sizes: BatchSizes, *,
                         zero_stage: Optional[int] = None) -> Union[nn.Module, deepspeed.DeepSpeedEngine]:
    """An inference-only model (reference, reward): eval mode, no gradients, recipe precision.

    Stage 3 -> a DeepSpeed engine without optimizer whose parameters stay partitioned (build the
    model under ``zero_init_context(ds_config(..., trainable=False))``); stage 0 -> the plain module
    moved to this rank's device (a full replica).
    """
    cfg = ds_config(recipe, sizes, trainable=False, zero_stage=zero_stage)
    model.eval()
    model.requires_grad_(False)
    report_model(model, zero_stage=config_zero_stage(cfg), trained=False,
                 autocast=bool(cfg.get("torch_autocast", {}).get("enabled")))
    if config_zero_stage(cfg) != 3:
        model = model.to(device=local_device())
        if not cfg.get("torch_autocast", {}).get("enabled"):
            return model.to(dtype=config_dtype(cfg))
        # the model keeps its own dtype and computes like the autocast actor (same kernels, same
        # numerics: the KL of the untrained actor is exactly 0)
        model.forward = torch.autocast(local_device().type, dtype=torch.bfloat16)(model.forward)
        return model
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine


def build_frozen(load, recipe: Recipe, sizes: BatchSizes, *, zero_stage: Optional[int] = None):
    """``load()`` a frozen model (reference, reward) and wrap it with ``create_frozen_engine``.

    ``load`` runs inside the frozen config's ZeRO-3 init context, so at stage 3 each rank only ever
    holds its partition of the weights (never the whole model, not even while loading).
    """
    with zero_init_context(ds_config(recipe, sizes, trainable=False, zero_stage=zero_stage)):
        model = load()
    return create_frozen_engine(model, recipe, sizes, zero_stage=zero_stage)


# --------------------------------------------------------------------------------------------
# ZeRO helpers
def unwrap(module_or_engine: nn.Module) -> nn.Module:
    """The user module inside a DeepSpeed engine (or the module itself)."""
    return module_or_engine.module if isinstance(module_or_engine, deepspeed.DeepSpeedEngine) else module_or_engine


def is_zero3(module_or_engine: nn.Module) -> bool:
    """True if the parameters are ZeRO-3 partitioned (they carry DeepSpeed's ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in unwrap(module_or_engine).parameters())


def gather_full_state_dict(engine: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """Whole-model state dict on rank 0 (CPU tensors, in the model's dtype); None on other ranks.

    Collective under ZeRO-3: every rank must call it. Parameters are gathered one at a time, so
    peak extra memory is one full parameter, not the model.
    """
    module = unwrap(engine)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}  # tied weights appear under several names: gather once
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in gathered:
            if hasattr(tensor, "ds_id"):
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    gathered[id(tensor)] = tensor.detach().cpu().clone() if is_main else None
            else:
                gathered[id(tensor)] = tensor.detach().cpu().clone() if is_main else None
        out[name] = gathered[id(tensor)]
    return out if is_main else None
