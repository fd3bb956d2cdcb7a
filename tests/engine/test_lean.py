"""rlhf_engine.backends.cpu.lean: memory-lean MLP and RMSNorm forwards against the models' own modules.

Same forward (bitwise), same gradients (to float32 / bfloat16 rounding), fewer saved activations
(counted with autograd's saved-tensor hooks), on random Llama/Qwen2/Mistral models and the embedded
SmolLM2; LoRA-wrapped projections and `cpu.lean_activations: false` keep the HF forward.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from helpers import cpu_switches
from rlhf_engine.config import LoraConfig, ModelConfig
from rlhf_engine.backends.cpu.lean import MLP_CLASSES, NORM_CLASSES, make_lean, why_not_lean
from rlhf_engine.models import load_policy, load_scalar_model
from rlhf_engine.backends.cpu.onednn import use_onednn_linears

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _random(cls, config):
    torch.manual_seed(0)
    return cls(config)


def _ids(vocab: int, batch: int = 3, length: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _forward_backward(model, ids, autocast: bool):
    """Logits and every parameter's gradient of a log-prob loss (the shape of a policy loss)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids).logits
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    (-(logp * weights).mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_activation_bytes(model, ids, autocast: bool) -> int:
    """Bytes autograd keeps for backward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.model(ids)
    return sum(n for ptr, n in kept.items() if ptr not in params)


def _assert_same(model, autocast: bool, grad_rtol: float, onednn: bool = False):
    if onednn:  # the lean MLP then runs its float32 linears on oneDNN too (onednn.py)
        use_onednn_linears(model)
    lean = copy.deepcopy(model)
    counts = make_lean(lean)
    layers = model.config.num_hidden_layers
    assert counts == {"mlp": layers, "norm": 2 * layers + 1, "skipped": 0}
    ids = _ids(model.config.vocab_size)
    ref_logits, ref_grads = _forward_backward(model, ids, autocast)
    logits, grads = _forward_backward(lean, ids, autocast)
    assert torch.equal(logits, ref_logits), "the lean forward must compute exactly the same numbers"
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        ref = ref_grads[name]
        assert g.dtype == ref.dtype
        err = ((g - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        assert err < grad_rtol, f"{name}: gradient differs by {err:.2e} (relative norm)"


@pytest.mark.parametrize("onednn", [False, True], ids=["aten-linears", "onednn-linears"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("cls,config", [
    (LlamaForCausalLM, LlamaConfig(**SMALL)),
    (LlamaForCausalLM, LlamaConfig(**SMALL, mlp_bias=True, tie_word_embeddings=False)),  # MLP biases
    (Qwen2ForCausalLM, Qwen2Config(**SMALL)),
    (MistralForCausalLM, MistralConfig(**SMALL, sliding_window=None)),
], ids=["llama", "llama-mlp-bias", "qwen2", "mistral"])
def test_lean_forward_and_gradients_match_hf_modules(cls, config, autocast, onednn):
    # float32: summation order only; bf16 autocast: some bf16 roundings land elsewhere (bf16's relative
    # step is 7.8e-3: single entries differ by up to half of it relative to the largest)
    _assert_same(_random(cls, config), autocast, grad_rtol=2e-3 if autocast else 1e-5, onednn=onednn)


def test_lean_smollm2_keeps_40_percent_fewer_activations():
    with cpu_switches(lean_activations=False):
        model = load_policy(ModelConfig(name_or_path="smollm2-135m-instruct"))
    lean = copy.deepcopy(model)
    make_lean(lean)
    small, large = (_ids(model.config.vocab_size, batch=b, length=24) for b in (2, 4))
    for autocast in (False, True):
        # what grows with the batch: activations (autocast's bf16 weight copies are kept once either way)
        base, kept = (_saved_activation_bytes(m, large, autocast) - _saved_activation_bytes(m, small, autocast)
                      for m in (model, lean))
        assert kept < 0.65 * base, f"autocast={autocast}: lean keeps {kept / base:.0%} of the activations"
    with torch.no_grad():
        assert torch.equal(model(small).logits, lean(small).logits)


def test_load_policy_and_scalar_model_apply_it_unless_turned_off():
    lean = load_policy(ModelConfig(name_or_path="tiny-llama"))
    assert all("forward" in vars(m) for m in lean.modules() if type(m) in MLP_CLASSES + NORM_CLASSES)
    with cpu_switches(lean_activations=False):
        plain = load_policy(ModelConfig(name_or_path="tiny-llama"))
    assert not any("forward" in vars(m) for m in plain.modules() if type(m) in MLP_CLASSES + NORM_CLASSES)
    critic = load_scalar_model(ModelConfig(name_or_path="tiny-llama"))
    assert any("forward" in vars(m) for m in critic.modules() if type(m) in MLP_CLASSES)


def test_lora_projections_keep_their_own_forward_and_train_the_adapters():
    cfg = ModelConfig(name_or_path="tiny-llama", lora=LoraConfig(r=4, alpha=8))
    model = load_policy(cfg)
    mlps = [m for m in model.modules() if type(m) in MLP_CLASSES]
    assert mlps and all("forward" not in vars(m) for m in mlps)
    assert "LoRA" in why_not_lean(mlps[0])
    ids = _ids(model.config.vocab_size)
    _, grads = _forward_backward(model, ids, autocast=False)
    assert grads and all("lora_" in n for n in grads)
    assert any("mlp.gate_proj.lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_gradient_checkpointing_recomputes_through_the_lean_forward():
    model = _random(LlamaForCausalLM, LlamaConfig(**SMALL))
    lean = copy.deepcopy(model)
    make_lean(lean)
    lean.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lean.train()
    model.train()
    ids = _ids(SMALL["vocab_size"])
    _, ref = _forward_backward(model, ids, autocast=False)
    _, got = _forward_backward(lean, ids, autocast=False)
    for name, g in got.items():
        assert torch.allclose(g, ref[name], rtol=1e-4, atol=1e-7), name
