"""Hybrid engine: switch a (ZeRO-3) actor between training and fast generation.

``with HybridEngine(actor).inference() as model: model.generate(...)`` yields the actor's own
Hugging Face model, ready for generation at unsharded speed, and puts everything back on exit.

Why: a ZeRO-3 model keeps only a shard of every weight per rank; its forward pre/post hooks gather
and release each submodule's weights, on every forward, so each generated token pays a full
model all-gather plus Python hook overhead (~10x slower than unsharded, even inside
``GatheredParameters``, because the hooks still run).

How (architecture-agnostic, exact; no injected kernels, no second model):
1. mode switch: eval mode, KV cache on, gradient-checkpointing flags off (each module's own flags
   are saved and restored, so mixed train/eval submodules come back exactly as they were);
2. hooks off: the DeepSpeedEngine's per-forward bookkeeping hooks (timers, profiler) and, for
   ZeRO-3, the fetch/release hooks are taken out of the module hook dicts (the very same hook
   objects go back, in their original order, on exit);
3. ZeRO-3: every partitioned parameter is all-gathered *in place* (``param.all_gather``).
   Generation then runs the plain PyTorch forward on full weights: the same ops as an unsharded
   model, so the same tokens;
4. LoRA (peft): adapters are merged into the (gathered) base weights for generation. On exit they
   are unmerged; for ZeRO-3 the gathered copies are simply discarded (the shards ``ds_tensor`` were
   never touched), for stages 0-2 the base weights are restored from a saved copy, bit for bit;
5. generation dtype / attention (optional): every parameter is pointed at a cast copy (e.g. bf16:
   an autocast-trained actor keeps fp32 weights, and bf16 weights decode faster on CPU than fp32
   weights under autocast) and the attention kernel may be switched (CPU: train with eager, whose
   backward is fast, generate with SDPA); on exit the original tensors and kernel come back;
6. decode steps (CPU backend only): linears over a few rows run as ``W @ x.T``, a faster kernel
   for memory-bound skinny products, and Llama-family actors decode with the fused step (static KV
   cache, fused QKV and gate/up matmuls); see ``rlhf_engine.backends.cpu``;
7. exit: parameters we gathered are re-partitioned with ``has_been_updated=False`` (the gathered
   memory is freed, the shards and the optimizer state are untouched), hooks and flags restored.

We chose in-place gathering over an "inference copy" (a second, unsharded module filled from the
shards): both hold one full model per rank while generating, but in-place needs no extra
construction, no copy of the weights, and works for any architecture, including peft wrappers.

Memory: whole-model mode holds one full model per rank while inside the context (as
``GatheredParameters`` would). ``layers_per_group=k`` bounds it instead to the non-layer weights
(embeddings, head, final norm) plus k decoder layers: the layers are gathered group by group
inside every forward (one coalesced all-gather per group, not one per submodule) and released right
after. That trades speed for memory (one all-gather of the layer weights per token); it needs the
ranks to step together (``synced_gpus=True`` is the default then) and runs LoRA adapters unmerged.

ZeRO-3 also swaps `torch.nn.functional.linear` for a memory-saving autograd wrapper, process-wide
and permanently; inside the context the real function is back (see `original_linear`), so every
model generates at the speed it would have in a process without ZeRO-3.

Stages 0-2: mode switch, engine hooks off, LoRA merge (near-zero cost; with LoRA, a copy of the
adapted base weights is held while generating so they can be restored exactly).
Timings of the last round trip are in ``HybridEngine.last_timings``: gather_s (entry: hooks off,
gather, merge), generate_s (time spent inside the ``with`` body), release_s (exit).
"""
from __future__ import annotations

import functools
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from rlhf_engine.backends import cpu as cpu_backend
from rlhf_engine.distributed import autocast_dtype, is_zero3

try:  # deepspeed is a hard dependency of the project; the import guard only keeps errors clear
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
except ImportError:  # pragma: no cover
    ZeroParamStatus = None


