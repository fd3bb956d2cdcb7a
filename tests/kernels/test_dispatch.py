"""Backend choice: set_backend, KERNELS_BACKEND, auto, and importing without triton."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_checks import HAS_TRITON

from rlhf_engine import kernels
from rlhf_engine.kernels import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    assert kernels.get_backend() is None
    assert kernels.choose_backend(torch.zeros(2)) == "torch"


def test_env_var_read_at_call_time(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    assert kernels.choose_backend(torch.zeros(2)) == "torch"
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    if HAS_TRITON:
        assert kernels.choose_backend(torch.zeros(2)) == "triton"  # TRITON_INTERPRET=1 from conftest
    else:
        with pytest.raises(RuntimeError, match="not installed"):
            kernels.choose_backend(torch.zeros(2))
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        kernels.choose_backend(torch.zeros(2))


def test_set_backend_beats_env_and_restores(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    with kernels.set_backend("torch"):
        assert kernels.choose_backend(torch.zeros(2)) == "torch"
        with kernels.set_backend("triton"):
            assert kernels.get_backend() == "triton"
        assert kernels.get_backend() == "torch"
    assert kernels.get_backend() == "triton"
    kernels.set_backend("torch")  # plain call form
    try:
        assert kernels.get_backend() == "torch"
    finally:
        kernels.set_backend(None)
    with pytest.raises(ValueError, match="set_backend"):
        kernels.set_backend("cuda")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.set_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 2]))


def test_import_and_run_without_triton():
    """The package imports and runs on CPU with triton unimportable; forcing triton says why it fails."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\nfrom rlhf_engine import kernels\n"
        "x = torch.randn(3, 11, requires_grad=True)\n"
        "kernels.logprobs_from_logits(x, torch.tensor([1, 2, 3])).sum().backward()\n"
        "assert kernels.choose_backend(x) == 'torch' and sys.modules['triton'] is None\n"
        "kernels.set_backend('triton')\n"
        "try:\n    kernels.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1.0, 1.0)\n"
        "except RuntimeError as e:\n    assert 'not installed' in str(e); print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("KERNELS_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    _dispatch.triton_available.cache_clear()


def test_engine_computes_logprobs_only_through_kernels():
    """The engine has no log-softmax of its own (it would materialise [tokens, vocab] float32)."""
    sources = sorted(Path(ROOT, "engine").rglob("*.py"))
    offenders = [f"{path}:{i}" for path in sources
                 for i, line in enumerate(path.read_text().splitlines(), 1) if "log_softmax" in line]
    assert Path(ROOT, "engine", "trainer.py") in sources and not offenders, offenders
