"""Hardware backends: tuning that belongs to one kind of device, applied at the start of a run.

`cpu` is the only one so far (allocator, huge pages, malloc thresholds, oneDNN linears, lean
activations, the fused decoder); GPUs run the models as Hugging Face and DeepSpeed build them.
"""
from __future__ import annotations


def on_cpu() -> bool:
    """True when this process trains on the CPU (no CUDA device visible)."""
    import torch

    return not torch.cuda.is_available()
