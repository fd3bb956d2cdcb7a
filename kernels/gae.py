"""Generalized advantage estimation and masked statistics for right-padded responses [B, T].

GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};
returns = A + V. A position with mask 0 ends the chain: V_{t+1} and A_{t+1} count as 0 there, so
nothing flows across the end of a response, and outputs are 0 where mask is 0.
"""

from __future__ import annotations

import torch

from ._dispatch import choose


def _check_gae(rewards, values, mask):
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"kernels.gae: rewards, values and mask must all be [B, T]; got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Advantages and returns, no gradient.

    rewards, values: [B, T] (any float dtype); mask: [B, T] bool/int/float, 1 on response tokens.
    Returns (advantages [B, T], returns [B, T]) float32 (float64 for float64 inputs), 0 where mask is 0.
    """
    _check_gae(rewards, values, mask)
    if choose(rewards, values, mask) == "triton":
        from ._triton import gae as triton_gae  # lazy: triton is optional

        return triton_gae.gae(rewards, values, mask, float(gamma), float(lam))
    wd = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    keep = mask != 0
    # where, not multiply: padding may hold garbage (even nan) in rewards / values
    r = torch.where(keep, rewards.to(wd), 0.0)
    v = torch.where(keep, values.to(wd), 0.0)
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=wd, device=r.device)
    next_v = torch.zeros(B, dtype=wd, device=r.device)
    next_a = torch.zeros(B, dtype=wd, device=r.device)
    for t in range(T - 1, -1, -1):  # T small sequential steps over [B] vectors
        a = (r[:, t] + gamma * next_v - v[:, t] + (gamma * lam) * next_a) * keep[:, t]
        adv[:, t] = a
        next_v, next_a = v[:, t], a
    return adv, adv + v


def gae_reference(rewards, values, mask, gamma, lam):
    """Naive twin of ``gae``: a Python loop per row, per token, straight from the formulas."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(T)):
            if not mask[b, t]:
                next_v, next_a = 0.0, 0.0
                continue
            v = float(values[b, t])
            delta = float(rewards[b, t]) + gamma * next_v - v
            next_a = delta + gamma * lam * next_a
            next_v = v
            adv[b, t], ret[b, t] = next_a, next_a + v
    return adv, ret


def _float(x):
    return x if x.dtype == torch.float64 else x.float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero (``dim=None``: over everything).

    x: [...] float; mask: same shape (bool/int/float, nonzero = counted). Returns float32 (or float64);
    an empty selection gives 0 rather than nan, so one empty row cannot poison a batch mean.
    Differentiable w.r.t. ``x``.
    """
    keep = mask != 0
    kept = torch.where(keep, _float(x), 0.0)  # where, not multiply: masked entries may be nan / inf
    total, count = (kept.sum(dim), keep.sum(dim)) if dim is not None else (kept.sum(), keep.sum())
    return total / count.clamp(min=1)


def masked_mean_reference(x, mask, dim=None):
    """Naive twin: (x * mask).sum / mask.sum (nan on an empty selection)."""
    m = mask.to(_float(x).dtype)
    return (_float(x) * m).sum(dim) / m.sum(dim) if dim is not None else (_float(x) * m).sum() / m.sum()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked positions (unbiased var, as the reference systems).

    x, mask: same shape [...]; ``shift_mean=False`` adds the mean back (scale only). Returns float32
    (or float64), 0 where mask is 0. Raises when fewer than 2 positions are selected (var undefined).
    """
    keep = mask != 0
    n = int(keep.sum())
    if n < 2:
        raise ValueError(f"kernels.masked_whiten: needs at least 2 masked positions for an unbiased variance, "
                         f"got {n}; check the response mask")
    xf = torch.where(keep, _float(x), 0.0)
    mean = xf.sum() / n
    var = torch.where(keep, (xf - mean) ** 2, 0.0).sum() / (n - 1)
    out = (xf - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, 0.0)


def masked_whiten_reference(x, mask, shift_mean=True):
    """Naive twin, as in TRL: masked mean, unbiased masked var (Bessel), rsqrt(var + 1e-8)."""
    m = mask.to(_float(x).dtype)
    xf = _float(x)
    mean = (xf * m).sum() / m.sum()
    var = (((xf - mean) ** 2) * m).sum() / m.sum() * (m.sum() / (m.sum() - 1))
    out = (xf - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m
