"""Per-token KL estimators between the policy and the reference model.

r = logp - ref_logp;  k1 = r;  k2 = r^2 / 2;  k3 = exp(-r) - 1 + r  (Schulman's unbiased, >= 0 estimator).
"""

from __future__ import annotations

import torch

from ._dispatch import choose

ESTIMATORS = ("k1", "k2", "k3")
_SERIES_BELOW = 0.25  # |r| below this: Taylor series; exp(-r) - 1 + r cancels catastrophically near 0


def _k3_series(r):
    # exp(-r) - 1 + r = r^2 (1/2 - r/6 + r^2/24 - ...), Horner form; error < 1e-11 relative for |r| < 0.25
    acc = torch.full_like(r, 1.0 / 362880)
    for k in (40320, 5040, 720, 120, 24, 6, 2):
        acc = 1.0 / k - r * acc
    return r * r * acc


def _torch_kl(r: torch.Tensor, estimator: str) -> torch.Tensor:
    if estimator == "k1":
        return r
    if estimator == "k2":
        return 0.5 * r * r
    return torch.where(r.abs() < _SERIES_BELOW, _k3_series(r), torch.expm1(-r) + r)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate.

    logprobs, ref_logprobs: same shape [...] (e.g. [B, T]); estimator: "k1" | "k2" | "k3".
    Returns [...] float32 (float64 for float64 inputs), differentiable w.r.t. both inputs.
    Masked positions with logprobs == ref_logprobs == 0 give 0 for every estimator.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"kernels.kl_penalty: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"kernels.kl_penalty: logprobs {tuple(logprobs.shape)} and ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} must have the same shape")
    wd = torch.float64 if torch.float64 in (logprobs.dtype, ref_logprobs.dtype) else torch.float32
    if choose(logprobs, ref_logprobs) == "triton":
        from ._triton import kl as triton_kl  # lazy: triton is optional

        return triton_kl.kl_penalty(logprobs, ref_logprobs, estimator)
    return _torch_kl(logprobs.to(wd) - ref_logprobs.to(wd), estimator)


def kl_penalty_reference(logprobs, ref_logprobs, estimator="k1"):
    """Naive twin of ``kl_penalty``, straight from the formulas."""
    r = logprobs.float() - ref_logprobs.float() if logprobs.dtype != torch.float64 else logprobs - ref_logprobs
    if estimator == "k1":
        return r
    if estimator == "k2":
        return r ** 2 / 2
    if estimator == "k3":
        return torch.exp(-r) - 1 + r
    raise ValueError(f"unknown estimator {estimator!r}")
