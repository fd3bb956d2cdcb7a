"""SFT (stage 1): the response-only loss by hand, packing equals no packing on a real tiny model,
a LoRA run whose merged export reproduces the trained eval loss, and a real 2-rank ZeRO-3 run."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_engine.config import load_recipe
from rlhf_engine.data import collate_sft, load_sft
from rlhf_engine.models import load_policy, load_tokenizer
from rlhf_engine.sft import SFTTask, sft_loss, train_sft
from helpers import REPO, json_lines, run_deepspeed

TINY_SFT = REPO / "recipes/tiny/sft-zero3.yaml"


def test_sft_loss_counts_response_tokens_only():
    torch.manual_seed(0)
    V = 7
    logits = torch.randn(2, 5, V, requires_grad=True)
    # row 0: prompt of 2 tokens, 3 response tokens; row 1: prompt of 3, 1 response token, 1 padding
    labels = torch.tensor([[-100, -100, 4, 1, 6], [-100, -100, -100, 2, -100]])
    loss, n = sft_loss(logits, labels)
    logp = torch.log_softmax(logits.detach().double(), -1)
    # position t predicts token t + 1
    targets = [(0, 1, 4), (0, 2, 1), (0, 3, 6), (1, 2, 2)]
    expected = -sum(float(logp[b, t, tok]) for b, t, tok in targets) / len(targets)
    assert int(n) == 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    grad_rows = logits.grad.abs().sum(-1)  # [2, 5]
    used = torch.zeros(2, 5, dtype=torch.bool)
    for b, t, _ in targets:
        used[b, t] = True
    assert (grad_rows[~used] == 0).all(), "positions predicting prompt/padding tokens must get no gradient"
    assert (grad_rows[used] > 0).all()


def test_collated_rows_mask_the_prompt_and_packing_keeps_sequences_apart():
    recipe = load_recipe(TINY_SFT, ["data.limit=6", "data.eval_size=0"])
    tokenizer = load_tokenizer(recipe.model)
    train, _, _ = load_sft(recipe.data, tokenizer, recipe.seed)
    items = [train[i] for i in range(4)]
    batch = collate_sft(items, tokenizer.pad_token_id)
    for row, it in zip(batch["labels"], items):
        assert (row[:it["prompt_len"]] == -100).all()
        assert row[it["prompt_len"]:len(it["input_ids"])].tolist() == it["input_ids"][it["prompt_len"]:]
        assert it["input_ids"][-1] == tokenizer.eos_token_id  # the model learns to stop
    model = load_policy(recipe.model).eval()
    task = SFTTask(recipe, tokenizer.pad_token_id)
    with torch.no_grad():
        plain, n_plain = sft_loss(task.forward_logits(model, batch), batch["labels"])
        packed_batch = collate_sft(items, tokenizer.pad_token_id, pack=True, max_length=recipe.data.max_length * 2)
        assert packed_batch["input_ids"].shape[0] < len(items)  # several rows really share one packed row
        packed, n_packed = sft_loss(task.forward_logits(model, packed_batch), packed_batch["labels"])
    assert int(n_plain) == int(n_packed)
    # equal only if packed sequences cannot attend to each other
    assert packed.item() == pytest.approx(plain.item(), abs=1e-4)


def _eval_loss(model, tokenizer, recipe, n_rows) -> float:
    """Token-mean response NLL of the first n_rows held-out rows, recomputed outside the engine."""
    _, eval_ds, _ = load_sft(recipe.data, tokenizer, recipe.seed)
    task = SFTTask(recipe, tokenizer.pad_token_id)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, n_rows, 4):
            batch = collate_sft([eval_ds[i] for i in range(start, min(start + 4, n_rows))], tokenizer.pad_token_id)
            loss, n = sft_loss(task.forward_logits(model, batch), batch["labels"])
            nll, tokens = nll + loss.item() * int(n), tokens + int(n)
    return nll / tokens


def test_lora_sft_exports_merged_model(tmp_path, restore_env):
    recipe = load_recipe(TINY_SFT, [f"output_dir={tmp_path}", "deepspeed.zero_stage=0", "train.steps=3",
                                    "model.lora.r=4", "model.lora.alpha=8", "optim.lr=1e-2", "sft.pack=true",
                                    "train.eval_size=8", "num_threads=2"])
    summary = train_sft(recipe)
    final = Path(summary["final_dir"])
    with safe_open(final / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k], "adapters must be merged"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template, "the exported tokenizer keeps the chat template"
    # the merged weights reproduce what the trained LoRA model scored (and differ from the base model)
    assert _eval_loss(model, tokenizer, recipe, 8) == pytest.approx(summary["eval_after"]["loss"], abs=1e-4)
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.01


def test_sft_zero3_two_ranks(tmp_path):
    proc = run_deepspeed("launch/train.py", TINY_SFT, "--set", f"output_dir={tmp_path}")
    summary = json_lines(proc.stdout, "SUMMARY_JSON ")[0]
    run_dir = tmp_path / "tiny-sft-zero3"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/train"] for r in rows]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    before, after = summary["eval_before"]["loss"], summary["eval_after"]["loss"]
    assert after < before - 0.3
    assert summary["eval_after"]["perplexity"] == pytest.approx(math.exp(after), rel=1e-4)
    # the ZeRO-3 shards were gathered into a whole model: reloading it reproduces the trained eval loss
    final = run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    recipe = load_recipe(TINY_SFT, [f"output_dir={tmp_path}"])
    assert _eval_loss(model, tokenizer, recipe, summary["eval_rows"]) == pytest.approx(after, abs=1e-4)
