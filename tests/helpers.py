"""Run real multi-process jobs through the `deepspeed` launcher (CPU ranks on gloo)."""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what test subprocesses need: tests/ on the path (workers import helpers), and never the checkout's root
# first (`python -m`/`-c` put the current folder there, where kernels/ would shadow Hugging Face's
# `kernels`; PYTHONSAFEPATH stops that)
TEST_ENV = {"PYTHONPATH": str(REPO / "tests"), "PYTHONSAFEPATH": "1"}


def load_launch_script(name: str):
    """Import launch/<name>.py (a script, not a package module) so tests can call its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(script: str | Path, *args: str, nproc: int = 2, port: int | None = None) -> list[str]:
    """The command the `deepspeed --num_gpus nproc` runner starts on a single node: DeepSpeed's per-node
    launcher (deepspeed.launcher.launch) with the same world info, spawning the ranks. Skipping the
    runner saves one interpreter importing deepspeed per run (~3 s of CPU); tests of the runner itself
    (the CLI's --nproc, multi-node) go through it."""
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", str(script), *map(str, args)]


def run_deepspeed(script: str | Path, *args: str, nproc: int = 2, timeout: int = 600,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `script args...` on nproc CPU ranks (gloo) as `deepspeed --num_gpus nproc` does; fail the test
    with the log if it fails."""
    port = free_port()
    cmd = deepspeed_cmd(script, *args, nproc=nproc, port=port)
    full_env = {**os.environ, **TEST_ENV, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"deepspeed run failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"the run left DeepSpeed shared-memory buffers behind (RAM leak): {leaked}"
    return proc


def kill_when(cmd: list[str], marker: Path, timeout: int = 600) -> None:
    """Start ``cmd`` (a launcher and its ranks) in its own process group and kill -9 the whole group once
    ``marker`` exists (e.g. a checkpoint's COMPLETE file): a crash that loses only what was not saved."""
    env = {**os.environ, **TEST_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before {marker} was written"
        assert time.time() < deadline, f"no {marker} within {timeout} s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def json_lines(text: str, prefix: str) -> list[dict]:
    """Parse 'PREFIX {json}' records that worker scripts print.

    Ranks share the launcher's stdout, so two records can land on one line: every PREFIX starts a
    record, and only the JSON object right after it is read.
    """
    decoder = json.JSONDecoder()
    records = []
    for chunk in text.split(prefix)[1:]:
        records.append(decoder.raw_decode(chunk.lstrip())[0])
    return records


def cpu_switches(**switches):
    """Context manager: the CPU backend's model switches (recipe `cpu:` keys) for an in-process test;
    the previous settings come back on exit. Tests start with the defaults on (tests/conftest.py)."""
    import contextlib

    from rlhf_engine.backends import cpu
    from rlhf_engine.config import CpuConfig

    @contextlib.contextmanager
    def scope():
        before = cpu.active()
        cpu.configure(CpuConfig(**switches))
        try:
            yield
        finally:
            cpu.configure(before)

    return scope()


def send_json(handler, payload: dict, code: int = 200) -> None:
    """Answer an http.server request with a JSON body (the test reward servers speak OpenRLHF's protocol)."""
    body = json.dumps(payload).encode()
    handler.send_response(code)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
