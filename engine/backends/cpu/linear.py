"""Decode-step linears for CPU: ``W @ x.T`` where it streams the weights faster than ``F.linear``.

`decode_linear()` is the process-wide ``F.linear`` swap the hybrid engine enters while the actor
generates (through `rlhf_engine.backends.cpu.decode_linears`, switch ``cpu.skinny_decode_linear``);
the fused decoder calls `skinny_linear` directly.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Optional

import torch


DECODE_ROWS = 16  # a linear over at most this many tokens is a decode step (batch x 1 new token)
WIDE_HEAD_ROWS = 16384  # fp32 weights with this many output rows (an LM head over a vocabulary) also go W @ x.T


_real_linear = torch._C._nn.linear  # what F.linear is before anyone (ZeRO-3, decode_linear) patches it


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, as ``weight @ x.T`` for decode-step shapes on CPU where that is faster.

    A decode step multiplies batch x 1 tokens by every weight matrix: memory-bound. On CPU the
    ``x @ W.T`` kernel behind ``F.linear`` streams bf16 weights at ~11 GB/s for 8 rows, ``W @ x.T``
    at ~17 GB/s (same products, fp32 accumulation; measured on 2 Xeon cores): decoding SmolLM2-135M
    in bf16 takes ~8-15% less time. In fp32 only a wide LM head gains (49152 x 576: ~12.7 vs ~10 GB/s;
    the layers' own matrices are slower that way). Other shapes, CUDA and autograd use the real linear
    (never ZeRO-3's wrapper)."""
    faster = weight.dtype == torch.bfloat16 or (weight.dtype == torch.float32 and weight.shape[0] >= WIDE_HEAD_ROWS)
    if (faster and weight.device.type == "cpu" and x.dtype == weight.dtype and x.dim() >= 2
            and x.numel() <= DECODE_ROWS * x.shape[-1] and not torch.is_grad_enabled()):
        out = (weight @ x.reshape(-1, x.shape[-1]).t()).t()
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return _real_linear(x, weight, bias)


@contextmanager
def decode_linear() -> Iterator[None]:
    """Route every ``F.linear`` through `skinny_linear` (decode steps of any model's own forward);
    the previous function is back on exit."""
    import torch.nn.functional as F
    real = F.linear

    @functools.wraps(real)
    def linear(x, weight, bias=None):
        if x.dim() >= 2 and x.numel() <= DECODE_ROWS * x.shape[-1]:
            return skinny_linear(x, weight, bias)
        return real(x, weight, bias)

    F.linear = linear
    try:
        yield
    finally:
        F.linear = real
