"""The CPU backend's process settings (rlhf_engine.backends.cpu.process): applied at run start, never on
import. `import rlhf_engine` leaves the environment and malloc alone; a run on CPU keeps freed memory,
turns on huge pages and re-executes itself on tcmalloc with the same arguments."""
import os
import subprocess
import sys

import pytest

from helpers import TEST_ENV

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc/LD_PRELOAD are Linux-only")

# a training step's pattern: tensors over glibc's default mmap threshold (32 MiB), then freed
PROBE = r"""
import os, sys
import torch, deepspeed, transformers, peft  # libraries set variables of their own on import (not ours)
env = dict(os.environ)
import rlhf_engine, rlhf_engine.cli, rlhf_engine.worker, rlhf_engine.models, rlhf_engine.trainer, rlhf_engine.backends.cpu
import torch
if sys.argv[1] == "start":
    from rlhf_engine.backends.cpu import start_run
    from rlhf_engine.config import CpuConfig
    start_run(CpuConfig(), process_start=True)
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
tensors = [torch.ones(mib * 2**20 // 4) for mib in (64, 40, 96, 48)]
before = rss_mib()
del tensors
changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
print("RESULT", round(before - rss_mib()), ",".join(changed) or "-", os.environ.get("THP_MEM_ALLOC_ENABLE", "-"),
      "tcmalloc" if "libtcmalloc" in open("/proc/self/maps").read() else "system", sys.argv[1:])
"""


def _probe(*args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "THP_MEM_ALLOC_ENABLE", "RLHF_ENGINE_CPU_REEXEC")}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env={**env, **TEST_ENV}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return next(line for line in out.stdout.splitlines() if line.startswith("RESULT")).split(maxsplit=5)[1:]


@LINUX
def test_import_changes_nothing_in_the_process():
    returned, changed, thp, allocator, _ = _probe("import")
    assert changed == "-"  # no environment variable set by importing the package and its modules
    assert thp == "-" and allocator == "system"
    assert int(returned) > 200  # glibc's default: freed large tensors go back to the OS (no mallopt)


@LINUX
def test_run_start_keeps_freed_memory_sets_huge_pages_and_reexecutes_on_tcmalloc():
    from rlhf_engine.backends.cpu.process import find_tcmalloc

    returned, _, thp, allocator, argv = _probe("start", "--set", "a=1 b")
    assert thp == "1"
    assert int(returned) < 10  # mallopt: kept for the next step's tensors
    assert argv == "['start', '--set', 'a=1 b']"  # the re-exec kept the arguments
    if find_tcmalloc():
        assert allocator == "tcmalloc"


def test_tcmalloc_is_installed():
    from rlhf_engine.backends.cpu.process import find_tcmalloc

    assert find_tcmalloc(), ("libtcmalloc-minimal4 is missing: `make install` installs it with apt-get when run "
                             "as root; without it training runs on glibc malloc (slower, more memory)")
