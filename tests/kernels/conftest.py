"""Kernel tests: every backend against float64 references.

The Triton kernels run on CPU tensors through the Triton interpreter, which must be switched on
before any ``@triton.jit`` function is created, i.e. before ``kernels._triton`` is imported
(``kernels`` imports it lazily, on the first Triton call).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_checks import HAS_TRITON  # noqa: E402

from rlhf_engine import kernels  # noqa: E402

NO_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
BACKENDS = ["torch", pytest.param("triton", marks=NO_TRITON)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test once per backend, forcing it through ``kernels.set_backend``."""
    with kernels.set_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
