"""`deepspeed.precision: auto`: the training precision that suits this machine, chosen at run start.

On a GPU: bf16 where the device supports it, else fp32. On the CPU the answer depends on the chip:
with native bf16 matmuls (AVX512-BF16 / AMX) bf16 autocast runs a step ~2x faster than fp32, while
without them bf16 matmuls are emulated and slower than fp32. So a short probe times the matmuls of a
decoder MLP at the model's shapes (up to 2048 tokens of a micro-batch x hidden x intermediate size),
forward and input-gradient products, in fp32 and under bf16 autocast, alternating, for ~0.3 s in all, and
keeps bf16_autocast only when it is clearly (>10%) faster: fp32 is exact, so a tie goes to it. Every
rank uses rank 0's probe, so they agree. The choice and the probe's numbers go to the
console, the summary and ``run.json`` in the run folder.
"""
from __future__ import annotations

import time

import torch

from rlhf_engine.config import Recipe

BF16_MARGIN = 0.9  # bf16 must take under 90% of fp32's time
PROBE_SECONDS = 0.1  # per dtype, after at least 2 calls per half


def _shapes(recipe: Recipe) -> tuple[int, int, int]:
    """(tokens, hidden, intermediate) of one training micro-batch of the recipe's model."""
    from rlhf_engine.models import _model_config, resolve_model_path

    config = _model_config(recipe.model, resolve_model_path(recipe.model, recipe.cache_dir))
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "dim", 0) or 768)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    length = recipe.data.max_prompt_length + recipe.generation.max_new_tokens if recipe.stage == "rl" \
        else recipe.data.max_length
    tokens = max(64, min(2048, recipe.train.micro_batch_size * length))
    return tokens, hidden, inter


def _time_matmuls(tokens: int, hidden: int, inter: int, bf16: bool, seconds: float) -> float:
    """Fastest ms of one forward + input-gradient product of an MLP projection (the fastest call is
    the least disturbed by other processes on a shared machine). bf16 as autocast runs it: the
    weight cast once (autocast caches it per forward), the activations cast per call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(inter, hidden, generator=g) * hidden ** -0.5
    w = w.bfloat16() if bf16 else w
    times = []
    deadline = time.perf_counter() + seconds
    with torch.no_grad():
        while len(times) < 2 or (time.perf_counter() < deadline and len(times) < 50):
            t0 = time.perf_counter()
            h = (x.bfloat16() if bf16 else x) @ w.t()  # up projection (forward)
            _ = h @ w                                   # its input gradient (backward)
            times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def probe_cpu(tokens: int, hidden: int, inter: int, seconds: float = PROBE_SECONDS) -> dict:
    """Time fp32 against bf16 autocast at these shapes (alternating halves, so load hits both alike)."""
    for bf16 in (False, True):  # first calls pay one-time kernel selection / JIT
        _time_matmuls(min(tokens, 256), hidden, inter, bf16, 0.0)
    fp32, bf16 = [], []
    for _ in range(2):
        fp32.append(_time_matmuls(tokens, hidden, inter, False, seconds / 2))
        bf16.append(_time_matmuls(tokens, hidden, inter, True, seconds / 2))
    return {"fp32_ms": round(min(fp32), 3), "bf16_ms": round(min(bf16), 3),
            "shape": f"{tokens}x{hidden}x{inter}"}


def choose(probe: dict) -> str:
    """'bf16_autocast' when the probe's bf16 time is under BF16_MARGIN of fp32's, else 'fp32'."""
    return "bf16_autocast" if probe["bf16_ms"] < BF16_MARGIN * probe["fp32_ms"] else "fp32"


def resolve_precision(recipe: Recipe, is_main: bool = True) -> dict:
    """Replace ``deepspeed.precision: auto`` in `recipe` by the concrete precision (in place) and return
    {"precision", "chosen_by", and for a CPU probe "probe": {fp32_ms, bf16_ms, shape}}.
    Call after the process group exists, on every rank (they all take rank 0's probe)."""
    ds = recipe.deepspeed
    if ds.precision != "auto":
        return {"precision": ds.precision, "chosen_by": "recipe"}
    info: dict = {"chosen_by": "auto"}
    if torch.cuda.is_available():
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        info["device"] = torch.cuda.get_device_name()
    else:
        from rlhf_engine.distributed import broadcast_object

        probe = broadcast_object(probe_cpu(*_shapes(recipe)) if is_main else None)
        precision = choose(probe)
        info["probe"] = probe
    ds.precision = precision
    info["precision"] = precision
    if is_main:
        extra = (f" (probe {info['probe']['shape']}: fp32 {info['probe']['fp32_ms']:.1f} ms, "
                 f"bf16 {info['probe']['bf16_ms']:.1f} ms)") if "probe" in info else ""
        print(f"[precision] auto -> {precision}{extra}", flush=True)
    return info

