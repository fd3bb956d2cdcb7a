"""engine/rollout.py: our decode loop against HF generate(), sampling warpers, response masks.

Real tiny-llama (random weights, SmolLM2 tokenizer) and the embedded SmolLM2 for the greedy check.
"""
from __future__ import annotations

import pytest
import torch

from rlhf_engine.config import GenerationSection, ModelConfig
from rlhf_engine.models import load_policy, load_tokenizer
from rlhf_engine.rollout import generate, sample_categorical, sample_tokens, warp_logits

PROMPTS = ["Write one sentence about the sea.", "Hi", "Name three colours, please, and explain why you like them."]


def _batch(tokenizer):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][:, 0] == 0).any(), "prompts of different lengths must be left-padded"
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module", params=["tiny-llama", "smollm2-135m-instruct"])
def policy(request):
    cfg = ModelConfig(name_or_path=request.param)
    return load_policy(cfg, for_training=False), load_tokenizer(cfg)


@pytest.mark.parametrize("min_new", [0, 5])
def test_greedy_decode_matches_hf_generate(policy, min_new):
    model, tokenizer = policy
    ids, mask = _batch(tokenizer)
    gen = GenerationSection(max_new_tokens=12, min_new_tokens=min_new, do_sample=False)
    ours = sample_tokens(model, ids, mask, gen, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=min_new,
                        do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        temperature=None, top_p=None, top_k=None)[:, ids.shape[1]:]
    assert torch.equal(ours, hf[:, :ours.shape[1]]), (ours, hf)
    assert ours.shape[1] == hf.shape[1] or (hf[:, ours.shape[1]:] == tokenizer.pad_token_id).all()


def test_eos_ends_rows_and_pads_after(policy):
    model, tokenizer = policy
    ids, mask = _batch(tokenizer)
    eos = tokenizer.eos_token_id
    # make EOS the greedy choice from the 3rd token on by biasing the head: every row must stop there
    with torch.no_grad():
        torch.manual_seed(0)
        gen = GenerationSection(max_new_tokens=8, min_new_tokens=2, do_sample=False)
        bias = torch.zeros(model.config.vocab_size)
        bias[eos] = 1e4
        handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: out + bias)
        try:
            out = sample_tokens(model, ids, mask, gen, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            resp, rmask, has_eos = generate(model, tokenizer, ids, mask, gen)
        finally:
            handle.remove()
    assert out.shape[1] == 3 and (out[:, 2] == eos).all() and (out[:, :2] != eos).all()  # min_new_tokens held
    assert resp.shape[1] == 8 and has_eos.all()
    assert rmask.sum(1).tolist() == [3.0] * 3 and (resp[:, 3:] == tokenizer.pad_token_id).all()


def test_sampling_is_seeded_and_ignore_eos_gives_full_length(policy):
    model, tokenizer = policy
    ids, mask = _batch(tokenizer)
    gen = GenerationSection(max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.9, ignore_eos=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(generate(model, tokenizer, ids, mask, gen))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][0].shape == (3, 6) and runs[0][1].sum() == 18


def test_warp_logits_top_k_top_p_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    keep = lambda gen: torch.isfinite(warp_logits(logits, gen))[0].tolist()  # noqa: E731
    assert keep(GenerationSection(top_k=2)) == [False, False, False, True, True]
    probs = logits.softmax(-1)[0]  # 0.012 0.032 0.086 0.234 0.636
    assert keep(GenerationSection(top_p=0.6)) == [False, False, False, False, True]
    assert keep(GenerationSection(top_p=0.8)) == [False, False, False, True, True]
    assert keep(GenerationSection(top_p=float(probs[2:].sum()) + 1e-3)) == [False, True, True, True, True]
    assert torch.allclose(warp_logits(logits, GenerationSection(temperature=2.0)), logits / 2)


def test_sample_categorical_matches_the_distribution_and_skips_zeros():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    draws = sample_categorical(probs.repeat(100_000, 1))
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert freq[1] == 0 and freq[4] == 0, "zero-probability tokens must never be drawn"
    assert torch.allclose(freq, probs.double(), atol=5e-3), freq  # ~5 standard errors
    one_hot = torch.zeros(3, 7)
    one_hot[torch.arange(3), torch.tensor([6, 0, 3])] = 1.0
    assert sample_categorical(one_hot).tolist() == [6, 0, 3]
