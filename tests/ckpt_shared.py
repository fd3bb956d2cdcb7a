"""The one 2-rank checkpoint run both test_checkpoint.py and test_export_push.py use (launched once per session).

Pytest gives each importing module its own fixture instance, so the run is cached on disk under the
session's base temp folder: the second module finds WORKDIR/results.json and does not launch again.
"""
from __future__ import annotations

import json
from pathlib import Path

from helpers import REPO, json_lines, run_deepspeed

WORKER = REPO / "tests/engine/workers/ckpt_worker.py"
RUN_NAME = "ckpt-run"  # the worker recipe's name: the run folder is WORKDIR/ckpt-run


def checkpoint_run(tmp_path_factory) -> tuple[Path, dict]:
    """(workdir, {check: {rank: result line}}) of the worker run; launches it on first use."""
    workdir = tmp_path_factory.getbasetemp() / "ckpt-worker"
    done = workdir / "results.json"
    if not done.exists():
        workdir.mkdir(exist_ok=True)
        proc = run_deepspeed(WORKER, workdir, nproc=2)
        by_check: dict = {}
        for line in json_lines(proc.stdout, "RESULT "):
            by_check.setdefault(line["check"], {})[str(line["rank"])] = line
        missing = [c for c in ("saved", "resume", "continue", "resaved") if sorted(by_check.get(c, {})) != ["0", "1"]]
        assert not missing, f"checks missing from the worker output: {missing}\n{proc.stdout[-3000:]}"
        done.write_text(json.dumps(by_check))
    return workdir, json.loads(done.read_text())
