"""Backend choice for the kernels: chunked torch or Triton.

Order of precedence, evaluated at every call so tests can switch freely:
1. ``set_backend("torch"|"triton")`` (also usable as a context manager),
2. the ``KERNELS_BACKEND`` environment variable (``torch``, ``triton`` or ``auto``),
3. auto: Triton when every tensor is on CUDA and Triton imports, else torch.

Triton on CPU tensors only works under the Triton interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported); that is how the tests run the Triton kernels without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton")
_forced: str | None = None


class _BackendSetting:
    """Returned by ``set_backend``: the new setting is live already; ``with`` restores the old one."""

    def __init__(self, previous: str | None):
        self.previous = previous

    def __enter__(self) -> "_BackendSetting":
        return self

    def __exit__(self, *exc) -> None:
        global _forced
        _forced = self.previous


def set_backend(name: str | None) -> _BackendSetting:
    """Force ``"torch"`` or ``"triton"`` for every kernel call; ``None`` or ``"auto"`` undoes it.

    Works as a plain call or as ``with kernels.set_backend("triton"): ...``.
    """
    global _forced
    if name == "auto":
        name = None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernels.set_backend: expected one of {BACKENDS}, 'auto' or None, got {name!r}")
    previous, _forced = _forced, name
    return _BackendSetting(previous)


def get_backend() -> str | None:
    """The forced backend (``set_backend`` first, then ``KERNELS_BACKEND``), or None for auto."""
    if _forced is not None:
        return _forced
    env = os.environ.get("KERNELS_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"KERNELS_BACKEND={env!r}: expected 'torch', 'triton' or 'auto'; unset it for auto")
    return env


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (blocked)
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def choose(*tensors: torch.Tensor) -> str:
    """Pick the backend for a call on ``tensors`` (None entries are ignored)."""
    tensors = tuple(t for t in tensors if t is not None)
    forced = get_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("kernels backend 'triton' was forced but triton is not installed; "
                               "use KERNELS_BACKEND=torch or install triton")
        if not all(t.is_cuda for t in tensors) and not _interpreting():
            raise RuntimeError("kernels backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "triton is imported (the Triton interpreter); otherwise move tensors to CUDA")
        return "triton"
    if tensors and all(t.is_cuda for t in tensors) and triton_available():
        return "triton"
    return "torch"
