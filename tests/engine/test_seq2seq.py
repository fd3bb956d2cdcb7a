"""Seq2seq policies (engine/seq2seq.py) on tiny random T5 and BART models with the real SmolLM2 tokenizer.

- in process: teacher-forced log-probs equal the model's own loss, the decode loop equals HF generate,
  the critic's values sit on the decoder states, the decoder start token comes from the recipe;
- 2 ranks, ZeRO-3: greedy tokens under the hybrid engine equal an unsharded copy (T5; BART with LoRA);
- 2 ranks: PPO steps at ZeRO stage 0 equal stage 3 (actor, critic, reference, reward through one rollout);
  the actor exports as a standard AutoModelForSeq2SeqLM folder.
"""
import math

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from rlhf_engine.checkpoint import export_run
from rlhf_engine.config import GenerationSection, ModelConfig
from rlhf_engine.models import load_policy, load_scalar_model, load_tokenizer
from rlhf_engine.rollout import forward_logprobs, forward_values, generate
from rlhf_engine.seq2seq import is_seq2seq, to_right_padding
from rlhf_engine.tracking import read_jsonl
from helpers import REPO, json_lines, run_deepspeed

RECIPE = "recipes/tiny/ppo-seq2seq.yaml"
LOSSES = ("loss/policy", "loss/value", "score/mean", "kl/mean", "entropy")


