"""logprobs_from_logits / entropy_from_logits: every backend against the float64 reference."""

import pytest
import torch
from kernel_checks import HAS_TRITON, assert_matches

from rlhf_engine import kernels
from rlhf_engine.kernels import _chunked

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _logits(lead, V, dtype, scale=3.0, neg_inf=0, contiguous=True):
    """Random logits [*lead, V] in ``dtype``; optionally some -inf entries and a strided layout."""
    lead = lead if contiguous else (*lead[:-1], lead[-1] + 1)
    x = torch.randn(*lead, V, dtype=torch.float64) * scale
    if neg_inf:  # whole vocabulary columns at -inf (e.g. masked-out tokens)
        x[..., torch.randint(0, V, (neg_inf,))] = float("-inf")
    x = x.to(dtype)
    return x if contiguous else x[..., :-1, :]  # the usual logits[:, :-1] shift: not flattenable


def _labels(lead, V, logits=None, n_ignored=2):
    lab = torch.randint(0, V, lead)
    if logits is not None:  # keep labels off -inf logits (their logprob is -inf; tested separately)
        bad = torch.isinf(logits.gather(-1, lab.unsqueeze(-1)).squeeze(-1))
        while bad.any():
            lab[bad] = torch.randint(0, V, (int(bad.sum()),))
            bad = torch.isinf(logits.gather(-1, lab.unsqueeze(-1)).squeeze(-1))
    flat = lab.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignored]] = -100
    return lab


def _check_against_reference(x, labels, T, rtol, entropy=True):
    """Forward and gradients of (logprobs, entropy) vs float64 autograd on the reference."""
    xi = x.detach().clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_()
    xr = x.detach().double().requires_grad_()
    if entropy:
        lp, ent = kernels.logprobs_from_logits(xi, labels, T, return_entropy=True)
        lpr, entr = kernels.logprobs_from_logits_reference(xr, labels, T, return_entropy=True)
    else:
        lp = kernels.logprobs_from_logits(xi, labels, T)
        lpr = kernels.logprobs_from_logits_reference(xr, labels, T)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    assert_matches(lp, lpr, rtol, "logprobs")
    g = torch.randn(lp.shape, dtype=torch.float64)
    loss, loss_r = (lp * g.float()).sum(), (lpr * g).sum()
    if entropy:
        assert_matches(ent, entr, rtol, "entropy")
        ge = torch.randn(ent.shape, dtype=torch.float64)
        loss, loss_r = loss + (ent * ge.float()).sum(), loss_r + (entr * ge).sum()
    loss.backward()
    loss_r.backward()
    assert xi.grad.dtype == x.dtype
    assert_matches(xi.grad, xr.grad, rtol, "grad logits")
    ignored = labels == -100
    if not entropy and ignored.any():
        assert torch.all(lp[ignored] == 0) and torch.all(xi.grad[ignored] == 0)


SHAPES = [((3, 5), 1000), ((7,), 257), ((2, 3), 97)]  # vocab sizes off any power of two


