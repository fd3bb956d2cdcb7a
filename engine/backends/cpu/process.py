"""Process-level CPU settings: the memory allocator (tcmalloc preload), transparent huge pages for
torch's CPU allocator, and glibc's mallopt. Applied by `rlhf_engine.backends.cpu.start_run`, never on
import.

Why each one:
- tcmalloc: torch on CPU allocates and frees activations, gradients and temporaries (tens to hundreds
  of MB each) every step. glibc's heap fragments: aligned requests of a freed size often miss the
  freed chunk, take fresh pages and page-fault them again; tcmalloc keeps per-size free lists and
  reuses them (faster steps and a lower peak RSS on the PPO benchmark; see docs/benchmarks.md).
  jemalloc, tried too, made the training forward slower.
- THP_MEM_ALLOC_ENABLE=1: large tensors land on 2 MiB pages instead of page-faulting 4 KiB at a time.
  torch reads the variable once, at its first CPU allocation, so it must be in the environment
  before the process starts.
- mallopt (glibc only): by default glibc serves every allocation over 32 MiB with a fresh mmap and
  unmaps it on free, so each step page-faults and zeroes its whole working set again. With mmap and
  trim thresholds of 1 GiB the heap keeps those pages for the next step (peak RSS is still the
  step's working set: freed memory is reused, not leaked).

Both environment settings must be in place before the process starts, so `prepare_process`
re-executes the current command with them (same PID, argv and environment otherwise), as
PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu --enable-tcmalloc`) does. Ranks started by
the deepspeed launcher inherit the environment. `make install` installs Debian's
libtcmalloc-minimal4 when it can (root + apt-get).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from typing import Optional

THP_ENV = "THP_MEM_ALLOC_ENABLE"
_REEXEC_MARK = "RLHF_ENGINE_CPU_REEXEC"
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/*-linux-gnu", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/local/lib64")


def find_tcmalloc() -> Optional[str]:
    """Path of an installed tcmalloc shared library, or None."""
    for name in _NAMES:
        for pattern in _DIRS:
            hits = sorted(glob.glob(os.path.join(pattern, name)))
            if hits:
                return hits[0]
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return found  # a soname the dynamic linker resolves itself (LD_PRELOAD accepts it)


def loaded_allocator() -> str:
    """'tcmalloc' if this process runs on tcmalloc, else 'system' (read from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "libtcmalloc" in f.read() else "system"
    except OSError:  # not Linux
        return "system"


def wanted_env(allocator: str, transparent_huge_pages: bool) -> dict[str, str]:
    """Environment variables this process still needs (empty: nothing to do). `allocator`: auto |
    tcmalloc | system (see CpuConfig.allocator)."""
    env: dict[str, str] = {}
    if transparent_huge_pages and os.environ.get(THP_ENV) is None:  # an explicit 0 from the user stays
        env[THP_ENV] = "1"
    if allocator != "system" and sys.platform.startswith("linux") and loaded_allocator() != "tcmalloc":
        lib = find_tcmalloc()
        if lib is None and allocator == "tcmalloc":
            raise SystemExit("error: cpu.allocator is 'tcmalloc' but no libtcmalloc_minimal.so.4 was found; install "
                             "it (Debian/Ubuntu: apt-get install libtcmalloc-minimal4) or set cpu.allocator: auto")
        if lib is not None:
            env["LD_PRELOAD"] = " ".join(filter(None, [lib, os.environ.get("LD_PRELOAD", "")]))
            # tcmalloc reports every allocation over 1 GiB on stderr; a 7B model's weights make that noise
            env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return env


def prepare_process(allocator: str, transparent_huge_pages: bool) -> None:
    """Re-execute this process with `wanted_env` applied unless nothing is missing (see module doc).

    Call it at a real process start, before threads or a process group exist. Returns normally when
    nothing is to be done, or after a re-exec that did not take (never loops)."""
    env = wanted_env(allocator, transparent_huge_pages)
    if not env:
        return
    if os.environ.get(_REEXEC_MARK) == "1":  # we already tried: the preload did not take
        print(f"[run] warning: LD_PRELOAD={os.environ.get('LD_PRELOAD', '')} did not load tcmalloc; running on "
              "the system malloc", file=sys.stderr, flush=True)
        return
    env = {**os.environ, **env, _REEXEC_MARK: "1"}
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (True if applied)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))
