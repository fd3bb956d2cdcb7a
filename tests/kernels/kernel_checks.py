"""Shared checks for the kernel tests (a uniquely named module: tests/ has other conftest files)."""

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def assert_matches(actual, ref, rtol, what="", floor=1e-3):
    """|actual - ref| <= rtol * |ref| + rtol * max(max|ref|, floor); infinities and nans must agree.

    (torch.testing.assert_close with atol = rtol * the tensor's scale: entries near zero, e.g. the
    gradient on tiny probabilities, are held to the scale of the tensor, not to relative accuracy;
    ``floor`` covers tensors that are ~0 throughout, e.g. the entropy of a one-hot softmax.)
    """
    actual = actual.detach().double()
    ref = ref.detach().double()
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite entries differ"
    assert torch.equal(actual[~finite].nan_to_num(), ref[~finite].nan_to_num()), f"{what}: infinities differ"
    if finite.any():
        a, r = actual[finite], ref[finite]
        err = (a - r).abs() / (r.abs() + r.abs().max().clamp(min=floor))
        assert err.max() <= rtol, f"{what}: error {err.max().item():.3g} > rtol {rtol:g} (scaled)"
