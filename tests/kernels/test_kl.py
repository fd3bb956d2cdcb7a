"""kl_penalty: k1 / k2 / k3 on every backend against the float64 reference, values and gradients."""

import pytest
import torch
from kernel_checks import assert_matches

from rlhf_engine import kernels


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("scale", [1e-4, 0.2, 3.0])  # tiny log-ratios stress k3's cancellation
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(backend, estimator, scale, dtype):
    lp = (-torch.rand(4, 33, dtype=torch.float64) * 5).to(dtype)
    ref = (lp.double() + torch.randn(4, 33, dtype=torch.float64) * scale).to(dtype)
    a, b = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    ar, br = lp.double().requires_grad_(), ref.double().requires_grad_()
    k, kr = kernels.kl_penalty(a, b, estimator), kernels.kl_penalty_reference(ar, br, estimator)
    assert k.dtype == torch.float32 and k.shape == lp.shape
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_matches(k, kr, rtol, estimator, floor=1e-30)
    g = torch.randn(k.shape, dtype=torch.float64)
    (k * g.float()).sum().backward()
    (kr * g).sum().backward()
    assert_matches(a.grad, ar.grad, rtol, "grad logprobs", floor=1e-30)
    assert_matches(b.grad, br.grad, rtol, "grad ref_logprobs", floor=1e-30)


def test_k3_is_nonnegative_and_masked_zero(backend):
    r = torch.linspace(-3, 3, 101)
    assert torch.all(kernels.kl_penalty(r, torch.zeros_like(r), "k3") >= 0)
    z = torch.zeros(2, 5)
    for est in ("k1", "k2", "k3"):
        assert torch.all(kernels.kl_penalty(z, z, est) == 0)


def test_any_shape_and_non_contiguous(backend):
    lp = torch.randn(3, 4, 5).transpose(0, 2)
    ref = torch.randn(5, 4, 3)
    ref64 = kernels.kl_penalty_reference(lp.double(), ref.double(), "k2")
    assert_matches(kernels.kl_penalty(lp, ref, "k2"), ref64, 1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="estimator"):
        kernels.kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="same shape"):
        kernels.kl_penalty(torch.zeros(2), torch.zeros(3), "k1")
