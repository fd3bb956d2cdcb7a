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


# ---- engine.allocator: training entry points re-execute themselves on tcmalloc -------------------------
ALLOC_PROBE = r"""
import sys
from rlhf_engine.allocator import ensure_tcmalloc, loaded_allocator
ensure_tcmalloc()
print("ALLOC", loaded_allocator(), repr(sys.argv[1:]))
"""


def _probe(allocator: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RLHF_ENGINE_ALLOCATOR_REEXEC")}
    env["RLHF_ENGINE_ALLOCATOR"] = allocator
    return subprocess.run([sys.executable, "-c", ALLOC_PROBE, *args], env=env, capture_output=True, text=True)


def test_tcmalloc_is_installed():
    from rlhf_engine.allocator import find_tcmalloc

    assert find_tcmalloc(), ("libtcmalloc-minimal4 is missing: `make install` installs it with apt-get when run "
                             "as root; without it training runs on glibc malloc (slower, more memory)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-exec is Linux-only")
def test_entry_point_reexecutes_on_tcmalloc_with_the_same_arguments():
    out = _probe("auto", "train", "--set", "a=1 b")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ALLOC tcmalloc ['train', '--set', 'a=1 b']", out.stdout + out.stderr


def test_allocator_opt_out_and_bad_value():
    out = _probe("system")
    assert out.returncode == 0 and out.stdout.split()[:2] == ["ALLOC", "system"], out.stdout + out.stderr
    bad = _probe("mimalloc")
    assert bad.returncode != 0 and "RLHF_ENGINE_ALLOCATOR='mimalloc'" in bad.stderr and "auto, tcmalloc or system" \
        in bad.stderr