@pytest.mark.parametrize("lead,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_matches_reference(backend, lead, V, dtype, T):
    x = _logits(lead, V, dtype)
    _check_against_reference(x, _labels(lead, V), T, RTOL[dtype])


@pytest.mark.parametrize("entropy", [False, True])
def test_logprobs_only_and_with_entropy(backend, entropy):
    x = _logits((4, 6), 300, torch.float32)
    _check_against_reference(x, _labels((4, 6), 300, n_ignored=5), 1.0, 1e-5, entropy=entropy)


def test_float16(backend):
    x = _logits((5,), 333, torch.float16)
    _check_against_reference(x, _labels((5,), 333), 1.3, 1e-2)


def test_non_contiguous(backend):
    x = _logits((2, 5), 300, torch.float32, contiguous=False)
    assert not x.is_contiguous()
    _check_against_reference(x, _labels((2, 5), 300), 0.9, 1e-5)


def test_strided_vocab(backend):
    x = _logits((6,), 130, torch.float32)[:, ::2]  # vocab stride 2
    _check_against_reference(x, _labels((6,), 65), 1.0, 1e-5)


def test_neg_inf_logits(backend):
    x = _logits((4, 3), 200, torch.float32, neg_inf=20)
    _check_against_reference(x, _labels((4, 3), 200, logits=x), 0.8, 1e-5)


def test_label_on_neg_inf_gives_neg_inf(backend):
    x = _logits((3,), 50, torch.float32)
    x[1, 7] = float("-inf")
    lab = torch.tensor([0, 7, -100])
    _check_against_reference(x, lab, 1.0, 1e-5, entropy=False)
    assert kernels.logprobs_from_logits(x, lab)[1].item() == float("-inf")


@pytest.mark.parametrize("T", [1.0, 0.6])
def test_large_logits(backend, T):
    x = _logits((3, 4), 500, torch.float32, scale=1.0) * 4 + 1e4  # spread ~4 around 1e4
    _check_against_reference(x, _labels((3, 4), 500), T, 1e-5)
    x = _logits((3, 4), 500, torch.float32, scale=1e4)  # huge spread: near one-hot softmax
    _check_against_reference(x, _labels((3, 4), 500), T, 1e-5)


def test_one_dim_input(backend):
    x = _logits((), 64, torch.float32)
    lp = kernels.logprobs_from_logits(x, torch.tensor(5))
    assert lp.shape == ()
    assert_matches(lp, kernels.logprobs_from_logits_reference(x.double(), torch.tensor(5)), 1e-5)


def test_entropy_from_logits(backend):
    x = _logits((3, 4), 129, torch.float32, neg_inf=5).requires_grad_()
    xr = x.detach().double().requires_grad_()
    ent, entr = kernels.entropy_from_logits(x, 0.8), kernels.entropy_from_logits_reference(xr, 0.8)
    assert_matches(ent, entr, 1e-5, "entropy")
    g = torch.randn(ent.shape, dtype=torch.float64)
    (ent * g.float()).sum().backward()
    (entr * g).sum().backward()
    assert_matches(x.grad, xr.grad, 1e-5, "grad")


@pytest.mark.parametrize("tile", [64, 250, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_tilings(monkeypatch, tile, dtype):
    """Small tiles: whole-row tiles of a few rows (600), and the online vocab-block path (< V)."""
    monkeypatch.setattr(_chunked, "TILE_ELEMS", tile)
    with kernels.set_backend("torch"):
        for T in (1.0, 0.7):
            x = _logits((3, 4), 300, dtype, neg_inf=3)
            _check_against_reference(x, _labels((3, 4), 300, logits=x), T, RTOL[dtype])
            x = _logits((2, 3), 300, torch.float32, contiguous=False) + 1e4
            _check_against_reference(x, _labels((2, 3), 300), T, 1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_multiple_vocab_blocks(monkeypatch):
    """Force the Triton kernels to stream the vocabulary in several blocks (online logsumexp)."""
    from rlhf_engine.kernels._triton import logprobs as tl_logprobs

    monkeypatch.setattr(tl_logprobs, "MAX_BLOCK_V", 64)
    with kernels.set_backend("triton"):
        x = _logits((3, 2), 200, torch.float32, neg_inf=70)  # some blocks entirely -inf
        _check_against_reference(x, _labels((3, 2), 200, logits=x), 0.7, 1e-5)
        x = _logits((4,), 150, torch.bfloat16) + 1e3
        _check_against_reference(x, _labels((4,), 150), 1.0, 1e-2)


def test_float64_input_is_exact():
    with kernels.set_backend("torch"):
        x = torch.randn(4, 100, dtype=torch.float64)
        lab = torch.randint(0, 100, (4,))
        lp = kernels.logprobs_from_logits(x, lab)
        assert lp.dtype == torch.float64
        torch.testing.assert_close(lp, kernels.logprobs_from_logits_reference(x, lab), rtol=1e-12, atol=1e-12)


def test_no_full_vocab_float32_tensor(monkeypatch):
    """Structural check: no float32 tensor as large as [N, V] is ever allocated (bf16 logits)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max_fp32 = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.dtype == torch.float32 \
                        and o.untyped_storage().data_ptr() not in inputs:
                    self.max_fp32 = max(self.max_fp32, o.numel())
            return out

    monkeypatch.setattr(_chunked, "TILE_ELEMS", 4096)
    N, V = 64, 1000
    x = _logits((N,), V, torch.bfloat16).requires_grad_()
    with kernels.set_backend("torch"), Largest() as mode:
        lp, ent = kernels.logprobs_from_logits(x, _labels((N,), V), return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert 0 < mode.max_fp32 <= 4096 < N * V


def test_bad_inputs():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="labels shape"):
        kernels.logprobs_from_logits(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        kernels.logprobs_from_logits(x, torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="temperature"):
        kernels.logprobs_from_logits(x, torch.tensor([0, 1, 2]), temperature=0.0)
    with pytest.raises(TypeError, match="integer"):
        kernels.logprobs_from_logits(x, torch.zeros(3))


def test_int32_labels_and_no_grad(backend):
    x = _logits((4,), 50, torch.float32)
    lab = torch.tensor([1, 2, -100, 49], dtype=torch.int32)
    with torch.no_grad():
        lp = kernels.logprobs_from_logits(x, lab)
    assert_matches(lp, kernels.logprobs_from_logits_reference(x.double(), lab), 1e-5)


def test_empty_batch(backend):
    x = torch.randn(0, 3, 9, requires_grad=True)
    lp, ent = kernels.logprobs_from_logits(x, torch.zeros(0, 3, dtype=torch.long), return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == ent.shape == (0, 3) and x.grad.shape == x.shape
