"""PTX loss (InstructGPT's "PPO-ptx"): ``ppo.ptx_coef`` x the language-model loss on ``ptx_data`` rows,
mixed into the actor's update so RL does not unlearn what supervised data taught.

Every actor micro-batch of the update is followed by one PTX micro-batch (``train.micro_batch_size``
rows per rank, drawn in seeded epoch order over the PTX training rows): forward, then backward of
``ptx_coef x`` its token-mean response NLL (engine.sft.sft_loss, through the log-prob kernel) into the
same accumulated gradient; DeepSpeed's 1 / accumulation-steps scaling makes that the mean over the
mini-batch's PTX micro-batches. ``ptx_coef: 0`` builds nothing: the run is exactly the one without.
The held-out PTX rows (``ptx_data.eval_size`` / ``eval_fraction``) are scored at every evaluation
(``ptx/loss`` in eval.jsonl); the training loss is ``loss/ptx`` in metrics.jsonl.
"""
from __future__ import annotations

import torch

from rlhf_engine.batching import EpochSampler
from rlhf_engine.config import Recipe, RecipeError
from rlhf_engine.data import collate_sft, load_sft
from rlhf_engine.distributed import all_reduce_sum
from rlhf_engine.sft import sft_loss
from rlhf_engine.supervised import _eval_share


def _nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return sft_loss(out.logits, batch["labels"])


class PtxMixer:
    """PTX batches and loss for the RL update; its only state is how many micro-batches it has drawn."""

    def __init__(self, recipe: Recipe, tokenizer, dist, sizes):
        self.coef, self.pad = recipe.ppo.ptx_coef, tokenizer.pad_token_id
        self.train, held, self.report = load_sft(recipe.ptx_data, tokenizer, recipe.seed)
        self.micro, self.rank, self.device = sizes.micro_batch_size, dist.rank, dist.device
        self.sampler = EpochSampler(len(self.train), sizes.micro_batch_size * dist.world_size, recipe.seed)
        if self.sampler.steps_per_epoch == 0:
            raise RecipeError(f"ptx_data: {len(self.train)} training rows but one PTX micro-batch on every rank needs "
                              f"{sizes.micro_batch_size * dist.world_size}; add rows or lower ptx_data.eval_size")
        self.eval_items = _eval_share(held, len(held), dist) if held is not None else []
        self.drawn = 0

    def _batch(self, items: list[dict]) -> dict:
        return {k: v.to(self.device) for k, v in collate_sft(items, self.pad).items()}

    def backward(self, actor) -> torch.Tensor:
        """Forward and backward of ptx_coef x the LM loss of the next PTX micro-batch; returns that loss (detached)."""
        rows = self.sampler.batch(self.drawn)[self.rank * self.micro:(self.rank + 1) * self.micro]
        self.drawn += 1
        loss, _ = _nll(actor, self._batch([self.train[i] for i in rows]))
        actor.backward(self.coef * loss)
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, actor) -> dict:
        """{"ptx/loss": token-mean NLL over the held-out PTX rows of all ranks} ({} without held-out rows)."""
        if not self.eval_items:
            return {}
        nll, tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for i in range(0, len(self.eval_items), self.micro):
            loss, n = _nll(actor, self._batch(self.eval_items[i:i + self.micro]))
            nll, tokens = nll + loss.double().cpu() * n.cpu(), tokens + n.cpu()
        total = all_reduce_sum(torch.stack([nll, tokens]))
        return {"ptx/loss": float(total[0] / total[1].clamp(min=1))}

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]
