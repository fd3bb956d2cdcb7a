"""engine.keep_freed_memory: freed tensors stay with the process, so the next step does not page-fault."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import torch, engine
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
# a training step's pattern: tensors over glibc's largest default mmap threshold (32 MiB), then freed
tensors = [torch.ones(mib * 2**20 // 4) for mib in (64, 40, 96, 48)]
before = rss_mib()
del tensors
print(round(before - rss_mib()), engine.keep_freed_memory())
"""


def _returned_to_os_mib(env_value: str) -> tuple[int, str]:
    env = {**os.environ, "RLHF_ENGINE_KEEP_FREED_MEMORY": env_value}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    returned, applied = out.stdout.split()
    return int(returned), applied


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_tensors_stay_with_the_process():
    """Default glibc unmaps every freed tensor over 32 MiB (the next step faults its pages in again)."""
    kept, applied = _returned_to_os_mib("1")
    returned, not_applied = _returned_to_os_mib("0")
    assert applied == "True" and not_applied == "False"
    assert returned > 200  # opted out: the 248 MiB go back to the OS
    assert kept < 10  # kept for the next step's tensors
