"""DPO / IPO: the loss against hand-computed numbers, and a real 2-rank ZeRO-3 LoRA run on the shipped pairs."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_engine.dpo import preference_loss, response_logps
from rlhf_engine.tracking import read_jsonl
from helpers import run_deepspeed


def test_dpo_and_ipo_losses_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    # h = (pc - rc) - (pr - rr) = (1 - -1, 0 - 1) = (2, -1); beta 0.5 -> beta h = (1, -0.5)
    loss, r_c, r_r = preference_loss(pc, pr, rc, rr, beta=0.5)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2  # -log sigmoid(x) = log(1 + e^-x)
    assert float(loss) == pytest_approx(expected)
    assert r_c.tolist() == [0.5, 0.0] and r_r.tolist() == [-0.5, 0.5]  # beta * (logp - ref_logp)
    # IPO: (h - 1/(2 beta))^2 = (2 - 1)^2, (-1 - 1)^2 -> mean 2.5
    loss, _, _ = preference_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert float(loss) == pytest_approx(2.5)


def pytest_approx(x):
    return pytest.approx(x, rel=1e-6, abs=1e-6)


class Uniform(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform over 4 tokens: every log-prob is -ln 4."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 4, requires_grad=True))


def test_response_logps_count_only_response_tokens():
    ids = torch.tensor([[1, 2, 3, 0, 0], [1, 2, 3, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    prompt_lens = torch.tensor([2, 1])
    # row 0: response = token 3 (position 2) -> 1 token; row 1: positions 1..4 -> 4 tokens
    summed = response_logps(Uniform(), ids, mask, prompt_lens)
    assert summed.tolist() == pytest_approx([-math.log(4), -4 * math.log(4)])
    mean = response_logps(Uniform(), ids, mask, prompt_lens, mean=True)
    assert mean.tolist() == pytest_approx([-math.log(4), -math.log(4)])


def test_dpo_zero3_lora_two_ranks_learns_and_exports(tmp_path):
    run_deepspeed("launch/train.py", "recipes/tiny/dpo-zero3.yaml", f"--set=output_dir={tmp_path}",
                  "--set=name=dpo", "--set=train.steps=4")
    evals = read_jsonl(tmp_path / "dpo" / "eval.jsonl")
    before, after = evals[0], evals[-1]
    assert before["loss"] == pytest_approx(math.log(2))  # the policy starts as the reference: h = 0
    assert after["reward_accuracy"] > before["reward_accuracy"] + 0.3  # on 16 held-out pairs
    assert after["reward_margin"] > 0 and after["loss"] < before["loss"]
    metrics = read_jsonl(tmp_path / "dpo" / "metrics.jsonl")
    assert {"reward_accuracy/train", "chosen_logp/train", "rejected_logp/train"} <= set(metrics[-1])
    final = tmp_path / "dpo" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)  # LoRA merged: a plain causal LM folder
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"


def test_precomputed_and_on_the_fly_reference_agree():
    """The reference's log-probs stored in the rows before training equal a reference forward per batch."""
    from rlhf_engine.config import load_recipe
    from rlhf_engine.distributed import DistInfo, local_device
    from rlhf_engine.dpo import DPOTask
    from rlhf_engine.models import load_policy, load_tokenizer
    from helpers import REPO

    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=local_device(), is_main=True)
    sums = {}
    for mode in ("precompute", "on_the_fly"):
        recipe = load_recipe(REPO / "recipes/tiny/dpo-zero3.yaml", ["deepspeed.zero_stage=0", "data.limit=12",
                                                                     "data.eval_size=4", f"dpo.reference={mode}"])
        task = DPOTask(recipe, dist)
        _, held_out, _ = task.load_data(recipe, load_tokenizer(recipe.model, recipe.cache_dir))
        batch = task.collate([held_out[i] for i in range(4)])
        assert ("ref_chosen" in batch) == (mode == "precompute")
        torch.manual_seed(0)
        policy = load_policy(recipe.model, recipe.cache_dir)  # LoRA B = 0: the policy equals the reference
        with torch.no_grad():
            sums[mode] = task.eval_sums(policy, batch)
    for key in ("loss", "chosen_logp", "rejected_logp", "chosen_reward"):
        assert float(sums["precompute"][key]) == pytest.approx(float(sums["on_the_fly"][key]), abs=1e-4), key
    assert float(sums["precompute"]["loss"]) == pytest.approx(4 * math.log(2), abs=1e-4)
