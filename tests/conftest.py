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
