"""Stage 1, supervised fine-tuning: next-token loss on the response tokens only.

Rows come from ``engine.data.load_sft`` (prompt rendered with the chat template, response + EOS);
``collate_sft`` sets the labels of prompt and padding tokens to -100, and ``sft_loss`` averages the
negative log-likelihood over the remaining (response) tokens. Evaluation reports the token-mean
loss and the perplexity exp(loss) on the held-out split.

Sample packing (``sft.pack: true``) concatenates the rows of a micro-batch into rows of at most
``data.max_length`` tokens with position ids restarting at 0 for each sequence; the model then gets no
attention mask, and transformers builds a block-diagonal causal mask from the position ids, so packed
sequences never see each other (any attention kernel). DeepSpeed (ZeRO stages, precision) and LoRA
come from the same recipe sections as RL (``deepspeed``, ``model.lora``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rlhf_engine import kernels, seq2seq
from rlhf_engine.config import Recipe
from rlhf_engine.data import collate_sft, load_sft
from rlhf_engine.distributed import DistInfo
from rlhf_engine.models import load_policy

IGNORE_INDEX = -100


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token negative log-likelihood over labelled tokens.

    logits: [B, L, V] (position t predicts token t + 1); labels: [B, L] token ids, -100 on prompt and
    padding. Returns (loss: float32 scalar, n_tokens: scalar count of labelled targets). Log-probs come
    from the fused kernel, so no float32 [B, L, V] copy is made; ignored positions get no gradient.
    """
    targets = labels[:, 1:]
    logprobs = kernels.logprobs_from_logits(logits[:, :-1], targets)  # [B, L-1], 0 where ignored
    mask = targets != IGNORE_INDEX
    return -kernels.masked_mean(logprobs, mask), mask.sum()


class SFTTask:
    """The SFT stage for ``engine.supervised.train_supervised``; loss units are response tokens."""

    stage = "sft"
    kind = "causal"
    encoder_decoder = False  # set by build_model: prompt -> encoder, response -> decoder

    def __init__(self, recipe: Recipe, pad_token_id: Optional[int] = None):
        self.recipe = recipe
        self.pad_token_id = pad_token_id

    def build_model(self, recipe: Recipe) -> nn.Module:
        model = load_policy(recipe.model, recipe.cache_dir)
        self.encoder_decoder = seq2seq.is_seq2seq(model)
        if self.encoder_decoder and recipe.sft.pack:
            raise ValueError("sft.pack packs causal sequences; the encoder-decoder model "
                             f"'{recipe.model.name_or_path}' trains unpacked: remove sft.pack from the recipe")
        return model

    def load_data(self, recipe: Recipe, tokenizer):
        self.pad_token_id = tokenizer.pad_token_id
        return load_sft(recipe.data, tokenizer, recipe.seed)

    def units(self, item: dict) -> int:
        return len(item["input_ids"]) - item["prompt_len"]

    def collate(self, items: list[dict]) -> dict:
        if self.encoder_decoder:
            return seq2seq.collate_sft(items, self.pad_token_id)
        return collate_sft(items, self.pad_token_id, pack=self.recipe.sft.pack, max_length=self.recipe.data.max_length)

    def forward_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """[B, L, V] logits of a collated batch (packed batches: position ids, no attention mask)."""
        if self.encoder_decoder:
            return seq2seq.sft_logits(model, batch)
        packed = "position_ids" in batch
        out = model(input_ids=batch["input_ids"], attention_mask=None if packed else batch["attention_mask"],
                    position_ids=batch.get("position_ids"), use_cache=False)
        return out.logits

    def loss(self, engine: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, _ = sft_loss(self.forward_logits(engine, batch), batch["labels"])
        return loss, {}

    def eval_sums(self, engine: nn.Module, batch: dict) -> dict:
        loss, n = sft_loss(self.forward_logits(engine, batch), batch["labels"])
        return {"nll": loss * n, "tokens": n.float()}

    def eval_metrics(self, sums: dict) -> dict:
        loss = float(sums["nll"] / sums["tokens"].clamp(min=1))
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp())}


def train_sft(recipe: Recipe, dist: Optional[DistInfo] = None, resume: Optional[str] = None) -> dict:
    """Run the SFT stage of ``recipe`` (see engine.supervised.train_supervised for the summary)."""
    from rlhf_engine.supervised import train_supervised

    return train_supervised(recipe, dist, SFTTask(recipe), resume=resume)
