"""Fused kernels for the RL hot path (see DESIGN.md, "Kernels contract").

Every public function has a naive ``*_reference`` twin. Backend: Triton when the tensors are on CUDA
and triton imports, else chunked torch; ``KERNELS_BACKEND=torch|triton`` or ``set_backend(...)``
forces one. Triton is imported lazily, so this package imports fine without it.
"""

from ._dispatch import choose as choose_backend, get_backend, set_backend
from .gae import gae, gae_reference, masked_mean, masked_mean_reference, masked_whiten, masked_whiten_reference
from .kl import kl_penalty, kl_penalty_reference
from .logprobs import (
    default_chunk_tokens,
    entropy_from_logits,
    entropy_from_logits_reference,
    linear_logprobs,
    linear_logprobs_reference,
    logprobs_from_logits,
    logprobs_from_logits_reference,
)

__all__ = [
    "choose_backend", "get_backend", "set_backend",
    "logprobs_from_logits", "entropy_from_logits", "linear_logprobs", "default_chunk_tokens",
    "kl_penalty", "gae", "masked_whiten", "masked_mean",
    "logprobs_from_logits_reference", "entropy_from_logits_reference", "linear_logprobs_reference",
    "kl_penalty_reference", "gae_reference", "masked_whiten_reference", "masked_mean_reference",
]
