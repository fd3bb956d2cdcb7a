"""gae, masked_whiten, masked_mean: hand-computed values, references, variable lengths."""

import pytest
import torch
from kernel_checks import assert_matches

from rlhf_engine import kernels


def test_gae_hand_computed(backend):
    # gamma = lam = 0.5 (gamma * lam = 0.25); row 0 full length 3, row 1 length 2 with garbage padding.
    # row 0: d2 = 2 - 1.5 = 0.5, A2 = 0.5; d1 = 0 + .5*1.5 - 1 = -0.25, A1 = -0.25 + .25*.5 = -0.125;
    #        d0 = 1 + .5*1 - .5 = 1, A0 = 1 + .25*(-0.125) = 0.96875; R = A + V.
    # row 1: d1 = 0 + 0 - 1 = -1 (V beyond the end is 0), A1 = -1; d0 = 1, A0 = 1 + .25*(-1) = 0.75.
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = kernels.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert adv.dtype == torch.float32 and not adv.requires_grad
    assert adv.tolist() == [[0.96875, -0.125, 0.5], [0.75, -1.0, 0.0]]
    assert ret.tolist() == [[1.46875, 0.875, 2.0], [1.25, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.long])
def test_gae_matches_reference_variable_lengths(backend, dtype, mask_dtype):
    B, T = 6, 17
    lengths = torch.tensor([17, 1, 9, 0, 16, 5])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(mask_dtype)
    rewards = torch.randn(B, T).to(dtype)
    values = torch.randn(B, T).to(dtype).requires_grad_()
    adv, ret = kernels.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    adv_r, ret_r = kernels.gae_reference(rewards.double(), values.detach().double(), mask, 0.99, 0.95)
    assert_matches(adv, adv_r, 1e-5, "advantages")
    assert_matches(ret, ret_r, 1e-5, "returns")
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_no_flow_past_end(backend):
    """Changing anything beyond a response's end changes nothing inside it."""
    rewards, values = torch.randn(2, 8), torch.randn(2, 8)
    mask = torch.tensor([[1] * 5 + [0] * 3] * 2)
    rewards[1, 5:], values[1, 5:] = 1e6, -1e6
    adv, ret = kernels.gae(rewards, values, mask, 1.0, 1.0)
    rewards[1, 5:], values[1, 5:] = rewards[0, 5:], values[0, 5:]
    adv2, ret2 = kernels.gae(rewards, values, mask, 1.0, 1.0)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        kernels.gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    x = torch.randn(4, 9) * 3 + 2
    mask = torch.arange(9)[None, :] < torch.tensor([9, 3, 0, 6])[:, None]
    out = kernels.masked_whiten(x, mask, shift_mean)
    assert_matches(out, kernels.masked_whiten_reference(x.double(), mask, shift_mean), 1e-5)
    sel = out[mask].double()
    if shift_mean:
        assert abs(sel.mean()) < 1e-5 and abs(sel.std() - 1) < 1e-5  # unbiased std
    assert torch.all(out[~mask] == 0)


def test_masked_whiten_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        kernels.masked_whiten(torch.randn(3), torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("dim", [None, 1, 0])
def test_masked_mean(dim):
    x = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 0, 0, 0], [0, 1, 1, 1, 1]])
    m = kernels.masked_mean(x, mask, dim)
    assert_matches(m, kernels.masked_mean_reference(x.double(), mask, dim), 1e-6)
    m.sum().backward()
    assert torch.all(x.grad[mask == 0] == 0)


def test_masked_mean_empty_row_is_zero():
    m = kernels.masked_mean(torch.randn(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]), dim=1)
    assert m[1].item() == 0 and torch.isfinite(m).all()
