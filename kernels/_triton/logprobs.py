"""Triton logits -> (logprob, entropy) forward and backward; same interface as ``kernels/_chunked.py``.

Forward: one program per row streams the vocabulary in BLOCK_V pieces with an online logsumexp
(running max of the raw logits, rescaled running sum), so nothing of size V is ever stored.
Backward: one program per (row, vocab block) recomputes p from the saved (m, logs) and writes the
gradient block; there is no cross-block dependency, so it parallelises over the whole [N, V].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOGP_FLOOR = -1000.0  # exp(-1000) == 0 in fp32: clamping is exact and avoids 0 * -inf


@triton.jit
def _fwd_kernel(X, stride_a, stride_r, stride_v, R, V, LAB, LP, ENT, M, LOGS, inv_t,
                HAS_LABELS: tl.constexpr, WANT_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = X + (row // R) * stride_a + (row % R) * stride_r
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(base + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(z, 0))
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        t = (z - shift) * inv_t  # shift before scaling keeps large logits exact
        d = tl.where(s > 0, (m - shift) * inv_t, 0.0)  # s == 0: nothing finite yet, nothing to rescale
        alpha = tl.exp(d)
        if WANT_ENT:
            # w = sum e^t * t relative to the current shift: H = logs - w/s without cancellation
            t = tl.maximum(t, _LOGP_FLOOR)
            e = tl.exp(t)
            w = alpha * (w + d * s) + tl.sum(e * t, 0)
            s = alpha * s + tl.sum(e, 0)
        else:
            s = alpha * s + tl.sum(tl.exp(t), 0)
        m = new_m
    m = tl.where(m == float("-inf"), 0.0, m)
    logs = tl.log(s)
    tl.store(M + row, m)
    tl.store(LOGS + row, logs)
    if WANT_ENT:
        tl.store(ENT + row, logs - w / s)
    if HAS_LABELS:
        lab = tl.load(LAB + row)
        valid = (lab >= 0) & (lab < V)
        zl = tl.load(base + tl.where(valid, lab, 0) * stride_v).to(tl.float32)
        tl.store(LP + row, tl.where(valid, (zl - m) * inv_t - logs, 0.0))


@triton.jit
def _bwd_kernel(X, stride_a, stride_r, stride_v, R, V, LAB, M, LOGS, ENT, GLP, GENT, OUT, inv_t,
                HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = offs < V
    base = X + (row // R) * stride_a + (row % R) * stride_r
    z = tl.load(base + offs * stride_v, mask=inb, other=float("-inf")).to(tl.float32)
    logp = (z - tl.load(M + row)) * inv_t - tl.load(LOGS + row)
    coef = tl.zeros((), tl.float32)
    if HAS_GLP:
        lab = tl.load(LAB + row)
        g_lp = tl.where((lab >= 0) & (lab < V), tl.load(GLP + row), 0.0)  # ignored: no gradient
        coef = coef + g_lp
    if HAS_GENT:
        logp = tl.maximum(logp, _LOGP_FLOOR)
        coef = coef + tl.load(GENT + row) * (logp + tl.load(ENT + row))
    grad = -tl.exp(logp) * coef
    if HAS_GLP:
        grad = grad + tl.where(offs == lab, g_lp, 0.0)
    grad = grad * inv_t
    tl.store(OUT + row * V + offs, grad.to(OUT.dtype.element_ty), mask=inb)


MAX_BLOCK_V = 4096  # vocab elements per program step; read at call time (tests shrink it)


def _block(V: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(V))


def _check(x3):
    if x3.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"kernels (triton backend): logits dtype {x3.dtype} is not supported; "
                        "use float32/bfloat16/float16 or KERNELS_BACKEND=torch")


def forward(x3, labels, temperature: float, want_entropy: bool):
    _check(x3)
    A, R, V = x3.shape
    N = A * R
    f32 = dict(dtype=torch.float32, device=x3.device)
    m, logs = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if want_entropy else None
    lp = torch.empty(N, **f32) if labels is not None else None
    if N == 0:
        return lp, ent, (m, logs)
    _fwd_kernel[(N,)](x3, x3.stride(0), x3.stride(1), x3.stride(2), R, V,
                      labels if labels is not None else m, lp if lp is not None else m,
                      ent if ent is not None else m, m, logs, 1.0 / temperature,
                      HAS_LABELS=labels is not None, WANT_ENT=want_entropy, BLOCK_V=_block(V))
    return lp, ent, (m, logs)


def backward(x3, labels, temperature, stats, entropy, g_lp, g_ent, out3):
    """``out3`` must be contiguous [A, R, V] (the kernel writes it as [A*R, V])."""
    _check(x3)
    m, logs = stats
    A, R, V = x3.shape
    N = A * R
    if N == 0:
        return out3
    assert out3.is_contiguous()
    block = _block(V)
    dummy = m
    _bwd_kernel[(N, triton.cdiv(V, block))](
        x3, x3.stride(0), x3.stride(1), x3.stride(2), R, V,
        labels if labels is not None else dummy, m, logs,
        entropy if entropy is not None else dummy,
        g_lp.float().contiguous() if g_lp is not None else dummy,
        g_ent.float().contiguous() if g_ent is not None else dummy,
        out3, 1.0 / temperature,
        HAS_GLP=g_lp is not None and labels is not None, HAS_GENT=g_ent is not None, BLOCK_V=block)
    return out3
