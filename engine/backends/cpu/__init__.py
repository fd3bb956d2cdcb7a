"""The CPU backend: every CPU-specific speed setting behind one entry point, `start_run`.

The run's entry (``rlhf_engine.worker.run``) calls ``start_run(recipe.cpu)`` once at the start of a
run when it trains on the CPU, never on import and never on a GPU. Its switches are the recipe's
``cpu:`` section (``CpuConfig``; defaults right for most machines):

    allocator, transparent_huge_pages  process environment (re-exec at a real process start: process.py)
    keep_freed_memory                  glibc mallopt thresholds (process.py)
    onednn_linear                      float32 nn.Linear forwards on oneDNN (onednn.py)
    lean_activations                   Llama-family MLP / RMSNorm keep fewer activations (lean.py)
    fused_decode                       Llama-family rollouts decode with a fused step (decode.py)
    skinny_decode_linear               F.linear swapped for W @ x.T while the actor generates (linear.py)

The model loaders and the hybrid engine ask this module (`tune_model`, `fused_decoder`,
`decode_linears`), which answers "nothing to do" until a run has started it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

from rlhf_engine.config import CpuConfig

_ACTIVE: Optional[CpuConfig] = None


def start_run(cfg: CpuConfig, *, process_start: bool = False) -> dict:
    """Apply `cfg` for this process (call once, at the start of a run, on CPU only); returns what is
    in effect. ``process_start``: this is a real process start (a CLI or launcher entry, no process
    group yet), so the process may re-execute itself to get the allocator and huge pages."""
    from rlhf_engine.backends.cpu import process

    if process_start:
        process.prepare_process(cfg.allocator, cfg.transparent_huge_pages)  # returns only if nothing is missing
    kept = process.keep_freed_memory() if cfg.keep_freed_memory else False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would detect, without its warning
    configure(cfg)
    info = {"allocator": process.loaded_allocator(),
            "transparent_huge_pages": os.environ.get(process.THP_ENV) == "1", "keep_freed_memory": kept}
    if os.environ.get("RANK", "0") == "0":
        print("[cpu] " + ", ".join(f"{k}: {v}" for k, v in info.items())
              + ("" if info["allocator"] == "tcmalloc" else
                 " (install libtcmalloc-minimal4 for faster steps and less memory)"), file=sys.stderr, flush=True)
    return info


def configure(cfg: Optional[CpuConfig]) -> None:
    """Set the model-level switches (oneDNN, lean, fused decode, skinny decode linears) without
    touching the process; None turns the backend off. For libraries and tests; runs use `start_run`."""
    global _ACTIVE
    _ACTIVE = cfg


def active() -> Optional[CpuConfig]:
    """The settings in effect in this process, or None when the CPU backend was not started."""
    return _ACTIVE


def tune_model(model, *, for_training: bool = True):
    """Lean activations (training models only) and oneDNN float32 linears, as switched; returns `model`.
    Call after LoRA wrapping: adapter-wrapped projections keep their own forward."""
    cfg = _ACTIVE
    if cfg is None:
        return model
    if cfg.lean_activations and for_training:
        from rlhf_engine.backends.cpu.lean import make_lean

        make_lean(model)
    if cfg.onednn_linear:
        from rlhf_engine.backends.cpu.onednn import use_onednn_linears

        use_onednn_linears(model)
    return model


def fused_decoder(model, batch: int, max_len: int):
    """(FusedDecoder, None) for a supported model while ``cpu.fused_decode`` is on, else (None, why)."""
    if _ACTIVE is None or not _ACTIVE.fused_decode:
        return None, None
    from rlhf_engine.backends.cpu.decode import FusedDecoder

    why_not = FusedDecoder.why_unsupported(model)
    return (FusedDecoder(model, batch, max_len), None) if why_not is None else (None, why_not)


@contextlib.contextmanager
def decode_linears() -> Iterator[None]:
    """While generating: ``F.linear`` as ``W @ x.T`` for decode-step shapes (``cpu.skinny_decode_linear``)."""
    if _ACTIVE is None or not _ACTIVE.skinny_decode_linear:
        yield
        return
    from rlhf_engine.backends.cpu.linear import decode_linear

    with decode_linear():
        yield
