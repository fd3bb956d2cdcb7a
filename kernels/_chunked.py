"""Chunked torch implementation of the logits -> (logprob, entropy) forward and backward.

Shared interface with ``kernels/_triton/logprobs.py``; both work on a 3-D view ``x3 [A, R, V]`` of the
logits (any strides) and a flat ``labels [A*R]`` (int64, -100 = ignored, or None):

    forward(x3, labels, T, want_entropy) -> (logprobs [A*R] | None, entropy [A*R] | None, stats)
    backward(x3, labels, T, stats, entropy, g_logprobs, g_entropy, out3 [A, R, V])

``stats`` is a tuple of per-row tensors the backward needs (sliceable by row, saved by the caller).

Work happens on tiles of at most ``TILE_ELEMS`` elements, so no float32 tensor larger than one tile
exists (the gradient itself has the input's dtype). Two tilings:
- rows: a tile is a few whole rows. Forward is one ``log_softmax(out=tile)`` per tile (ATen's
  fused kernel: max, sum and write in one parallel region), the backward one ``softmax`` per tile
  plus in-place ops; half inputs are first cast into the float32 tile. Few large ops matter on
  CPU: every op is a thread-pool round trip. ``stats`` is empty (or the row max when T != 1): the
  backward recomputes the rest from the logits.
- vocab blocks, for rows longer than a tile: online logsumexp across blocks (running max of the
  raw logits and a rescaled running sum, as the Triton kernel does); ``stats = (m, logs)`` with
  ``logsumexp(z / T) = m / T + logs``.
Temperature: logits are shifted by their row max *before* dividing by T, so logits around 1e4 keep
full precision (z - max is exact, z / T alone would lose ~1e-3).
"""

from __future__ import annotations

import torch

