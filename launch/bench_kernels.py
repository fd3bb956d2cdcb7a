"""Benchmark: naive (``*_reference``) vs fused kernels, forward + backward, time and peak memory.

    python launch/bench_kernels.py                      # every case (slow on a small CPU: the big ones take minutes)
    python launch/bench_kernels.py --quick              # a small subset
    python launch/bench_kernels.py --cases logits-32000x2048,linear-128256x2048x576 --dtype float32

Cases are ``logits-VxN`` (logprobs_from_logits on [N, V] logits) and ``linear-VxNxH``
(linear_logprobs with hidden [N, H] and weight [V, H]); ``--cases`` takes names or fnmatch patterns.
Prints one JSON line per (case, variant) and a table at the end.

Method. Every (case, variant) runs in a fresh subprocess on the torch backend: warm up on a tiny
problem (thread pools, oneDNN), allocate the inputs, then reset the kernel's RSS high-water mark
(``echo 5 > /proc/self/clear_refs``) and read ``VmRSS`` as the baseline. ``peak_mb`` is
``VmHWM - baseline`` after one forward + backward (``(logprobs * g).sum().backward()``), so it counts
everything the step allocates, input gradients included (``grads_mb``: their size, a floor that
every variant pays; for float32 logits it caps the naive / fused ratio near 3, hence the table's
"x excl grads" column). tracemalloc does not see torch's allocations; where clear_refs is not
allowed, ``ru_maxrss`` is used and the warm-up is skipped.
``time_s`` is the fastest of ``--repeat`` steps. Naive and fused subprocesses alternate, and with
``--rounds R`` every case is revisited R times (fastest time, highest peak kept), so that load from
other processes on a shared machine hits both variants alike.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import resource
import subprocess
import sys
import time

VOCABS = (32000, 49152, 128256)
TOKENS = (2048, 8192)
HIDDENS = (576, 4096)  # SmolLM2-135M, and a 7B-class model
QUICK = ("logits-32000x2048", "logits-49152x2048", "logits-128256x2048",
         "linear-32000x2048x576", "linear-49152x2048x576", "linear-128256x2048x576")


def all_cases() -> list[str]:
    cases = [f"logits-{v}x{n}" for v in VOCABS for n in TOKENS]
    return cases + [f"linear-{v}x{n}x{h}" for v in VOCABS for n in TOKENS for h in HIDDENS]


def parse_case(name: str) -> tuple[str, int, int, int]:
    kind, dims = name.split("-", 1)
    sizes = [int(d) for d in dims.split("x")]
    if kind == "logits" and len(sizes) == 2:
        return kind, sizes[0], sizes[1], 0
    if kind == "linear" and len(sizes) == 3:
        return kind, sizes[0], sizes[1], sizes[2]
    raise ValueError(f"kernels.bench: bad case {name!r}; expected logits-VxN or linear-VxNxH")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kb(resettable: bool) -> int:
    return _status_kb("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _make(kind, V, N, H, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::17] = -100  # some padding, as in real batches
    upstream = torch.randn(N, generator=g)
    if kind == "logits":
        x = (torch.randn(N, V, generator=g) * 2).to(dtype).requires_grad_()
        return (x,), labels, upstream
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    return (h, w), labels, upstream


def _step(kind, variant, tensors, labels, upstream):
    from rlhf_engine import kernels

    if kind == "logits":
        fn = kernels.logprobs_from_logits if variant == "fused" else kernels.logprobs_from_logits_reference
    else:
        fn = kernels.linear_logprobs if variant == "fused" else kernels.linear_logprobs_reference
    lp = fn(*tensors, labels)
    (lp * upstream).sum().backward()
    for t in tensors:
        t.grad = None


def worker(case: str, variant: str, dtype_name: str, repeat: int, threads: int | None) -> dict:
    import torch

    from rlhf_engine import kernels

    kernels.set_backend("torch")
    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    kind, V, N, H = parse_case(case)
    resettable = _reset_peak()
    if resettable:  # warm-up would raise a non-resettable high-water mark, so only when we can reset
        _step(kind, variant, *_make(kind, 1000, 64, min(H, 64) or 64, dtype))
    tensors, labels, upstream = _make(kind, V, N, H, dtype)
    gc.collect()
    _reset_peak()
    base_kb = _status_kb("VmRSS")
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        _step(kind, variant, tensors, labels, upstream)
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak_kb = _peak_kb(resettable)
    grads_mb = sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20  # the step's required output
    return dict(case=case, kind=kind, vocab=V, tokens=N, hidden=H or None, dtype=dtype_name, variant=variant,
                time_s=round(min(times), 4), peak_mb=round((peak_kb - base_kb) / 1024, 1),
                grads_mb=round(grads_mb, 1),
                baseline_mb=round(base_kb / 1024, 1), threads=torch.get_num_threads(),
                peak_method="VmHWM-reset" if resettable else "ru_maxrss")


def _naive_bytes(kind, V, N, H, itemsize) -> int:
    # rough upper bound of the naive step: ~4 [N, V] float32 tensors plus the input-dtype logits
    return N * V * (16 + 2 * itemsize) + (V * H * 12 if kind == "linear" else 0)


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def run_case(case, variant, dtype, repeat, threads=None) -> dict:
    cmd = [sys.executable, "launch/bench_kernels.py", "--worker", case, variant,
           "--dtype", dtype, "--repeat", str(repeat)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(case=case, variant=variant, dtype=dtype, error=proc.stderr.strip().splitlines()[-1:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """naive vs fused per case; ``mem x`` = naive peak / fused peak, ``x excl grads`` = the same with the
    input gradients (which both must allocate) subtracted from both peaks."""
    by_case: dict[str, dict] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["variant"]] = r
    head = (f"{'case':<24}{'dtype':<10}{'naive s':>9}{'fused s':>9}{'speedup':>9}{'naive MB':>10}"
            f"{'fused MB':>10}{'mem x':>7}{'grads MB':>10}{'x excl grads':>14}")
    lines = [head, "-" * len(head)]
    for case, v in by_case.items():
        n, f = v.get("naive", {}), v.get("fused", {})

        def cell(r, key, fmt):
            return format(r[key], fmt) if key in r else ("err" if "error" in r else ("skip" if r else "-"))

        both = "peak_mb" in n and "peak_mb" in f
        speed = f"{n['time_s'] / f['time_s']:.2f}" if "time_s" in n and "time_s" in f else "-"
        mem = f"{n['peak_mb'] / max(f['peak_mb'], 0.1):.1f}" if both else "-"
        extra = (n["peak_mb"] - n["grads_mb"], max(f["peak_mb"] - f["grads_mb"], 1.0)) if both else None
        excl = (f"{extra[0] / extra[1]:.1f}" if extra[1] > 1.0 else f">{extra[0]:.0f}") if both else "-"
        lines.append(f"{case:<24}{(f or n).get('dtype', ''):<10}{cell(n, 'time_s', '.3f'):>9}"
                     f"{cell(f, 'time_s', '.3f'):>9}{speed:>9}{cell(n, 'peak_mb', '.0f'):>10}"
                     f"{cell(f, 'peak_mb', '.0f'):>10}{mem:>7}{cell(f or n, 'grads_mb', '.0f'):>10}{excl:>14}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python launch/bench_kernels.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--cases", default=None, help="comma-separated case names or fnmatch patterns")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--repeat", type=int, default=None, help="timed steps per variant (default 3, --quick 2)")
    p.add_argument("--variants", default="naive,fused")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    p.add_argument("--rounds", type=int, default=1, help="run every (case, variant) this many times, "
                   "interleaved; the table keeps the fastest time and the highest peak")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    repeat = a.repeat or (2 if a.quick else 3)
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.dtype, repeat, a.threads)), flush=True)
        return 0
    cases = all_cases()
    if a.quick:
        cases = list(QUICK)
    if a.cases:
        pats = [c.strip() for c in a.cases.split(",") if c.strip()]
        cases = [c for c in all_cases() if any(fnmatch.fnmatch(c, q) for q in pats)]
        cases += [q for q in pats if q not in cases and not any(ch in q for ch in "*?[")]
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[a.dtype]
    best: dict[tuple[str, str], dict] = {}
    for rnd in range(a.rounds):  # rounds revisit every case, so each variant samples several load windows
        for case in cases:
            kind, V, N, H = parse_case(case)
            for variant in a.variants.split(","):
                if variant == "naive" and _naive_bytes(kind, V, N, H, itemsize) > 0.8 * _available_bytes():
                    row = dict(case=case, variant=variant, dtype=a.dtype, skipped="not enough free memory")
                else:
                    row = run_case(case, variant, a.dtype, repeat, a.threads)
                row["round"] = rnd
                print(json.dumps(row), flush=True)
                prev = best.get((case, variant))
                if prev is None or "time_s" not in prev:
                    best[(case, variant)] = row
                elif "time_s" in row:  # fastest time over rounds, highest peak over rounds
                    best[(case, variant)] = dict(prev, time_s=min(prev["time_s"], row["time_s"]),
                                                 peak_mb=max(prev["peak_mb"], row["peak_mb"]))
    print()
    print(table(list(best.values())))
    print(f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
