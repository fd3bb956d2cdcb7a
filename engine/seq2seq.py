"""Encoder-decoder (seq2seq) policies and critics: T5, Flan-T5, BART and other ``*ForConditionalGeneration``.

The kind comes from the Hugging Face config's ``is_encoder_decoder`` flag, never from the model's name.
A rollout keeps the causal shapes (engine/rollout.py): ``prompt_ids`` [B, P] is the encoder input and
``response_ids`` [B, R] the decoder's output. Scoring forwards receive the same concatenation
[B, P+R] and response length R as the causal ones and split it:

    encoder input   the first P columns, moved to right padding (BART reads absolute positions from 0)
    decoder input   [start, y_0, ..., y_{R-2}]   (teacher forcing; `start` = the decoder start token)
    labels          [y_0, ..., y_{R-1}]

so the decoder's output at position t is the distribution of response token t given the prompt and
y_<t, and the critic's value at t is the value of the state before token t, as for causal models.
The decoder start token is ``model.context_start_token`` (RL4LMs' name) or, by default, the model
config's ``decoder_start_token_id``; it is written into the loaded model's config so generation and
scoring read the same one. Dropout is switched off in policies and critics (as TRL does for RL): old
log-probs, values and the update's forward must see the same function.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rlhf_engine import kernels

__all__ = ["Seq2SeqScalarModel", "decode_steps", "decoder_inputs", "disable_dropout", "forward_logprobs",
           "is_seq2seq", "is_seq2seq_config", "set_decoder_start", "split_sequences", "start_token_id"]


def is_seq2seq_config(config) -> bool:
    """True for encoder-decoder architectures (the config's own ``is_encoder_decoder`` flag)."""
    return bool(getattr(config, "is_encoder_decoder", False))


def is_seq2seq(model) -> bool:
    """True when `model` (a DeepSpeed engine, peft wrapper, ScalarModel or HF model) is encoder-decoder."""
    module = getattr(model, "module", model)
    return is_seq2seq_config(getattr(module, "config", None))


def start_token_id(config, generation_config=None) -> int:
    """The decoder start token of a model config (then its generation config); error if neither has one."""
    for source in (config, generation_config):
        value = getattr(source, "decoder_start_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    raise ValueError(f"the {getattr(config, 'model_type', '?')} model's config has no decoder_start_token_id: set "
                     "model.context_start_token in the recipe to the token id its decoder starts from")


def set_decoder_start(model, context_start_token: Optional[int]) -> int:
    """Write the decoder start token (recipe override, else the config's) into `model`'s config(s); return it."""
    start = context_start_token if context_start_token is not None else start_token_id(
        model.config, getattr(model, "generation_config", None))
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and not 0 <= start < vocab:
        raise ValueError(f"model.context_start_token {start} is not a token id of this model (vocabulary {vocab})")
    model.config.decoder_start_token_id = start
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.decoder_start_token_id = start
    return start


def disable_dropout(model: nn.Module) -> None:
    """p = 0 in every dropout module: the sampled, scored and trained functions are then the same."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def to_right_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each row of [B, P] so its real tokens start at column 0 (positions of BART-like encoders)."""
    from rlhf_engine.models import _to_right_padding
    return _to_right_padding(input_ids, attention_mask)


def split_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, P+R] prompt+response -> (encoder ids [B, P], encoder mask [B, P] right-padded, response ids [B, R])."""
    enc_ids, enc_mask = to_right_padding(input_ids[:, :-response_len], attention_mask[:, :-response_len])
    return enc_ids, enc_mask, input_ids[:, -response_len:]


def decoder_inputs(response_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Teacher forcing: [B, R] response -> [B, R] decoder input [start, y_0, ..., y_{R-2}]."""
    return torch.cat([response_ids.new_full((response_ids.shape[0], 1), start), response_ids[:, :-1]], dim=1)


def _config(model):
    return getattr(getattr(model, "module", model), "config")


def forward_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                     temperature: float = 1.0, *, return_entropy: bool = False):
    """Log-probs [B, R] (and entropy [B, R] if asked) of the response part of `input_ids` [B, P+R].

    `model`: an encoder-decoder LM (or a DeepSpeed engine / peft wrapper of one). One teacher-forced
    forward; the decoder's R logits rows go through the chunked log-softmax kernel.
    """
    enc_ids, enc_mask, labels = split_sequences(input_ids, attention_mask, response_len)
    dec_ids = decoder_inputs(labels, _config(model).decoder_start_token_id)
    out = model(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=dec_ids, use_cache=False)
    return kernels.logprobs_from_logits(out.logits, labels, temperature, return_entropy=return_entropy)


def decode_steps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """(prefill() -> logits [B, V], step(tokens [B]) -> logits [B, V]) for `rollout.sample_tokens`.

    The encoder runs once; the decoder then takes one token per step with a self-attention cache
    (cross-attention keys/values are cached after the first step too).
    """
    from transformers import DynamicCache, EncoderDecoderCache

    from rlhf_engine.rollout import _cache_keyword

    enc_ids, enc_mask = to_right_padding(prompt_ids, prompt_mask)
    config = model.config
    cache = {_cache_keyword(model): EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))}
    state = {}

    def run(decoder_ids):
        out = model(encoder_outputs=state["encoder"], attention_mask=enc_mask, decoder_input_ids=decoder_ids,
                    use_cache=True, **cache)
        return out.logits[:, -1].float()

    def prefill():
        state["encoder"] = model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask)
        start = torch.full((enc_ids.shape[0], 1), config.decoder_start_token_id, dtype=torch.long,
                           device=enc_ids.device)
        return run(start)

    return prefill, lambda tokens: run(tokens.unsqueeze(1))


def hf_generate_inputs(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict, int]:
    """For HF `generate()` (stop strings): right-padded encoder inputs, the start-token kwarg, and how many
    leading output columns are not new tokens (the start token)."""
    enc_ids, enc_mask = to_right_padding(ids, mask)
    return enc_ids, enc_mask, {"decoder_start_token_id": model.config.decoder_start_token_id}, 1


class Seq2SeqScalarModel(nn.Module):
    """A ``*ForSequenceClassification`` encoder-decoder (T5, BART; num_labels=1) read as per-token values.

    The value head (the model's own ``classification_head``) runs over every decoder state, so
    ``hf_model.save_pretrained`` still writes a standard model. Used as the PPO critic of a seq2seq actor.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    @property
    def config(self):
        return self.hf_model.config

    def _base(self):
        return self.hf_model.get_base_model() if hasattr(self.hf_model, "get_base_model") else self.hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None, per_token: bool = False,
                response_len: Optional[int] = None) -> torch.Tensor:
        """Values [B, R] float32 of the states before each response token of `input_ids` [B, P+R]."""
        if not per_token or response_len is None:
            raise ValueError("an encoder-decoder ScalarModel gives per-token values of a response (the PPO critic); "
                             "sequence scores (a seq2seq reward model) are not supported: use a causal or encoder "
                             "reward model")
        enc_ids, enc_mask, labels = split_sequences(input_ids, attention_mask, response_len)
        base = self._base()
        hidden = base.base_model(input_ids=enc_ids, attention_mask=enc_mask,
                                 decoder_input_ids=decoder_inputs(labels, self.config.decoder_start_token_id),
                                 use_cache=False).last_hidden_state
        head = base.classification_head
        return head(hidden.to(head.out_proj.weight.dtype)).squeeze(-1).float()