class _CastWeights:
    """Point every floating parameter at a `dtype` copy; `restore()` puts the original tensors back
    (the very same storage, so weights and optimizer state are bit-identical afterwards)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.saved = [(p, p.data) for p in module.parameters() if p.is_floating_point() and p.dtype != dtype]
        for p, data in self.saved:
            p.data = data.to(dtype)

    def restore(self) -> None:
        for p, data in self.saved:
            p.data = data
        self.saved = []


def _device_type(module: nn.Module) -> str:
    """'cpu' or 'cuda' (etc.): where the module's parameters live, as torch.autocast names it."""
    param = next(module.parameters(), None)
    return param.device.type if param is not None else "cpu"


def _sync_device() -> None:
    """Wait for queued device work so timings measure the work, not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def original_linear() -> Iterator[None]:
    """Run with the real `torch.nn.functional.linear`.

    Building a model under `deepspeed.zero.Init` replaces `F.linear`, process-wide and for good, by
    ZeRO's memory-efficient autograd wrapper: ~100 us extra per call, pure overhead without gradients
    (every linear of every model in the process pays it). Generation runs without it, as in a process
    that never used ZeRO-3. No-op when nothing was patched."""
    import torch.nn.functional as F
    try:
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Patcher
    except ImportError:  # pragma: no cover
        Patcher = None
    original = getattr(Patcher, "linear_bk", None)
    patched = F.linear
    if original is None or patched is original:
        yield
        return
    F.linear = original
    try:
        yield
    finally:
        F.linear = patched


# ----------------------------------------------------------------------------------------------
# ZeRO-3 plumbing: gather/release parameters, detach/reattach the ZeRO module hooks
def _gather(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """All-gather the partitioned params among `params`; return exactly those (to release later).

    Every rank must call this with the same parameters (same model, same order by ds_id)."""
    todo = sorted({id(p): p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE}.values(),
                  key=lambda p: p.ds_id)
    if todo:
        todo[0].all_gather(param_list=todo)
    return todo


def _release(params: list[nn.Parameter]) -> None:
    """Free the gathered full tensors; the shards (`p.ds_tensor`) are kept as they were."""
    if params:
        params[0].partition(param_list=params, has_been_updated=False)


def _zero_offload(engine) -> Optional[object]:
    """The DeepSpeedZeRoOffload that owns the ZeRO-3 hooks of `engine`, or None (stages 0-2)."""
    opt = getattr(engine, "optimizer", None)
    if opt is not None and hasattr(opt, "parameter_offload"):
        return opt.parameter_offload
    if opt is not None and hasattr(opt, "forward_hooks") and hasattr(opt, "fwd_pre_hook"):
        return opt  # frozen ZeRO-3 engines (no optimizer) keep a bare DeepSpeedZeRoOffload here
    return None


class _PlainParameterDicts:
    """ZeRO-3 replaces each module's `_parameters` with a ZeROOrderedDict whose `__getitem__` runs
    Python checks on every weight access; while gathered we swap in plain dicts holding the same
    Parameter objects (measurably faster per token) and put the very same ZeRO dicts back on exit."""

    def __init__(self, root: nn.Module):
        self.saved = [(m, m._parameters) for m in root.modules() if type(m._parameters) is not dict]
        for m, zero_dict in self.saved:
            m._parameters = dict(zero_dict)

    def restore(self) -> None:
        for m, zero_dict in self.saved:
            m._parameters = zero_dict
        self.saved = []


class _DetachedHooks:
    """Takes given hook handles out of their module hook dicts; `restore()` puts the same hooks back
    at their original positions (hooks others added or removed meanwhile are respected)."""

    def __init__(self, handles: list):
        self.ids = {h.id for h in handles}
        dicts = {}
        for h in handles:
            d = h.hooks_dict_ref()
            if d is not None and h.id in d:
                dicts[id(d)] = d
        self.saved = [(d, list(d.items())) for d in dicts.values()]
        for d, _ in self.saved:
            for key in [k for k in d if k in self.ids]:
                del d[key]

    def restore(self) -> None:
        for d, before in self.saved:
            now = dict(d)
            merged = [(k, v) for k, v in before if k in self.ids or k in now]
            merged += [(k, v) for k, v in now.items() if k not in dict(before)]
            d.clear()
            d.update(merged)
        self.saved = []


def _layer_stack(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks: the nn.ModuleList holding the most parameters."""
    def numel(m):
        return sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters())
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"hybrid.layers_per_group needs a model with a list of layers (nn.ModuleList); "
                         f"{type(model).__name__} has none: remove hybrid.layers_per_group from the recipe")
    return max(lists, key=numel)