TILE_ELEMS = 1 << 23  # 32 MB of float32 per tile: L3-resident, yet few ops (each is a thread-pool round trip)
_LOGP_FLOOR = -1000.0  # exp(-1000) == 0 in fp32/fp64: clamping here is exact and avoids 0 * -inf


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (used by precision tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_3d(x: torch.Tensor) -> torch.Tensor:
    """View ``x [..., V]`` as ``[A, R, V]`` without copying when the strides allow it.

    ``logits[:, :-1]`` (the usual shift) cannot be flattened to 2-D as a view, but is ``[B, T-1, V]``
    already; only stranger layouts fall back to a copy.
    """
    V = x.shape[-1]
    if x.dim() == 1:
        return x.view(1, 1, V)
    for shape in ((1, -1, V), (x.shape[0], -1, V)):
        try:
            return x.view(shape)
        except RuntimeError:
            pass
    return x.reshape(1, -1, V)


def _row_tiles(A, R, rows):
    for a in range(A):
        for r0 in range(0, R, rows):
            yield a, r0, min(R, r0 + rows)


def _sub_into(out, z, m):
    """out = z - m in out's (float32) dtype. Mixed dtypes: cast into ``out`` first, then subtract in
    place; ``torch.sub(bf16, fp32, out=)`` would allocate a whole float32 copy of z on every call."""
    if z.dtype == out.dtype:
        return torch.sub(z, m, out=out)
    return out.copy_(z).sub_(m)


def _mul_into(out, t, scale):
    """out = t * scale, written in out's dtype (t is a float32 workspace we may overwrite)."""
    if out.dtype == t.dtype:
        return torch.mul(t, scale, out=out)
    return out.copy_(t.mul_(scale))


def _scaled(z, temperature, out, m=None):
    """(z - rowmax(z)) / T in the work dtype, in ``out`` (or z itself when T == 1 and z is float32).

    Returns (tensor, rowmax or None); pass the forward's rowmax back as ``m`` to skip one pass.
    """
    if temperature == 1.0:  # (log_)softmax shifts by the row max itself
        return (z if z.dtype == out.dtype else out.copy_(z)), None
    if m is None:
        m = z.amax(-1, keepdim=True).to(out.dtype)  # float32 m: bf16 - bf16 would round the difference
    return _sub_into(out, z, m).mul_(1.0 / temperature), m


def forward(x3, labels, temperature: float, want_entropy: bool, tile_elems: int | None = None):
    A, R, V = x3.shape
    tile_elems = tile_elems or TILE_ELEMS  # read at call time so tests can shrink it
    if V > tile_elems:
        return _online_forward(x3, labels, temperature, want_entropy, tile_elems)
    wd = work_dtype(x3.dtype)
    rows = max(1, min(R, tile_elems // V))
    ws = torch.empty(rows * V, dtype=wd, device=x3.device)
    e_ws = torch.empty_like(ws) if want_entropy else None
    lp = torch.zeros(A * R, dtype=wd, device=x3.device) if labels is not None else None
    ent = torch.empty(A * R, dtype=wd, device=x3.device) if want_entropy else None
    rowmax = torch.empty(A * R, 1, dtype=wd, device=x3.device) if temperature != 1.0 else None
    for a, r0, r1 in _row_tiles(A, R, rows):
        n, rs = r1 - r0, slice(a * R + r0, a * R + r1)
        t = ws[: n * V].view(n, V)
        z, m = _scaled(x3[a, r0:r1], temperature, t)
        if m is not None:
            rowmax[rs] = m
        torch.log_softmax(z, -1, out=t)  # in place when z is t: fine, each row is reduced before written
        if labels is not None:
            lp[rs] = t.gather(1, labels[rs].clamp(min=0)[:, None]).view(n)
        if want_entropy:
            e = e_ws[: n * V].view(n, V)
            torch.exp(t, out=e)
            t.clamp_(min=_LOGP_FLOOR)  # p = 0 where logp = -inf; avoid 0 * -inf
            ent[rs] = -torch.bmm(e.unsqueeze(1), t.unsqueeze(2)).view(n)  # row-wise dot, no temp
    if labels is not None:
        lp.masked_fill_(labels == -100, 0.0)
    return lp, ent, (() if rowmax is None else (rowmax,))


def backward(x3, labels, temperature, stats, entropy, g_lp, g_ent, out3, tile_elems: int | None = None):
    """Write d(sum g_lp*logprob + g_ent*entropy)/d logits into ``out3`` (same shape as ``x3``).

    d logprob / dz = (onehot - p) / T;  d entropy / dz = -p (log p + H) / T.
    """
    A, R, V = x3.shape
    tile_elems = tile_elems or TILE_ELEMS
    if V > tile_elems:
        return _online_backward(x3, labels, temperature, stats, entropy, g_lp, g_ent, out3, tile_elems)
    wd = work_dtype(x3.dtype)
    inv_t = 1.0 / temperature
    if labels is None:
        g_lp = None
    if g_lp is not None:  # ignored labels get no gradient at all
        g_lp = torch.where(labels != -100, g_lp.to(wd), 0.0) * inv_t
    rows = max(1, min(R, tile_elems // V))
    direct = out3.dtype == wd  # write straight into the gradient, no workspace copy
    ws = None if direct else torch.empty(rows * V, dtype=wd, device=x3.device)
    lsm_ws = torch.empty(rows * V, dtype=wd, device=x3.device) if g_ent is not None else None
    for a, r0, r1 in _row_tiles(A, R, rows):
        n, rs = r1 - r0, slice(a * R + r0, a * R + r1)
        t = out3[a, r0:r1] if direct else ws[: n * V].view(n, V)
        z, _ = _scaled(x3[a, r0:r1], temperature, t, stats[0][rs] if stats else None)
        if g_ent is not None:
            lsm = lsm_ws[: n * V].view(n, V)
            torch.log_softmax(z, -1, out=lsm)
            torch.exp(lsm, out=t)  # p
            lsm.clamp_(min=_LOGP_FLOOR)
            # -p (g_lp + g_ent (log p + H)) / T  =  p * (a * log p + b), a and b per row
            ge = g_ent[rs].to(wd) * inv_t
            b = -ge * entropy[rs] - (g_lp[rs] if g_lp is not None else 0.0)
            t.mul_(torch.addcmul(b[:, None], lsm, -ge[:, None], out=lsm))
            if g_lp is not None:
                t.scatter_add_(1, labels[rs].clamp(min=0)[:, None], g_lp[rs, None])  # + g/T at the label
            if not direct:
                out3[a, r0:r1].copy_(t)
            continue
        torch.softmax(z, -1, out=t)
        if g_lp is None:
            out3[a, r0:r1].zero_()
            continue
        # (onehot - p) * g / T as two passes: p - onehot in place, then one multiply that also casts
        t.scatter_add_(1, labels[rs].clamp(min=0)[:, None], t.new_full((n, 1), -1.0))
        _mul_into(out3[a, r0:r1], t, -g_lp[rs, None])
    return out3


# ---- vocab blocks with an online logsumexp (rows longer than a tile; linear_logprobs tiles) ----

class RowLSE:
    """Running logsumexp (and entropy sums) of rows of z / T, fed one vocabulary block at a time.

    State per row: m = running max of the raw logits, s = sum exp((z - m) / T), and for entropy
    w = sum e * (z - m) / T relative to the same shift, so H = log s - w / s needs no subtraction
    of two large numbers.
    """

    def __init__(self, n, wd, device, temperature, want_entropy):
        self.inv_t = 1.0 / temperature
        self.m = torch.full((n,), float("-inf"), dtype=wd, device=device)
        self.s = torch.zeros(n, dtype=wd, device=device)
        self.w = torch.zeros(n, dtype=wd, device=device) if want_entropy else None

    def update(self, z, t, e=None):
        """Fold in block ``z [n, c]``; ``t`` (and ``e`` for entropy) are [n, c] work-dtype workspaces.

        ``t`` may be ``z`` itself (same dtype), which is then overwritten.
        """
        new_m = torch.maximum(self.m, z.amax(-1).to(t.dtype))
        shift = new_m.masked_fill(new_m == float("-inf"), 0.0)  # all -inf so far: any finite shift
        _sub_into(t, z, shift[:, None])  # shift, then scale: exact for large logits
        if self.inv_t != 1.0:
            t.mul_(self.inv_t)
        d = torch.where(self.s > 0, (self.m - shift) * self.inv_t, 0.0)  # s == 0: nothing to rescale
        alpha = d.exp()
        if self.w is not None:
            t.clamp_(min=_LOGP_FLOOR)  # exp(t) == 0 there anyway; avoids 0 * -inf
            torch.exp(t, out=e)
            self.w = alpha * (self.w + d * self.s) + torch.bmm(e.unsqueeze(1), t.unsqueeze(2)).view(-1)
            self.s = alpha * self.s + e.sum(-1)
        else:
            self.s = alpha * self.s + t.exp_().sum(-1)
        self.m = new_m

    def finish(self):
        """-> (m [n] with -inf rows set to 0, logs [n], entropy [n] or None)."""
        logs = self.s.log()
        ent = logs - self.w / self.s if self.w is not None else None
        return self.m.masked_fill(self.m == float("-inf"), 0.0), logs, ent


def label_logits(z, v0, labels):
    """Raw logit of each row's label where it falls in the block ``z [n, c]`` starting at v0, else 0."""
    c = z.shape[1]
    inside = (labels >= v0) & (labels < v0 + c)
    zl = z.gather(1, (labels - v0).clamp(0, c - 1)[:, None]).view(-1)
    return torch.where(inside, zl.float() if zl.dtype != torch.float64 else zl, 0.0)


def block_grad(z, v0, labels, temperature, m, logs, ent, g_lp, g_ent, out, t, e=None):
    """Gradient of sum(g_lp * logprob + g_ent * entropy) w.r.t. a logits block ``z [n, c]`` into ``out``.

    m, logs, ent: per-row stats from ``RowLSE``; g_lp must already be 0 on ignored labels.
    ``out`` may alias ``z`` (each block is read before it is written). t, e: [n, c] fp32 workspaces;
    ``t`` may also be ``z`` (and ``out``) when z is already in the work dtype.
    """
    inv_t = 1.0 / temperature
    _sub_into(t, z, m[:, None])
    if inv_t != 1.0:
        t.mul_(inv_t)  # t = (z - m) / T, so p = exp(t) / s with s = exp(logs)
    col = None
    if g_lp is not None:
        inside = (labels >= v0) & (labels < v0 + z.shape[1])
        col = (labels - v0).clamp(0, z.shape[1] - 1)[:, None]
    if g_ent is None:
        if g_lp is None:
            return out.zero_()
        # (onehot - p) g / T = (e - s onehot) * (-g / (T s)): three passes, the last one also casts
        s = logs.exp()
        t.exp_().scatter_add_(1, col, torch.where(inside, -s, 0.0)[:, None])
        return _mul_into(out, t, (-g_lp * inv_t / s)[:, None])
    t.sub_(logs[:, None]).clamp_(min=_LOGP_FLOOR)  # log p, floored: p == 0 below it anyway
    torch.exp(t, out=e)
    # -p (g_lp + g_ent (log p + H)) / T = p * (a log p + b) with a, b per row
    ge = g_ent.to(t.dtype) * inv_t
    b = -ge * ent - (g_lp * inv_t if g_lp is not None else 0.0)
    torch.addcmul(b[:, None], t, -ge[:, None], out=t).mul_(e)
    if g_lp is not None:
        t.scatter_add_(1, col, torch.where(inside, g_lp * inv_t, 0.0)[:, None])
    return out.copy_(t)


def _online_forward(x3, labels, temperature, want_entropy, tile_elems):
    """Logits path for rows longer than a tile: one row at a time, vocab blocks of ``tile_elems``."""
    A, R, V = x3.shape
    wd, dev = work_dtype(x3.dtype), x3.device
    m_out = torch.empty(A * R, dtype=wd, device=dev)
    logs_out, ent_out = torch.empty_like(m_out), (torch.empty_like(m_out) if want_entropy else None)
    lp = torch.zeros_like(m_out) if labels is not None else None
    ws = torch.empty(tile_elems, dtype=wd, device=dev)
    e_ws = torch.empty_like(ws) if want_entropy else None
    for a in range(A):
        for r in range(R):
            row = a * R + r
            state = RowLSE(1, wd, dev, temperature, want_entropy)
            zl = torch.zeros(1, dtype=wd, device=dev)
            for v0 in range(0, V, tile_elems):
                z = x3[a, r:r + 1, v0:v0 + tile_elems]
                c = z.shape[1]
                state.update(z, ws[:c].view(1, c), e_ws[:c].view(1, c) if want_entropy else None)
                if labels is not None:
                    zl += label_logits(z, v0, labels[row:row + 1])
            m, logs, ent = state.finish()
            m_out[row], logs_out[row] = m[0], logs[0]
            if want_entropy:
                ent_out[row] = ent[0]
            if labels is not None:
                lp[row] = ((zl - m) / temperature - logs)[0]
    if labels is not None:
        lp.masked_fill_(labels == -100, 0.0)
    return lp, ent_out, (m_out, logs_out)


def _online_backward(x3, labels, temperature, stats, entropy, g_lp, g_ent, out3, tile_elems):
    A, R, V = x3.shape
    m, logs = stats
    wd = m.dtype
    if labels is None:
        g_lp = None
    if g_lp is not None:
        g_lp = torch.where(labels != -100, g_lp.to(wd), 0.0)
    ws = torch.empty(tile_elems, dtype=wd, device=x3.device)
    e_ws = torch.empty_like(ws) if g_ent is not None else None
    for a in range(A):
        for r in range(R):
            rs = slice(a * R + r, a * R + r + 1)
            for v0 in range(0, V, tile_elems):
                z = x3[a, r:r + 1, v0:v0 + tile_elems]
                c = z.shape[1]
                block_grad(z, v0, None if g_lp is None else labels[rs], temperature, m[rs], logs[rs],
                           None if entropy is None else entropy[rs], None if g_lp is None else g_lp[rs],
                           None if g_ent is None else g_ent[rs], out3[a, r:r + 1, v0:v0 + c],
                           ws[:c].view(1, c), e_ws[:c].view(1, c) if g_ent is not None else None)
    return out3
