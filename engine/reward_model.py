"""Stage 2, reward model: a scalar head trained on preference pairs with the Bradley-Terry loss.

    loss = -log sigmoid(s_chosen - s_rejected - margin) + center_coef * (s_chosen + s_rejected)^2

``margin`` is the data's optional margin column (``data.fields: {margin: ...}``; 0 when the rows have
none): a pair marked as a clearer preference must be separated by more. The centering term
(``reward_model.center_coef``) keeps scores near zero, which the loss alone leaves free.
Evaluation reports the loss, the accuracy mean(s_chosen > s_rejected) and the mean margin
s_chosen - s_rejected on held-out pairs.

The backbone is a causal LM (score at the last token) or an encoder such as the ``minilm-l6`` preset
(score at [CLS]); see ``engine.models.ScalarModel``. The saved ``final/`` folder is an
AutoModelForSequenceClassification (num_labels=1) that an RL recipe's ``reward.model.name_or_path``
loads, and ``critic.init_from`` can start from (causal backbones).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_engine.config import Recipe
from rlhf_engine.data import collate_pairs, load_preferences
from rlhf_engine.distributed import DistInfo
from rlhf_engine.models import load_scalar_model


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: Optional[torch.Tensor] = None, center_coef: float = 0.0) -> torch.Tensor:
    """Mean pairwise loss over B pairs: chosen_scores, rejected_scores, margin: [B] -> float32 scalar.

    -log sigmoid(s_c - s_r - margin) (computed as softplus, stable for large gaps) plus
    center_coef * (s_c + s_r)^2.
    """
    diff = chosen_scores.float() - rejected_scores.float()
    if margin is not None:
        diff = diff - margin.float()
    loss = F.softplus(-diff)  # = -log sigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen_scores.float() + rejected_scores.float()) ** 2
    return loss.mean()


class RewardModelTask:
    """The reward-model stage for ``engine.supervised.train_supervised``; loss units are pairs
    (``train.mini_batch_size`` counts pairs per optimizer step)."""

    stage = "reward"
    kind = "scalar"

    def __init__(self, recipe: Recipe, pad_token_id: Optional[int] = None):
        self.recipe = recipe
        self.pad_token_id = pad_token_id

    def build_model(self, recipe: Recipe) -> nn.Module:
        return load_scalar_model(recipe.model, recipe.cache_dir, init_head_seed=recipe.seed)

    def load_data(self, recipe: Recipe, tokenizer):
        if tokenizer.eos_token_id is None and tokenizer.sep_token_id is not None:
            # encoders (BERT) close a text with [SEP]: it plays EOS, so pairs read "[CLS] prompt reply [SEP]",
            # the same ids the tokenizer gives prompt + reply as one text (what the RL reward feeds it)
            tokenizer.eos_token = tokenizer.sep_token
        self.pad_token_id = tokenizer.pad_token_id
        return load_preferences(recipe.data, tokenizer, recipe.seed)

    def units(self, item: dict) -> int:
        return 1

    def collate(self, items: list[dict]) -> dict:
        return collate_pairs(items, self.pad_token_id)

    def scores(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) scores from one forward over the stacked [2B, L] batch."""
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        scores = model(input_ids=ids, attention_mask=mask)
        return scores.chunk(2)

    def loss(self, engine: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = self.scores(engine, batch)
        loss = bradley_terry_loss(chosen, rejected, batch["margin"], self.recipe.reward_model.center_coef)
        gap = (chosen - rejected).detach()
        return loss, {"accuracy": (gap > 0).float().mean(), "margin": gap.mean()}

    def eval_sums(self, engine: nn.Module, batch: dict) -> dict:
        chosen, rejected = self.scores(engine, batch)
        n = chosen.shape[0]
        loss = bradley_terry_loss(chosen, rejected, batch["margin"], self.recipe.reward_model.center_coef)
        return {"loss": loss * n, "correct": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum(),
                "pairs": torch.tensor(float(n))}

    def eval_metrics(self, sums: dict) -> dict:
        n = sums["pairs"].clamp(min=1)
        return {"loss": float(sums["loss"] / n), "accuracy": float(sums["correct"] / n),
                "margin": float(sums["margin"] / n)}


def train_reward_model(recipe: Recipe, dist: Optional[DistInfo] = None, resume: Optional[str] = None) -> dict:
    """Run the reward-model stage of ``recipe`` (see engine.supervised.train_supervised for the summary)."""
    from rlhf_engine.supervised import train_supervised

    return train_supervised(recipe, dist, RewardModelTask(recipe), resume=resume)