class _GroupGather:
    """Forward hooks that gather each group of k layers before its first layer runs and release it
    after its last layer: peak memory = non-layer weights + k layers."""

    def __init__(self, layers: nn.ModuleList, layers_per_group: int):
        self.handles, self.live = [], {}
        self.gathers = 0
        for start in range(0, len(layers), layers_per_group):
            group = list(layers[start:start + layers_per_group])
            params = [p for m in group for p in m.parameters()]
            for layer in group:
                self.handles.append(layer.register_forward_pre_hook(functools.partial(self._pre, start, params)))
            self.handles.append(group[-1].register_forward_hook(functools.partial(self._post, start)))

    def _pre(self, key, params, module, args):
        if key not in self.live:
            self.live[key] = _gather(params)
            self.gathers += 1

    def _post(self, key, module, args, output):
        _release(self.live.pop(key, []))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for key in list(self.live):
            _release(self.live.pop(key))


# ----------------------------------------------------------------------------------------------
# mode switch and LoRA
class _ModeSwitch:
    """eval mode, KV cache on, gradient checkpointing off; `restore()` brings each flag back."""

    def __init__(self, root: nn.Module, hf_model: nn.Module):
        modules = list(root.modules())
        self.training = [(m, m.training) for m in modules]
        self.checkpointing = [(m, m.gradient_checkpointing) for m in modules
                              if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
        self.configs = [c for c in (getattr(hf_model, "config", None), getattr(hf_model, "generation_config", None))
                        if c is not None and hasattr(c, "use_cache")]
        self.use_cache = [c.use_cache for c in self.configs]
        root.eval()
        for m, _ in self.checkpointing:
            m.gradient_checkpointing = False
        for c in self.configs:
            c.use_cache = True

    def restore(self) -> None:
        for m, flag in self.training:
            m.training = flag
        for m, flag in self.checkpointing:
            m.gradient_checkpointing = flag
        for c, flag in zip(self.configs, self.use_cache):
            c.use_cache = flag


def _lora_layers(root: nn.Module) -> list[nn.Module]:
    """peft tuner layers (LoRA & co) with adapters to merge; [] when peft is absent or unused."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in root.modules() if isinstance(m, BaseTunerLayer) and not m.merged
            and not getattr(m, "disable_adapters", False) and m.active_adapters]


class _LoraMerge:
    """Merge adapters into the base weights for generation; `restore()` marks them unmerged again.

    Base weights that are temporary copies here (gathered ZeRO-3 weights, dtype-cast copies, ids in
    `temporary`) are merged into and then simply dropped by their own restore action: no backup,
    no unmerge. The others are the real training weights (stages 0-2, ZeRO-3 persistent params):
    they are saved first and copied back bit for bit (an unmerge would leave rounding behind)."""

    def __init__(self, layers: list[nn.Module], temporary: set[int]):
        self.layers = layers
        self.saved = [(p, p.detach().clone()) for m in layers for p in m.get_base_layer().parameters()
                      if id(p) not in temporary]

    def merge(self) -> None:
        """Separate from __init__ so that `restore` is registered first: a merge failing halfway
        still gets every saved weight back."""
        with torch.no_grad():
            for m in self.layers:
                m.merge()

    def restore(self) -> None:
        with torch.no_grad():
            for p, copy in self.saved:
                p.copy_(copy)
        for m in self.layers:
            m.merged_adapters.clear()  # peft's own record of what is merged (`m.merged` reads it)
        self.saved = []


def _hf_model(module: nn.Module) -> nn.Module:
    """The Hugging Face model inside `module` (a peft wrapper's base model, or the module itself)."""
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module
    if not (hasattr(inner, "generate") and hasattr(inner, "config")):
        raise TypeError(f"HybridEngine needs a Hugging Face causal LM (with .generate and .config); got "
                        f"{type(inner).__name__}: pass the DeepSpeedEngine of an AutoModelForCausalLM")
    return inner


# ----------------------------------------------------------------------------------------------
class HybridEngine:
    """Switches an actor between training mode and fast generation (see the module docstring).

    Args:
        actor_engine_or_module: a DeepSpeedEngine (any ZeRO stage) wrapping an HF causal LM (optionally
            a peft model), or the plain HF model itself (no ZeRO-3 then).
        layers_per_group: gather k decoder layers at a time to bound memory (ZeRO-3 only); None =
            gather the whole model once.
        enabled: False keeps the ZeRO-3 weights sharded and the hooks on (slow; for comparisons).
        dtype: generate with the weights cast to this dtype (a temporary copy; the trained tensors are
            restored untouched). Default: the engine's autocast dtype if it has one, else no cast.
        attn_implementation: attention kernel while generating (e.g. "sdpa"), restored on exit.
    """

    def __init__(self, actor_engine_or_module, *, layers_per_group: Optional[int] = None, enabled: bool = True,
                 dtype: Optional[torch.dtype] = None, attn_implementation: Optional[str] = None):
        if layers_per_group is not None and layers_per_group <= 0:
            raise ValueError(f"hybrid.layers_per_group must be a positive number of layers, got {layers_per_group}")
        engine = actor_engine_or_module
        self.module: nn.Module = getattr(engine, "module", engine)  # DeepSpeedEngine.module or the model
        # DeepSpeedEngine's own forward hooks (timers, profiler, ZeRO-3 parameter discovery): per-token
        # bookkeeping generation does not need; detached while generating, at every stage
        self.engine_hooks = [h for h in (getattr(engine, "module_forward_pre_hook", None),
                                         getattr(engine, "module_forward_post_hook", None)) if h is not None]
        self.model = _hf_model(self.module)
        self.offload = _zero_offload(engine)
        if self.offload is None and is_zero3(self.module):
            raise TypeError("the actor has ZeRO-3 partitioned parameters but no DeepSpeed engine was given: "
                            "pass the DeepSpeedEngine returned by deepspeed.initialize to HybridEngine")
        self.layers_per_group = layers_per_group
        self.enabled = enabled
        # generate() bypasses the engine's forward and its autocast: an autocast engine's weights
        # are cast for generation instead (bf16 weights decode ~1.3x faster than fp32 under autocast)
        self.dtype = dtype or autocast_dtype(engine)
        self.attn_implementation = attn_implementation
        self.last_timings: dict[str, float] = {}

    @property
    def sharded(self) -> bool:
        """True when the actor is ZeRO-3 partitioned (the expensive path)."""
        return self.offload is not None

    @contextmanager
    def inference(self) -> Iterator[nn.Module]:
        """Yield the HF model ready for `generate()` (pass-through kwargs); restore training on exit.

        Example: `with hybrid.inference() as model: out = model.generate(input_ids, attention_mask=mask,
        max_new_tokens=32)` with input_ids/mask [batch, prompt_len] -> out [batch, prompt_len + new]."""
        t0 = time.perf_counter()
        undo = ExitStack()  # restore actions, run in reverse order on exit (also after an error)
        groups = None
        temporary: set[int] = set()  # ids of params whose data is a copy made here (dropped on exit)
        try:
            undo.callback(_ModeSwitch(self.module, self.model).restore)
            if self.enabled:
                undo.enter_context(original_linear())
                undo.enter_context(cpu_backend.decode_linears())  # no-op unless the CPU backend runs
                undo.callback(_DetachedHooks(self.engine_hooks).restore)
                if self.sharded:
                    groups, gathered = self._enter_sharded(undo)
                    temporary.update(map(id, gathered))
            if self.dtype is not None and groups is None:
                cast = _CastWeights(self.module, self.dtype)
                undo.callback(cast.restore)
                temporary.update(id(p) for p, _ in cast.saved)
            elif self.dtype is not None:  # grouped layers are gathered mid-forward: cast on the fly
                undo.enter_context(torch.autocast(_device_type(self.module), dtype=self.dtype))
            if self.attn_implementation and self.attn_implementation != self.model.config._attn_implementation:
                undo.callback(self.model.set_attn_implementation, self.model.config._attn_implementation)
                self.model.set_attn_implementation(self.attn_implementation)
            lora = _lora_layers(self.module)
            if lora and self.enabled and groups is None:
                merge = _LoraMerge(lora, temporary)
                undo.callback(merge.restore)
                merge.merge()
            if self.sharded and "generate" not in self.model.__dict__:
                self._default_synced_gpus(synced=not self.enabled or groups is not None)
                undo.callback(self.model.__dict__.pop, "generate", None)
            _sync_device()
            t1 = time.perf_counter()
            yield self.model
            _sync_device()
            t2 = time.perf_counter()
        finally:
            t_exit = time.perf_counter()
            undo.close()
        _sync_device()
        t3 = time.perf_counter()
        self.last_timings = {"gather_s": t1 - t0, "generate_s": t2 - t1, "release_s": t3 - t_exit}
        if groups is not None:
            self.last_timings["group_gathers"] = groups.gathers

    def _enter_sharded(self, undo: ExitStack) -> tuple[Optional[_GroupGather], list[nn.Parameter]]:
        """Detach the ZeRO hooks and gather the weights (all, or all but the layers in group mode);
        register the matching restore actions on `undo`. Returns (layer groups or None, the params
        gathered here, whose full data is dropped again on exit)."""
        params = list(self.module.parameters())
        if any(p.ds_status == ZeroParamStatus.INFLIGHT for p in params):
            self.offload.partition_all_parameters()  # wait for and drop a prefetch left in flight
        handles = [*self.offload.forward_hooks, *self.offload.backward_hooks, self.offload.fwd_pre_hook]
        undo.callback(_DetachedHooks(handles).restore)
        undo.callback(_PlainParameterDicts(self.module).restore)
        if self.layers_per_group is None:
            gathered = _gather(params)
            undo.callback(_release, gathered)
            return None, gathered
        layers = _layer_stack(self.model)
        in_layers = {id(p) for p in layers.parameters()}
        gathered = _gather([p for p in params if id(p) not in in_layers])
        undo.callback(_release, gathered)
        groups = _GroupGather(layers, self.layers_per_group)
        undo.callback(groups.remove)
        return groups, gathered

    def _default_synced_gpus(self, synced: bool) -> None:
        """HF turns `synced_gpus` on for any ZeRO-3 run (a collective per token). Gathered weights need
        no collectives in forward, so ranks may stop independently; sharded/grouped forwards must not."""
        original = type(self.model).generate.__get__(self.model)

        @functools.wraps(original)
        def generate(*args, **kwargs):
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                kwargs.setdefault("synced_gpus", synced)
            return original(*args, **kwargs)

        self.model.generate = generate


def inference(actor, **kwargs):
    """Shortcut: `with hybrid.inference(actor) as model:`; kwargs as for HybridEngine.

    Keep one HybridEngine per actor to read its `last_timings`."""
    return HybridEngine(actor, **kwargs).inference()
