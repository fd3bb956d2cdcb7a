"""linear_logprobs: every backend and tiling against float64 autograd on the reference."""

import pytest
import torch
from kernel_checks import assert_matches

from rlhf_engine import kernels
from rlhf_engine.kernels import _chunked, _linear

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(lead, H, V, dtype, n_ignored=3):
    h = torch.randn(*lead, H, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, dtype=torch.float64) * 2 / H ** 0.5).to(dtype)
    lab = torch.randint(0, V, lead)
    lab.view(-1)[torch.randperm(lab.numel())[:n_ignored]] = -100
    return h, w, lab


def _check(h, w, lab, T, rtol, entropy=True, chunk=None, need=(True, True)):
    hi, wi = h.detach().clone().requires_grad_(need[0]), w.detach().clone().requires_grad_(need[1])
    hr, wr = h.detach().double().requires_grad_(need[0]), w.detach().double().requires_grad_(need[1])
    out = kernels.linear_logprobs(hi, wi, lab, T, return_entropy=entropy, chunk_tokens=chunk)
    ref = kernels.linear_logprobs_reference(hr, wr, lab, T, return_entropy=entropy)
    out, ref = (out, ref) if entropy else ((out,), (ref,))
    loss = loss_r = 0
    for name, a, r in zip(("logprobs", "entropy"), out, ref):
        assert a.dtype == torch.float32 and a.shape == lab.shape
        assert_matches(a, r, rtol, name)
        g = torch.randn(a.shape, dtype=torch.float64)
        loss, loss_r = loss + (a * g.float()).sum(), loss_r + (r * g).sum()
    loss.backward()
    loss_r.backward()
    for name, t, tr in (("grad hidden", hi, hr), ("grad weight", wi, wr)):
        if tr.requires_grad:
            assert t.grad.dtype == t.dtype
            assert_matches(t.grad, tr.grad, rtol, name)
        else:
            assert t.grad is None
    ignored = lab == -100
    assert torch.all(out[0][ignored] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_matches_reference(backend, dtype, T):
    h, w, lab = _inputs((2, 9), 32, 301, dtype)
    _check(h, w, lab, T, RTOL[dtype], chunk=4)  # 18 tokens in chunks of 4: a ragged last chunk


@pytest.mark.parametrize("entropy", [False, True])
def test_entropy_optional_and_default_chunk(backend, entropy):
    h, w, lab = _inputs((13,), 16, 100, torch.float32)
    _check(h, w, lab, 1.0, 1e-5, entropy=entropy)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_partial_gradients(backend, need):
    h, w, lab = _inputs((6,), 16, 70, torch.float32)
    _check(h, w, lab, 0.9, 1e-5, chunk=4, need=need)


@pytest.mark.parametrize("block", [16, 100, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_vocab_blocks(monkeypatch, block, dtype):
    """The torch tiling: several vocab blocks (a ragged last one), a single block, ragged chunks."""
    monkeypatch.setattr(_linear, "VOCAB_BLOCK", block)
    with kernels.set_backend("torch"):
        h, w, lab = _inputs((3, 7), 24, 250, dtype)
        for T in (1.0, 0.6):
            _check(h, w, lab, T, RTOL[dtype], chunk=5)


def test_torch_default_tile(monkeypatch):
    monkeypatch.setattr(_chunked, "TILE_ELEMS", 64 * 8)
    monkeypatch.setattr(_linear, "VOCAB_BLOCK", 64)
    with kernels.set_backend("torch"):
        assert kernels.default_chunk_tokens(200) == 8
        h, w, lab = _inputs((30,), 16, 200, torch.float32)
        _check(h, w, lab, 1.0, 1e-5)


def test_large_logits(backend):
    h, w, lab = _inputs((8,), 16, 90, torch.float32)
    _check(h * 300, w, lab, 1.0, 1e-5, chunk=3)  # logits in the thousands: near one-hot softmax


def test_never_holds_token_by_vocab(monkeypatch):
    """Structural check: no tensor with N*V elements (or more) is allocated in forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self.largest = max(self.largest, o.numel())
            return out

    monkeypatch.setattr(_chunked, "TILE_ELEMS", 32 * 128)
    monkeypatch.setattr(_linear, "VOCAB_BLOCK", 128)
    N, H, V = 128, 8, 500
    h, w, lab = _inputs((N,), H, V, torch.bfloat16)
    h.requires_grad_(), w.requires_grad_()
    with kernels.set_backend("torch"), Largest() as mode:
        lp, ent = kernels.linear_logprobs(h, w, lab, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert mode.largest <= max(32 * 128, V * H, N * H) < N * V


def test_empty_batch(backend):
    h = torch.randn(0, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    lp, ent = kernels.linear_logprobs(h, w, torch.zeros(0, dtype=torch.long), return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == (0,) and torch.equal(w.grad, torch.zeros_like(w)) and h.grad.shape == (0, 4)


def test_bad_inputs():
    h, w, lab = _inputs((4,), 8, 20, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        kernels.linear_logprobs(h, w.t(), lab)
    with pytest.raises(TypeError, match="share a dtype"):
        kernels.linear_logprobs(h, w.double(), lab)
    with pytest.raises(ValueError, match="labels must be in"):
        kernels.linear_logprobs(h, w, torch.tensor([0, 1, 2, 20]))
