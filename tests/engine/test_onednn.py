"""rlhf_engine.backends.cpu.onednn: float32 CPU linears on oneDNN give F.linear's values and gradients (to float32
summation order), and take over only where they should: float32 on CPU outside autocast, in every
loaded model unless `cpu.onednn_linear: false`."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import cpu_switches
from rlhf_engine.backends.cpu import onednn
from rlhf_engine.config import ModelConfig
from rlhf_engine.models import load_policy, load_scalar_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _ours(t: torch.Tensor) -> bool:
    return type(t.grad_fn).__name__ == "_Fp32LinearBackward"


def test_this_build_has_onednn():
    assert onednn.AVAILABLE, "torch was built without oneDNN: every linear falls back to F.linear"


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_linear_matches_f_linear_values_and_gradients(with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 40, generator=g, requires_grad=True)
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True) if with_bias else None
    upstream = torch.randn(3, 7, 24, generator=g)
    grads = {}
    for name, fn in (("onednn", onednn.linear), ("aten", F.linear)):
        y = fn(x, w, b)
        assert _ours(y) == (name == "onednn")
        leaves = [x, w] + ([b] if with_bias else [])
        grads[name] = (y.detach(), *torch.autograd.grad(y, leaves, upstream))
    for got, want in zip(grads["onednn"], grads["aten"]):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _rel(got, want) < 1e-6


def test_only_float32_outside_autocast_takes_the_onednn_path():
    x, w = torch.randn(5, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    assert _ours(onednn.linear(x, w))
    assert not _ours(onednn.linear(x.bfloat16(), w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = onednn.linear(x, w)
    assert y.dtype == torch.bfloat16 and not _ours(y)  # autocast's own bf16 matmul


def test_input_grad_is_grad_out_times_weight():
    g = torch.Generator().manual_seed(1)
    grad_out, w = torch.randn(2, 9, 24, generator=g), torch.randn(24, 40, generator=g)
    assert _rel(onednn.input_grad(grad_out, w), grad_out @ w) < 1e-6


def test_loaded_models_use_it_unless_turned_off():
    def patched(model):
        return [("forward" in vars(m)) for m in model.modules() if type(m) is nn.Linear]

    policy = load_policy(ModelConfig(name_or_path="tiny-llama"))
    reference = load_policy(ModelConfig(name_or_path="tiny-llama"), for_training=False)
    critic = load_scalar_model(ModelConfig(name_or_path="tiny-llama"))
    for model in (policy, reference, critic):
        assert patched(model) and all(patched(model))
    with cpu_switches(onednn_linear=False):
        off = load_policy(ModelConfig(name_or_path="tiny-llama"))
    assert patched(off) and not any(patched(off))
    # the lean MLP (lean.py) follows its projections: oneDNN in `policy`, aten in `off`
    assert all(onednn.is_routed(m.mlp.down_proj) for m in policy.model.layers)
    assert not any(onednn.is_routed(m.mlp.down_proj) for m in off.model.layers)


def test_a_training_step_of_a_loaded_policy_matches_the_aten_linears():
    """Same logits and gradients (float32 summation order) with and without the switch, lean MLP included."""
    on = load_policy(ModelConfig(name_or_path="tiny-llama"))
    with cpu_switches(onednn_linear=False, lean_activations=False):
        off = load_policy(ModelConfig(name_or_path="tiny-llama"))
    off.load_state_dict(on.state_dict())
    ids = torch.randint(0, on.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(2))
    results = []
    for model in (on, copy.deepcopy(off)):
        logits = model(ids).logits
        loss = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).mean()
        loss.backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits_on, grads_on), (logits_off, grads_off) = results
    assert _rel(logits_on, logits_off) < 1e-5
    assert grads_on.keys() == grads_off.keys()
    for name, g in grads_on.items():
        assert _rel(g, grads_off[name]) < 1e-4, name
