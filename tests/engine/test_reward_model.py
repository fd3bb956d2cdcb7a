"""Reward model (stage 2): Bradley-Terry loss by hand, a real MiniLM run that separates the shipped
pairs and exports a folder scoring exactly like the trained model, and a 2-rank ZeRO-3 causal-backbone run."""
import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_engine.config import ModelConfig, load_recipe
from rlhf_engine.data import collate_pairs
from rlhf_engine.models import load_scalar_model
from rlhf_engine.reward_model import RewardModelTask, bradley_terry_loss, train_reward_model
from helpers import REPO, json_lines, run_deepspeed

SMOKE_RM = REPO / "recipes/smoke/rm-minilm.yaml"
TINY_RM = REPO / "recipes/tiny/rm.yaml"


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    loss = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((0.126928 + 0.693147) / 2, abs=1e-6)
    loss.backward()
    # d/ds_c of the mean = -(1 - sigmoid(diff)) / B
    assert chosen.grad.tolist() == pytest.approx([-(1 - 1 / (1 + math.exp(-2))) / 2, -0.25], abs=1e-6)
    # a margin is subtracted from the gap: both pairs now have gap - margin = 1 -> log(1 + e^-1) = 0.313262
    margin = torch.tensor([1.0, -1.0])
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(0.313262, abs=1e-6)
    # centering adds coef * mean((s_c + s_r)^2) = 0.1 * (4 + 0) / 2
    assert bradley_terry_loss(chosen, rejected, center_coef=0.1).item() == pytest.approx(0.410038 + 0.2, abs=1e-6)
    # large gaps stay finite (softplus, not log(sigmoid))
    assert math.isfinite(bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0])).item())


def _eval_scores(scorer, tokenizer, recipe, n_rows):
    """(chosen, rejected) scores [n] of the first n_rows held-out pairs, recomputed outside the engine."""
    task = RewardModelTask(recipe)
    _, eval_ds, _ = task.load_data(recipe, tokenizer)
    batch = collate_pairs([eval_ds[i] for i in range(n_rows)], tokenizer.pad_token_id)
    with torch.no_grad():
        return scorer(batch["chosen_ids"], batch["chosen_mask"]), scorer(batch["rejected_ids"], batch["rejected_mask"])


def test_minilm_reward_model_learns_and_exports(tmp_path, restore_env):
    recipe = load_recipe(SMOKE_RM, [f"output_dir={tmp_path}", "train.steps=6", "train.mini_batch_size=8",
                                    "train.micro_batch_size=8", "train.eval_every=0", "train.eval_size=32",
                                    "optim.warmup_steps=0", "optim.scheduler=constant", "data.max_length=64",
                                    "logging.plots=false", "num_threads=2"])
    summary = train_reward_model(recipe)
    after = summary["eval_after"]
    assert summary["eval_rows"] == 32 and summary["eval_on"] == "held-out rows"
    assert after["accuracy"] > 0.8, summary
    assert after["margin"] > summary["eval_before"]["margin"] + 0.1
    final = summary["final_dir"]
    # a plain transformers sequence classifier, scoring exactly like the trained model did in-process
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert hf.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(final)
    chosen, rejected = _eval_scores(lambda ids, mask: hf(input_ids=ids, attention_mask=mask).logits[:, 0],
                                    tokenizer, recipe, 32)
    assert float((chosen - rejected).mean()) == pytest.approx(after["margin"], abs=1e-4)
    assert float((chosen > rejected).float().mean()) == pytest.approx(after["accuracy"])
    # and the RL side loads it as a reward model (engine.models), with the same scores
    scalar = load_scalar_model(ModelConfig(name_or_path=final)).eval()
    with torch.no_grad():
        ids = tokenizer(["Hello there, what a lovely day.", "Meh."], padding=True, return_tensors="pt")
        assert scalar.scores(ids.input_ids, ids.attention_mask).tolist() == pytest.approx(
            hf(**ids).logits[:, 0].tolist(), abs=1e-5)


def test_causal_reward_model_zero3_two_ranks(tmp_path):
    proc = run_deepspeed("launch/train.py", TINY_RM, "--set", f"output_dir={tmp_path}")
    summary = json_lines(proc.stdout, "SUMMARY_JSON ")[0]
    run_dir = tmp_path / "tiny-rm"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/train"] for r in rows]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert summary["eval_after"]["accuracy"] > 0.8, summary  # chosen replies are warmer (and longer)
    # the gathered causal scorer (score head at the last token) reproduces the 2-rank eval margin
    final = run_dir / "final"
    recipe = load_recipe(TINY_RM, [f"output_dir={tmp_path}"])
    scalar = load_scalar_model(ModelConfig(name_or_path=str(final))).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    chosen, rejected = _eval_scores(scalar.scores, tokenizer, recipe, summary["eval_rows"])
    assert float((chosen - rejected).mean()) == pytest.approx(summary["eval_after"]["margin"], abs=1e-4)
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    batch_ids = tokenizer(["I love it.", "A much longer and happier reply, thank you!"], padding=True,
                          padding_side="right", return_tensors="pt")
    with torch.no_grad():
        assert hf(**batch_ids).logits[:, 0].tolist() == pytest.approx(
            scalar.scores(batch_ids.input_ids, batch_ids.attention_mask).tolist(), abs=1e-5)
