"""Offline preference optimisation: DPO (Rafailov et al. 2023), with IPO's loss (Azar et al. 2023) as an option.

    h = (logp_c - ref_logp_c) - (logp_r - ref_logp_r)          (sequence log-probs of the responses)
    DPO: -log sigmoid(beta * h)      IPO: (h - 1 / (2 beta))^2 with per-token mean log-probs

The implicit rewards beta * (logp - ref_logp) give the metrics: reward accuracy (chosen above
rejected), margin, chosen / rejected rewards and log-probs. The stage plugs into the one supervised
loop (engine/supervised.py) like the reward model: pairs from ``data.load_preferences``, loss units
are pairs, ZeRO stages and LoRA from the usual recipe sections, the final Hugging Face folder as for
SFT. The reference (``reference:`` or a frozen copy of ``model:``) runs through the log-prob kernel,
either once over every row before training (``dpo.reference: precompute``, then freed) or per
micro-batch (``on_the_fly``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_engine import kernels
from rlhf_engine.config import Recipe, derive_batch_sizes
from rlhf_engine.data import collate_pairs, load_preferences
from rlhf_engine.distributed import DistInfo, create_frozen_engine, ds_config, zero_init_context
from rlhf_engine.models import load_policy

IGNORE_INDEX = -100


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over B pairs and the implicit rewards; every input [B] float -> (loss, chosen_rewards [B],
    rejected_rewards [B]), rewards = beta * (logp - ref_logp), detached.

    "sigmoid" (DPO): softplus(-beta * h) = -log sigmoid(beta * h). "ipo": (h - 1 / (2 beta))^2, where
    the inputs should be per-token mean log-probs (IPO's length normalisation; the task passes them).
    """
    h = (chosen_logps.float() - ref_chosen_logps.float()) - (rejected_logps.float() - ref_rejected_logps.float())
    if loss_type == "sigmoid":
        losses = F.softplus(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss must be 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen_rewards = beta * (chosen_logps.float() - ref_chosen_logps.float()).detach()
    rejected_rewards = beta * (rejected_logps.float() - ref_rejected_logps.float()).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def response_logps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt_lens: torch.Tensor,
                   mean: bool = False) -> torch.Tensor:
    """Sum (or per-token mean) of the response tokens' log-probs [N] for right-padded ids, mask [N, L];
    the response starts at prompt_lens [N]. Log-probs come from the chunked kernel (no float32 [N, L, V])."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:]
    positions = torch.arange(1, ids.shape[1], device=ids.device)[None]
    keep = (positions >= prompt_lens[:, None].to(ids.device)) & mask[:, 1:].bool()
    logps = kernels.logprobs_from_logits(logits, targets.masked_fill(~keep, IGNORE_INDEX))
    summed = (logps * keep).sum(-1)
    return summed / keep.sum(-1).clamp(min=1) if mean else summed


class DPOTask:
    """The DPO / IPO stage for ``engine.supervised.train_supervised``; loss units are pairs."""

    stage = "dpo"
    kind = "causal"

    def __init__(self, recipe: Recipe, dist: DistInfo):
        self.recipe, self.dist, self.cfg = recipe, dist, recipe.dpo
        self.pad_token_id: Optional[int] = None
        self._reference = None

    def build_model(self, recipe: Recipe) -> nn.Module:
        return load_policy(recipe.model, recipe.cache_dir)

    def reference(self):
        """The frozen reference (built on first use; every rank builds it at the same point)."""
        if self._reference is None:
            sizes = derive_batch_sizes(self.recipe, self.dist.world_size)
            with zero_init_context(ds_config(self.recipe, sizes, trainable=False)):
                model = load_policy(self.recipe.reference or self.recipe.model, self.recipe.cache_dir,
                                    for_training=False)
            self._reference = create_frozen_engine(model, self.recipe, sizes)
        return self._reference

    def load_data(self, recipe: Recipe, tokenizer):
        self.pad_token_id = tokenizer.pad_token_id
        train, held_out, report = load_preferences(recipe.data, tokenizer, recipe.seed)
        if self.cfg.reference == "precompute":
            for ds in (train, held_out):
                if ds is not None:
                    self._precompute(ds)
            self._reference = None  # freed: training holds one model
        return train, held_out, report

    @torch.no_grad()
    def _precompute(self, ds) -> None:
        """Reference log-probs of every row, stored in the rows: each rank scores a strided share (equal
        counts, so ZeRO-3 forwards stay in step) and the shares are exchanged."""
        rank, world = self.dist.rank, self.dist.world_size
        idx = list(range(rank, len(ds), world))
        per_rank = -(-len(ds) // world)
        idx += idx[:1] * (per_rank - len(idx))  # pad to equal counts (a repeat, dropped below)
        micro = self.recipe.train.micro_batch_size
        found = {}
        for i in range(0, len(idx), micro):
            rows = idx[i:i + micro]
            batch = {k: v.to(self.dist.device) if isinstance(v, torch.Tensor) else v
                     for k, v in self.collate([ds[j] for j in rows]).items()}
            chosen, rejected = self._logps(self.reference(), batch)
            found.update({j: (float(c), float(r)) for j, c, r in zip(rows, chosen, rejected)})
        shares = [found]
        if world > 1:
            shares = [None] * world
            torch.distributed.all_gather_object(shares, found)
        for share in shares:
            for j, (c, r) in share.items():
                ds[j]["ref_chosen"], ds[j]["ref_rejected"] = c, r

    def units(self, item: dict) -> int:
        return 1

    def collate(self, items: list[dict]) -> dict:
        batch = collate_pairs(items, self.pad_token_id)
        batch["prompt_len"] = torch.tensor([it["prompt_len"] for it in items])
        if all("ref_chosen" in it for it in items):
            batch["ref_chosen"] = torch.tensor([it["ref_chosen"] for it in items])
            batch["ref_rejected"] = torch.tensor([it["ref_rejected"] for it in items])
        return batch

    def _logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) response log-probs from one forward over the stacked [2B, L] pairs."""
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        return response_logps(model, ids, mask, batch["prompt_len"].repeat(2), mean=self.cfg.loss == "ipo").chunk(2)

    def _pair_terms(self, engine, batch):
        chosen, rejected = self._logps(engine, batch)
        if "ref_chosen" in batch:
            ref_c, ref_r = batch["ref_chosen"].to(chosen.device), batch["ref_rejected"].to(chosen.device)
        else:
            with torch.no_grad():
                ref_c, ref_r = self._logps(self.reference(), batch)
        loss, r_c, r_r = preference_loss(chosen, rejected, ref_c, ref_r, self.cfg.beta, self.cfg.loss)
        return loss, chosen.detach(), rejected.detach(), r_c, r_r

    def loss(self, engine: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, chosen, rejected, r_c, r_r = self._pair_terms(engine, batch)
        return loss, {"reward_accuracy": (r_c > r_r).float().mean(), "reward_margin": (r_c - r_r).mean(),
                      "chosen_reward": r_c.mean(), "rejected_reward": r_r.mean(),
                      "chosen_logp": chosen.mean(), "rejected_logp": rejected.mean()}

    def eval_sums(self, engine: nn.Module, batch: dict) -> dict:
        loss, chosen, rejected, r_c, r_r = self._pair_terms(engine, batch)
        n = chosen.shape[0]
        return {"loss": loss.detach() * n, "reward_accuracy": (r_c > r_r).float().sum(),
                "reward_margin": (r_c - r_r).sum(), "chosen_reward": r_c.sum(), "rejected_reward": r_r.sum(),
                "chosen_logp": chosen.sum(), "rejected_logp": rejected.sum(), "pairs": torch.tensor(float(n))}

    def eval_metrics(self, sums: dict) -> dict:
        n = sums["pairs"].clamp(min=1)
        return {k: float(v / n) for k, v in sums.items() if k != "pairs"}


def train_dpo(recipe: Recipe, dist: Optional[DistInfo] = None, resume: Optional[str] = None) -> dict:
    """Run the DPO stage of ``recipe`` (see engine.supervised.train_supervised for the summary)."""
    from rlhf_engine.distributed import init_distributed
    from rlhf_engine.supervised import train_supervised

    dist = dist or init_distributed(recipe.num_threads)
    return train_supervised(recipe, dist, DPOTask(recipe, dist), resume=resume)