def _batch(tokenizer):
    b = tokenizer(["Write a haiku about rain.", "Hi"], return_tensors="pt", padding=True)  # left-padded
    return b.input_ids, b.attention_mask


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bart"])
def test_scoring_generation_and_values_in_process(name):
    cfg = ModelConfig(name_or_path=name)
    tokenizer, model = load_tokenizer(cfg), load_policy(cfg).eval()
    assert is_seq2seq(model) and not any(m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids, mask = _batch(tokenizer)
    gen = GenerationSection(max_new_tokens=6, do_sample=False, ignore_eos=True)
    resp, rmask, _ = generate(model, tokenizer, ids, mask, gen)
    enc, enc_mask = to_right_padding(ids, mask)
    hf = model.generate(input_ids=enc, attention_mask=enc_mask, max_new_tokens=6, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert torch.equal(resp, hf[:, 1:])  # our KV-cache loop = HF generate (which starts with the start token)
    # teacher-forced log-probs: their mean is minus HF's own cross-entropy on the same labels
    seq, attn = torch.cat([ids, resp], 1), torch.cat([mask, rmask.long()], 1)
    logp = forward_logprobs(model, seq, attn, resp.shape[1])
    loss = model(input_ids=enc, attention_mask=enc_mask, labels=resp).loss
    assert logp.shape == resp.shape and -logp.mean().item() == pytest.approx(loss.item(), rel=1e-5)
    # left padding of the prompt changes nothing (the encoder input is moved to right padding)
    alone = forward_logprobs(model, torch.cat([ids[1:, -2:], resp[1:]], 1),
                             torch.cat([mask[1:, -2:], rmask[1:].long()], 1), resp.shape[1])
    torch.testing.assert_close(alone, logp[1:], rtol=1e-5, atol=1e-5)
    # critic: one value per response position; position t sees only y_<t (changing y_t moves values after t)
    critic = load_scalar_model(cfg, init_head_seed=0).eval()
    values = forward_values(critic, seq, attn, resp.shape[1])
    changed = seq.clone()
    changed[:, -3] = (changed[:, -3] + 1) % len(tokenizer)
    values2 = forward_values(critic, changed, attn, resp.shape[1])
    assert values.shape == resp.shape
    torch.testing.assert_close(values[:, :-2], values2[:, :-2])
    assert not torch.allclose(values[:, -2:], values2[:, -2:])


def test_context_start_token_is_read_and_checked():
    tokenizer = load_tokenizer(ModelConfig(name_or_path="tiny-t5"))
    start = tokenizer.bos_token_id
    model = load_policy(ModelConfig(name_or_path="tiny-t5", context_start_token=start)).eval()
    assert model.config.decoder_start_token_id == start == model.generation_config.decoder_start_token_id
    default = load_policy(ModelConfig(name_or_path="tiny-t5")).eval()
    assert default.config.decoder_start_token_id == tokenizer.pad_token_id != start  # T5: the pad token
    ids, mask = _batch(tokenizer)
    resp = torch.tensor([[5, 6, 7], [8, 9, 10]])
    seq, attn = torch.cat([ids, resp], 1), torch.cat([mask, torch.ones_like(resp)], 1)
    assert not torch.allclose(forward_logprobs(model, seq, attn, 3), forward_logprobs(default, seq, attn, 3))
    with pytest.raises(ValueError, match="context_start_token"):
        load_policy(ModelConfig(name_or_path="tiny-llama", context_start_token=0))


def test_zero3_hybrid_greedy_equals_unsharded_copy():
    proc = run_deepspeed(REPO / "tests/engine/workers/seq2seq_worker.py", nproc=2)
    lines = json_lines(proc.stdout, "SEQ2SEQ ")
    assert sorted((r["model"], r["rank"]) for r in lines) == [("tiny-bart", 0), ("tiny-bart", 1),
                                                             ("tiny-t5", 0), ("tiny-t5", 1)]
    for r in lines:
        assert r["sharded_params"] > 0 and math.isfinite(r["loss"]), r
        hybrid, sharded, unsharded = r["hybrid"], r["sharded"], r["unsharded"]
        for key in ("greedy", "sampled"):
            assert hybrid[key] == unsharded[key] == sharded[key], (r["model"], r["rank"], key)
        assert hybrid["logp"] == pytest.approx(unsharded["logp"], abs=1e-4), r["model"]
        assert hybrid["logp"] == pytest.approx(sharded["logp"], abs=1e-4), r["model"]
    assert all(r["lora_b_max"] > 0 for r in lines if r["lora"])  # the step moved the adapters: merge matters
    samples = {(r["model"], r["rank"]): r["hybrid"]["sampled"] for r in lines}
    assert samples[("tiny-t5", 0)] != samples[("tiny-t5", 1)]  # ranks decoded different prompts


def _ppo(tmp_path, name, *overrides):
    run_deepspeed("launch/train.py", RECIPE, f"--set=output_dir={tmp_path}", f"--set=name={name}",
                  *[f"--set={o}" for o in overrides])
    return read_jsonl(tmp_path / name / "metrics.jsonl"), read_jsonl(tmp_path / name / "eval.jsonl")


def test_ppo_zero_stage_0_equals_stage_3_and_exports(tmp_path):
    m3, e3 = _ppo(tmp_path, "z3", "deepspeed.zero_stage=3")
    m0, e0 = _ppo(tmp_path, "z0", "deepspeed.zero_stage=0")
    assert [m["step"] for m in m3] == [m["step"] for m in m0] == [1, 2]
    for a, b in zip(m3, m0):
        for key in LOSSES:
            assert math.isfinite(a[key]), (key, a)
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (a["step"], key, a[key], b[key])
    assert all(m["policy/approx_kl"] > 0 for m in m3)  # the second mini-batch saw moved weights
    assert e3[0]["kl/mean"] == 0.0 and abs(e3[-1]["kl/mean"]) > 1e-4  # the actor left the reference
    assert e3[-1]["score/mean"] == pytest.approx(e0[-1]["score/mean"], abs=1e-6)
    out = export_run(tmp_path / "z3", tmp_path / "export")
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert "AutoModelForSeq2SeqLM" in (out / "README.md").read_text()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(out)))
    ids, mask = _batch(tokenizer)
    assert generate(model.eval(), tokenizer, ids, mask, GenerationSection(max_new_tokens=4))[0].shape == (2, 4)


def test_lora_critic_keeps_its_value_head_trainable():
    cfg = ModelConfig(name_or_path="tiny-bart", lora={"r": 4})
    critic = load_scalar_model(cfg, init_head_seed=0)
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert any("classification_head" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("lora" not in n and "classification_head" not in n for n in trainable)
