"""launch/bench_kernels.py runs end to end on a tiny case (the real cases are run by hand: see its docstring)."""

import json
import os
import subprocess
import sys

from helpers import load_launch_script

bench = load_launch_script("bench_kernels")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cases_and_parse():
    assert "logits-128256x8192" in bench.all_cases() and "linear-32000x2048x576" in bench.all_cases()
    assert bench.parse_case("linear-10x20x30") == ("linear", 10, 20, 30)


def test_tiny_run():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "launch/bench_kernels.py", "--cases", "logits-500x64,linear-300x32x16",
                          "--repeat", "1", "--dtype", "float32"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {(r["case"], r["variant"]) for r in rows} == {
        (c, v) for c in ("logits-500x64", "linear-300x32x16") for v in ("naive", "fused")}
    assert all(r["time_s"] > 0 and "peak_mb" in r for r in rows), rows
    assert "speedup" in out.stdout and "mem x" in out.stdout
