"""Token log-probabilities and entropy from logits or from hidden states, without [tokens, vocab] float32.

Public: ``logprobs_from_logits``, ``entropy_from_logits``, ``linear_logprobs`` and their naive
``*_reference`` twins. The fused versions are custom autograd Functions over a backend module
(``kernels/_chunked.py`` on CPU, ``kernels/_triton/logprobs.py`` on CUDA) that computes the row
logsumexp online over vocabulary blocks and recomputes softmax block by block in the backward.
"""

from __future__ import annotations

import torch

from . import _chunked, _linear
from ._dispatch import choose

IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 32 << 20  # linear_logprobs, whole-row (Triton) tiling: logits bytes per token chunk
DEFAULT_CHUNK_BYTES_CUDA = 256 << 20


def _impl(backend: str):
    if backend == "triton":
        from ._triton import logprobs as triton_logprobs  # lazy: triton is optional

        return triton_logprobs
    return _chunked


def _check(lead: torch.Size, vocab: int, dtype: torch.dtype, labels, temperature: float, where: str):
    if vocab == 0:
        raise ValueError(f"kernels.{where}: the vocabulary dimension is empty")
    if not dtype.is_floating_point:
        raise TypeError(f"kernels.{where}: logits/hidden must be floating point, got {dtype}")
    if not temperature > 0:
        raise ValueError(f"kernels.{where}: temperature must be > 0, got {temperature}")
    if labels is None:
        return
    if labels.shape != lead:
        raise ValueError(f"kernels.{where}: labels shape {tuple(labels.shape)} must equal the leading "
                         f"shape {tuple(lead)} of logits/hidden (all dims but the last)")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"kernels.{where}: labels must be an integer tensor, got {labels.dtype}")
    if not labels.is_cuda and labels.numel():  # on CUDA this check would sync; bad labels are ignored there
        bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab)
        if bool(bad.any()):
            raise ValueError(f"kernels.{where}: labels must be in [0, {vocab}) or {IGNORE_INDEX} (ignored); "
                             f"got {labels[bad].flatten()[0].item()}")


def _flat_labels(labels):
    return None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()


def _out_dtype(dtype):
    return _chunked.work_dtype(dtype)


class _FromLogits(torch.autograd.Function):
    """(logits [..., V], labels [...] | None) -> (logprobs [...], entropy [...]); empty when not asked."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, want_entropy, backend):
        impl = _impl(backend)
        x3 = _chunked.as_3d(logits)
        lab = _flat_labels(labels)
        lp, ent, stats = impl.forward(x3, lab, temperature, want_entropy)
        ctx.save_for_backward(x3, lab, ent, *stats)
        ctx.cfg = (temperature, backend, logits.shape)
        lead = logits.shape[:-1]
        missing = (lp if lp is not None else ent).new_empty(0)  # stands for the output not asked for
        ctx.mark_non_differentiable(missing)
        ctx.set_materialize_grads(False)
        return (missing if lp is None else lp.view(lead)), (missing if ent is None else ent.view(lead))

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        x3, lab, ent, *stats = ctx.saved_tensors
        temperature, backend, shape = ctx.cfg
        if lab is None:
            g_lp = None
        if ent is None:
            g_ent = None
        g_lp = None if g_lp is None else g_lp.reshape(-1)
        g_ent = None if g_ent is None else g_ent.reshape(-1)
        grad = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
        _impl(backend).backward(x3, lab, temperature, stats, ent, g_lp, g_ent, grad)
        return grad.view(shape), None, None, None, None


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         return_entropy: bool = False):
    """log softmax(logits / T)[label], fused: no float32 copy of the [..., V] logits is ever created
    (float32 tiles of at most ``_chunked.TILE_ELEMS`` elements; the gradient has the logits' dtype).

    logits: [..., V] float32 / bfloat16 / float16 (any strides); labels: [...] int, -100 = ignored.
    Returns logprobs [...] float32 (0 and no gradient where labels == -100), or
    (logprobs, entropy) when ``return_entropy`` (both from one pass over the logits).
    Differentiable w.r.t. logits. float64 logits are computed and returned in float64.
    """
    _check(logits.shape[:-1], logits.shape[-1], logits.dtype, labels, temperature, "logprobs_from_logits")
    backend = choose(logits)
    lp, ent = _FromLogits.apply(logits, labels, float(temperature), return_entropy, backend)
    return (lp, ent) if return_entropy else lp


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position: logits [..., V] -> [...] float32, differentiable."""
    _check(logits.shape[:-1], logits.shape[-1], logits.dtype, None, temperature, "entropy_from_logits")
    backend = choose(logits)
    return _FromLogits.apply(logits, None, float(temperature), True, backend)[1]


def logprobs_from_logits_reference(logits, labels, temperature=1.0, return_entropy=False):
    """Naive twin: ``log_softmax(logits.float() / T).gather(label)``; materializes [..., V] float32."""
    x = logits.to(_out_dtype(logits.dtype))
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    lp = logp.gather(-1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    lp = lp.masked_fill(labels == IGNORE_INDEX, 0.0)
    if not return_entropy:
        return lp
    return lp, _entropy_from_logp(logp)


def _entropy_from_logp(logp):
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)  # 0 * -inf terms are 0, also in the gradient


def entropy_from_logits_reference(logits, temperature=1.0):
    """Naive twin of ``entropy_from_logits``: -sum p log p over a full float32 log_softmax."""
    x = logits.to(_out_dtype(logits.dtype))
    return _entropy_from_logp(torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1))


