"""rlhf-engine: SFT, reward modelling and RL (PPO, GRPO, RLOO, REINFORCE++) on DeepSpeed."""
import os

# Transparent huge pages for PyTorch's CPU allocator (read once, at torch's first allocation, so it is
# set before torch is imported). Large tensors are freed back to the OS and every new one page-faults
# 4 KiB at a time; 2 MiB pages make the PPO step's forwards ~1.5x faster on CPU. Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
