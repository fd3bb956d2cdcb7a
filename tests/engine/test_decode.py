"""rlhf_engine.backends.cpu.decode: the fused Llama-family decode step against the models' own HF forward.

Teacher-forced: both paths get the same prompts (left-padded) and the same next tokens, and their
next-token logits are compared at every step. Real tiny-llama (SmolLM2 tokenizer), the embedded
SmolLM2 (fp32 and bf16), and random Qwen2 (attention biases), Mistral and Llama-3-rope configs.
"""
from __future__ import annotations

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from helpers import cpu_switches
from rlhf_engine.config import GenerationSection, ModelConfig
from rlhf_engine.backends.cpu.decode import FusedDecoder
from rlhf_engine.models import load_policy
from rlhf_engine.rollout import _decode_steps, sample_tokens

STEPS = 6


def _prompts(vocab: int, batch: int = 3, length: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :4] = 0  # left padding of different lengths
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def _teacher_forced_logits(model, ids, mask, fused: bool) -> list[torch.Tensor]:
    gen = GenerationSection(max_new_tokens=STEPS + 1)
    with cpu_switches(fused_decode=fused):
        prefill, step = _decode_steps(model, ids, mask, gen)
    g = torch.Generator().manual_seed(1)
    out = [prefill()]
    for _ in range(STEPS):
        tokens = torch.randint(3, model.config.vocab_size, (ids.shape[0],), generator=g)
        out.append(step(tokens))
    return out


def _assert_same_logits(model, ids, mask, rtol: float):
    assert FusedDecoder.why_unsupported(model) is None
    with torch.no_grad():
        fused = _teacher_forced_logits(model, ids, mask, fused=True)
        ref = _teacher_forced_logits(model, ids, mask, fused=False)
    clear_rows = 0
    for t, (a, b) in enumerate(zip(fused, ref)):
        assert a.shape == b.shape == (ids.shape[0], model.config.vocab_size)
        diff = (a - b).abs().max().item()
        err = diff / b.abs().max().item()
        assert err < rtol, f"step {t}: fused logits differ from the HF forward by {err:.2e} (relative)"
        # greedy tokens agree wherever the reference's top-2 margin exceeds the logit error (bf16 has ties)
        top2 = b.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * diff
        clear_rows += int(clear.sum())
        assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear]), f"step {t}: greedy tokens differ"
    assert clear_rows > 0, "test setup: no step had a row with a clear greedy choice"


def _random(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.parametrize("name", ["tiny-llama", "smollm2-135m-instruct"])
def test_fused_decode_matches_hf_forward_fp32(name):
    model = load_policy(ModelConfig(name_or_path=name), for_training=False).eval()
    ids, mask = _prompts(model.config.vocab_size)
    _assert_same_logits(model, ids, mask, rtol=1e-4)


def test_fused_decode_matches_hf_forward_bf16():
    model = load_policy(ModelConfig(name_or_path="smollm2-135m-instruct", dtype="bf16"), for_training=False).eval()
    ids, mask = _prompts(model.config.vocab_size)
    # bf16 rounding differs by summation order (SDPA vs eager softmax/matmul): logits of ~30 have a
    # bf16 step of 0.125-0.25, and we see ~2 such steps at most (measured: max 0.57, mean ~0.1)
    _assert_same_logits(model, ids, mask, rtol=3e-2)


@pytest.mark.parametrize("cls,config", [
    (Qwen2ForCausalLM, Qwen2Config(**SMALL)),  # q/k/v biases
    (MistralForCausalLM, MistralConfig(**SMALL, sliding_window=None)),
    (LlamaForCausalLM, LlamaConfig(**SMALL, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 32})),  # scaled rotary
    (LlamaForCausalLM, LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, tie_word_embeddings=False)),  # MHA
], ids=["qwen2-bias", "mistral", "llama3-rope", "llama-mha-untied"])
def test_fused_decode_matches_hf_forward_other_llama_family(cls, config):
    model = _random(cls, config)
    ids, mask = _prompts(config.vocab_size)
    _assert_same_logits(model, ids, mask, rtol=1e-4)


def test_unsupported_models_fall_back_with_a_reason():
    gpt2 = _random(GPT2LMHeadModel, GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2))
    assert "GPT2LMHeadModel" in FusedDecoder.why_unsupported(gpt2)
    assert FusedDecoder.build(gpt2, 2, 10) is None

    llama = _random(LlamaForCausalLM, LlamaConfig(**SMALL))
    handle = llama.model.layers[0].register_forward_hook(lambda *a: None)
    assert "hooks" in FusedDecoder.why_unsupported(llama)
    handle.remove()
    assert FusedDecoder.why_unsupported(llama) is None

    sliding = _random(MistralForCausalLM, MistralConfig(**SMALL, sliding_window=16))
    assert "sliding" in FusedDecoder.why_unsupported(sliding)


def test_lora_runs_fused_only_when_merged():
    from peft import LoraConfig, get_peft_model

    base = _random(LlamaForCausalLM, LlamaConfig(**SMALL))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    hf = peft_model.get_base_model()
    assert "adapters" in FusedDecoder.why_unsupported(hf)
    for m in hf.modules():
        if hasattr(m, "merge") and hasattr(m, "base_layer"):
            m.merge()
    ids, mask = _prompts(SMALL["vocab_size"])
    _assert_same_logits(hf, ids, mask, rtol=1e-4)


@pytest.mark.parametrize("min_new", [0, 4])
def test_sample_tokens_same_tokens_fused_or_not(min_new):
    model = load_policy(ModelConfig(name_or_path="tiny-llama"), for_training=False).eval()
    ids, mask = _prompts(model.config.vocab_size)
    eos = int(ids[0, -1])  # a token the random model may well produce: exercises early stops
    runs = {}
    for fused in (True, False):
        gen = GenerationSection(max_new_tokens=10, min_new_tokens=min_new, do_sample=False)
        sampled = GenerationSection(max_new_tokens=10, temperature=0.7, top_k=20)
        with cpu_switches(fused_decode=fused):
            runs[fused] = sample_tokens(model, ids, mask, gen, eos_token_id=eos, pad_token_id=0)
            torch.manual_seed(5)
            runs[(fused, "sampled")] = sample_tokens(model, ids, mask, sampled, eos_token_id=None, pad_token_id=0)
    assert torch.equal(runs[True], runs[False])
    assert torch.equal(runs[(True, "sampled")], runs[(False, "sampled")])


def test_cache_overflow_is_an_error():
    model = _random(LlamaForCausalLM, LlamaConfig(**SMALL))
    ids, mask = _prompts(SMALL["vocab_size"], length=5)
    decoder = FusedDecoder.build(model, batch=3, max_len=6)
    decoder.prefill(ids, mask)
    decoder.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cache length 6"):
        decoder.step(torch.zeros(3, dtype=torch.long))