def default_chunk_tokens(vocab: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                         backend: str = "torch", hidden: int = 1024) -> int:
    """Tokens per chunk in ``linear_logprobs``.

    torch backend: tiles of [chunk, vocab block] logits with chunk * block = TILE_ELEMS (a 32 MB
    float32 tile); long chunks keep the grad_weight matmul (a reduction over tokens) efficient.
    Triton backend (whole rows): the chunk's logits in ``dtype`` stay within 256 MB on CUDA (32 MB
    elsewhere, i.e. under the interpreter).
    """
    if backend != "triton":
        return max(1, _chunked.TILE_ELEMS // _linear.vocab_block(vocab, hidden))
    budget = DEFAULT_CHUNK_BYTES_CUDA if torch.device(device).type == "cuda" else DEFAULT_CHUNK_BYTES
    return max(1, budget // (dtype.itemsize * vocab))


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0, return_entropy: bool = False, chunk_tokens: int | None = None):
    """Token logprobs of ``labels`` under logits = hidden @ weight.T, never holding [N, V] logits.

    hidden: [..., H]; weight: [V, H] (the LM head); labels: [...] int, -100 = ignored.
    Returns logprobs [...] float32, or (logprobs, entropy) when ``return_entropy``.
    Gradients flow to hidden and weight (accumulated in float32 over chunks). ``chunk_tokens`` sets
    the token chunk (default ``default_chunk_tokens``); logits exist one [chunk, block] tile at a time.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"kernels.linear_logprobs: weight must be [V, H] with H = hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got weight {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"kernels.linear_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) "
                        "must share a dtype")
    _check(hidden.shape[:-1], weight.shape[0], hidden.dtype, labels, temperature, "linear_logprobs")
    backend = choose(hidden, weight)
    chunk = int(chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.dtype, hidden.device, backend,
                                                      hidden.shape[-1]))
    if chunk < 1:
        raise ValueError(f"kernels.linear_logprobs: chunk_tokens must be >= 1, got {chunk_tokens}")
    lead = hidden.shape[:-1]
    lp, ent = _linear.LinearLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, _flat_labels(labels),
                                           float(temperature), return_entropy, chunk, backend == "triton",
                                           _impl(backend))
    lp = lp.view(lead)
    return (lp, ent.view(lead)) if return_entropy else lp


def linear_logprobs_reference(hidden, weight, labels, temperature=1.0, return_entropy=False):
    """Naive twin: full logits = hidden @ weight.T, then the float32 log_softmax reference."""
    return logprobs_from_logits_reference(hidden @ weight.t(), labels, temperature, return_entropy)
