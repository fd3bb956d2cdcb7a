"""Shared test setup: offline, CPU, quiet, few threads (2 cores here)."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Triton kernels run on the CPU through the interpreter; it must be chosen before anything (deepspeed,
# transformers) imports triton, so it is set here, in the first conftest pytest loads
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def restore_env():
    """In-process runs set RANK/MASTER_PORT for a world of one; later launcher tests must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def cpu_backend_defaults():
    """In-process tests run as a CPU run does: the CPU backend's model switches at their defaults
    (what `rlhf_engine.backends.cpu.start_run` sets), without touching the test process itself."""
    from rlhf_engine.backends import cpu
    from rlhf_engine.config import CpuConfig

    cpu.configure(CpuConfig())
    yield
    cpu.configure(None)
