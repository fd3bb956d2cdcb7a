"""Fused kernels for the RL hot path (see DESIGN.md, "Kernels contract").

Every public function has a naive ``*_reference`` twin. Backend: Triton when the tensors are on CUDA
and triton imports, else chunked torch; ``KERNELS_BACKEND=torch|triton`` or ``set_backend(...)``
forces one. Triton is imported lazily, so this package imports fine without it.
"""


if __name__ == "kernels":
    # Imported as a top-level `kernels`: the checkout's root is on sys.path (`python -c` or `python -m` run
    # from it). That name belongs to Hugging Face's hub kernels, which transformers imports; hand the import
    # over to it, so a checkout never breaks transformers. This package is `rlhf_engine.kernels`.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None:
        raise ImportError("no module named 'kernels' (this folder is rlhf-engine's, imported as "
                          "`rlhf_engine.kernels`; Hugging Face's `kernels` package is not installed)")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this file
    _spec.loader.exec_module(_module)
else:
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
