"""Triton KL estimators: elementwise forward and backward kernels (see ``kernels/kl.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CODES = {"k1": 1, "k2": 2, "k3": 3}
_BLOCK = 1024


@triton.jit
def _series_k3(r):
    # exp(-r) - 1 + r for |r| < 0.25 by Horner (no cancellation near 0)
    acc = 1.0 / 2.0 - r * (1.0 / 6 - r * (1.0 / 24 - r * (1.0 / 120 - r * (1.0 / 720 - r * (
        1.0 / 5040 - r * (1.0 / 40320 - r * (1.0 / 362880)))))))
    return r * r * acc


@triton.jit
def _series_dk3(r):
    # 1 - exp(-r) for |r| < 0.25 by Horner
    return r * (1.0 - r * (1.0 / 2 - r * (1.0 / 6 - r * (1.0 / 24 - r * (1.0 / 120 - r * (
        1.0 / 720 - r * (1.0 / 5040 - r * (1.0 / 40320))))))))


@triton.jit
def _log_ratio(LP, REF, offs, inb):
    lp = tl.load(LP + offs, mask=inb, other=0.0).to(tl.float32)
    return lp - tl.load(REF + offs, mask=inb, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(LP, REF, OUT, n, EST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    r = _log_ratio(LP, REF, offs, inb)
    if EST == 1:
        k = r
    elif EST == 2:
        k = 0.5 * r * r
    else:
        k = tl.where(tl.abs(r) < 0.25, _series_k3(r), tl.exp(-r) - 1.0 + r)
    tl.store(OUT + offs, k, mask=inb)


@triton.jit
def _bwd_kernel(LP, REF, G, GLP, GREF, n, EST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    r = _log_ratio(LP, REF, offs, inb)
    g = tl.load(G + offs, mask=inb, other=0.0)
    if EST == 1:
        d = g
    elif EST == 2:
        d = g * r
    else:
        d = g * tl.where(tl.abs(r) < 0.25, _series_dk3(r), 1.0 - tl.exp(-r))
    tl.store(GLP + offs, d.to(GLP.dtype.element_ty), mask=inb)
    tl.store(GREF + offs, (-d).to(GREF.dtype.element_ty), mask=inb)


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, ref, est):
        lp_c, ref_c = lp.contiguous(), ref.contiguous()
        out = torch.empty(lp.shape, dtype=torch.float32, device=lp.device)
        n = lp_c.numel()
        if n:
            _fwd_kernel[(triton.cdiv(n, _BLOCK),)](lp_c, ref_c, out, n, EST=est, BLOCK=_BLOCK)
        ctx.save_for_backward(lp_c, ref_c)
        ctx.est = est
        return out

    @staticmethod
    def backward(ctx, g):
        lp, ref = ctx.saved_tensors
        g = g.float().contiguous()
        glp, gref = torch.empty_like(lp), torch.empty_like(ref)
        n = lp.numel()
        if n:
            _bwd_kernel[(triton.cdiv(n, _BLOCK),)](lp, ref, g, glp, gref, n, EST=ctx.est, BLOCK=_BLOCK)
        return glp, gref, None


def kl_penalty(logprobs, ref_logprobs, estimator):
    for t in (logprobs, ref_logprobs):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"kernels.kl_penalty (triton backend): dtype {t.dtype} not supported; "
                            "use float32/bfloat16/float16 or KERNELS_BACKEND=torch")
    return _KL.apply(logprobs, ref_logprobs, _CODES[estimator])
