"""rlhf-engine: SFT, reward modelling and RL (PPO, GRPO, RLOO, REINFORCE++) on DeepSpeed."""
import ctypes
import os
import sys

# Transparent huge pages for PyTorch's CPU allocator (read once, at torch's first allocation, so it is
# set before torch is imported). Large tensors are freed back to the OS and every new one page-faults
# 4 KiB at a time; 2 MiB pages make the PPO step's forwards ~1.5x faster on CPU. Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (True if applied).

    By default glibc serves every allocation over 32 MiB (activations, gradients, logits) with a
    fresh mmap and unmaps it on free, so each training step page-faults and zeroes its whole working
    set again: ~0.6 s of a 1.2 s backward of a 135M model on 2 CPU cores. With mmap and trimming
    thresholds of 1 GiB the heap keeps those pages, and the next step reuses them. Peak RSS is still
    the step's working set (freed memory is reused, not leaked). Set RLHF_ENGINE_KEEP_FREED_MEMORY=0
    to opt out; other C libraries than glibc are left alone.
    """
    if os.environ.get("RLHF_ENGINE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


keep_freed_memory()
