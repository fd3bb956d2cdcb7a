"""Autograd Function behind ``kernels.linear_logprobs``: logprobs of labels under hidden @ weight.T.

Tiles of [token chunk, vocab block] logits are computed by a matmul, used, and dropped:
- forward: per token chunk, logsumexp over the vocabulary (one full-row tile through the backend
  kernel, or an online merge over vocab blocks), plus the label logit; saves per-row stats only;
- backward: recompute each tile, turn it into grad_logits in place (the backend's backward or
  ``_chunked.block_grad``), then grad_hidden += grad_logits @ W_block and
  grad_weight[block] += grad_logits^T @ h_chunk, both accumulated in float32 (when all tokens fit
  one chunk, grad_weight[block] is a single matmul, which accumulates in float32 internally).
Two tilings, same loops:
- rows (Triton backend): vocab block = V, so the Triton logprob kernels see whole rows; token chunk
  sized by a byte budget; a float32 [V, H] accumulator for grad_weight (cheap on a GPU).
- blocks (torch backend): vocab blocks (``vocab_block``) with the vocab loop *outside* the token
  loop in the backward, so grad_weight is finished block by block (float32 accumulator of one block
  only) and its matmul reduces over a long token chunk (efficient on CPU).
"""

from __future__ import annotations

import torch

from . import _chunked

VOCAB_BLOCK = 4096  # torch backend: vocab columns per tile (tokens per tile = TILE_ELEMS // this) ...
WEIGHT_BLOCK_ELEMS = 1 << 24  # ... fewer when H > 4096, so a [block, H] weight slice (and the matmul
#   library's packed copy of it) stays <= 32 MB in bf16. Smaller blocks cost time: grad_hidden is
#   accumulated once per block.


def vocab_block(V: int, H: int, rows_mode: bool = False) -> int:
    """Vocab columns per tile: all of them for the Triton tiling, else VOCAB_BLOCK bounded by H."""
    if rows_mode:
        return V
    return max(1, min(V, VOCAB_BLOCK, max(256, WEIGHT_BLOCK_ELEMS // H)))


def _mm_acc(acc, a, b):
    """acc (fp32) += a @ b. Half inputs: the matmul runs in their dtype (AMX / tensor cores, fp32
    accumulation inside) and its result is added; fp32 inputs: one in-place addmm."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += torch.mm(a, b)


class LinearLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], labels [N] int64) -> (logprobs [N], entropy [N] or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, want_entropy, chunk, rows_mode, impl):
        N, V = hidden.shape[0], weight.shape[0]
        wd = _chunked.work_dtype(hidden.dtype)
        vb = vocab_block(V, hidden.shape[1], rows_mode)
        lp = torch.empty(N, dtype=wd, device=hidden.device)
        ent = torch.empty(N, dtype=wd, device=hidden.device) if want_entropy else None
        buf = hidden.new_empty(min(chunk, N) * vb)  # one tile of logits, reused
        stats = []
        if not rows_mode:  # float32 workspaces; float32 logits are worked on in place in buf
            ws = buf if hidden.dtype == wd else torch.empty(min(chunk, N) * vb, dtype=wd, device=hidden.device)
            e_ws = torch.empty_like(ws) if want_entropy else None
        for c0 in range(0, N, chunk):
            c1 = min(N, c0 + chunk)
            n, h, lab = c1 - c0, hidden[c0:c1], labels[c0:c1]
            if rows_mode:
                logits = torch.mm(h, weight.t(), out=buf[: n * V].view(n, V))
                lp_c, ent_c, st = impl.forward(logits[None], lab, temperature, want_entropy)
            else:
                state = _chunked.RowLSE(n, wd, hidden.device, temperature, want_entropy)
                zl = torch.zeros(n, dtype=wd, device=hidden.device)
                for v0 in range(0, V, vb):
                    c = min(vb, V - v0)
                    z = torch.mm(h, weight[v0:v0 + c].t(), out=buf[: n * c].view(n, c))
                    zl += _chunked.label_logits(z, v0, lab)  # before update(), which may overwrite z
                    state.update(z, ws[: n * c].view(n, c), e_ws[: n * c].view(n, c) if want_entropy else None)
                m, logs, ent_c = state.finish()
                lp_c = torch.where(lab != -100, (zl - m) / temperature - logs, 0.0)
                st = (m, logs)
            lp[c0:c1] = lp_c
            if want_entropy:
                ent[c0:c1] = ent_c
            stats.append(st)
        stats = [torch.cat(col) for col in zip(*stats)]  # per-row tensors the backward needs, if any
        ctx.save_for_backward(hidden, weight, labels, ent, *stats)
        ctx.cfg = (temperature, chunk, rows_mode, impl)
        ctx.set_materialize_grads(False)
        if want_entropy:
            return lp, ent
        missing = lp.new_empty(0)
        ctx.mark_non_differentiable(missing)
        return lp, missing

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, ent, *stats = ctx.saved_tensors
        temperature, chunk, rows_mode, impl = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V, H = hidden.shape[0], weight.shape[0], hidden.shape[1]
        wd = _chunked.work_dtype(hidden.dtype)
        if ent is None:
            g_ent = None
        if g_lp is not None:
            g_lp = torch.where(labels != -100, g_lp.to(wd), 0.0)  # ignored labels: no gradient
        # float32 accumulators; when the dtype is float32 they are the gradients themselves
        grad_h = torch.zeros(N, H, dtype=wd, device=hidden.device) if need_h else None
        grad_w = (torch.empty_like(weight) if N else torch.zeros_like(weight)) if need_w else None  # no tokens
        vb = vocab_block(V, hidden.shape[1], rows_mode)
        one_chunk, direct = N <= chunk, weight.dtype == wd
        buf = hidden.new_empty(min(chunk, N) * vb)
        if not rows_mode:
            ws = buf if hidden.dtype == wd else torch.empty(min(chunk, N) * vb, dtype=wd, device=hidden.device)
            e_ws = torch.empty_like(ws) if g_ent is not None else None
        for v0 in range(0, V, vb):
            c = min(vb, V - v0)
            w_blk = weight[v0:v0 + c]
            acc_w = None
            if need_w and not one_chunk:  # float32: grad_w itself; half: a float32 block accumulator
                acc_w = grad_w[v0:v0 + c] if direct else torch.empty(c, H, dtype=wd, device=weight.device)
                acc_w.zero_()
            for c0 in range(0, N, chunk):
                c1 = min(N, c0 + chunk)
                n, h, rs = c1 - c0, hidden[c0:c1], slice(c0, c1)
                z = torch.mm(h, w_blk.t(), out=buf[: n * c].view(n, c))  # recompute, never stored
                gs = [None if x is None else x[rs] for x in (ent, g_lp, g_ent)]
                if rows_mode:
                    impl.backward(z[None], labels[rs], temperature, [st[rs] for st in stats], *gs, z[None])
                else:
                    m, logs = stats
                    e = e_ws[: n * c].view(n, c) if g_ent is not None else None
                    _chunked.block_grad(z, v0, labels[rs], temperature, m[rs], logs[rs], *gs, z,
                                        ws[: n * c].view(n, c), e)
                if need_h:
                    _mm_acc(grad_h[rs], z, w_blk)
                if need_w and one_chunk:  # a single reduction over all tokens, fp32 inside the matmul
                    torch.mm(z.t(), h, out=grad_w[v0:v0 + c])
                elif need_w:
                    _mm_acc(acc_w, z.t(), h)
            if need_w and not one_chunk and not direct:
                grad_w[v0:v0 + c] = acc_w
        if need_h and grad_h.dtype != hidden.dtype:
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None, None
