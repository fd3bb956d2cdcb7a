"""Run folder bookkeeping: metrics.jsonl, samples.jsonl, eval.jsonl, wandb, progress, plots.

Only the main rank writes. Every line is flushed as it is written, so a crash loses nothing that
was already logged. Progress goes to stderr as one line per step (phase, step, ETA, throughput),
which stays readable in launcher logs where live progress bars turn into noise.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from rlhf_engine.config import Recipe, recipe_to_yaml


def _clean(v: Any) -> Any:
    """JSON-safe scalars: tensors -> floats, NaN/inf -> None (JSON has no NaN)."""
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


class Tracker:
    """Writes the run folder of `recipe` (rank 0 only; other ranks get a silent tracker)."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, is_main: bool = True, total_steps: int = 0):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.total_steps = total_steps
        self.recipe = recipe
        self._t0 = time.perf_counter()
        self._wandb = None
        self._files: dict[str, Any] = {}
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        wb = recipe.logging.wandb
        if wb is not None and wb.mode != "disabled":
            import wandb

            # the run folder keeps its wandb run id: a resumed run continues the same wandb run (a fresh
            # run starts in an emptied folder, see checkpoint.prepare_run_dir, so it gets a new one)
            id_file = self.run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            self._wandb = wandb.init(project=wb.project, name=recipe.name, mode=wb.mode, dir=str(self.run_dir),
                                     config=recipe.model_dump(mode="json"), reinit=True, id=run_id,
                                     resume="allow" if run_id else None)
            id_file.write_text(self._wandb.id + "\n")

    def _append(self, name: str, record: dict) -> None:
        if not self.is_main:
            return
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.run_dir / name, "a", buffering=1)
        f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def drop_after(self, step: int) -> None:
        """On resume: forget lines logged after the checkpoint's step (they are computed again)."""
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
            path = self.run_dir / name
            if path.exists():
                keep = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= step]
                path.write_text("".join(line + "\n" for line in keep))

    def log_metrics(self, step: int, metrics: dict) -> None:
        """One line of metrics.jsonl (and wandb) for `step`."""
        self._append("metrics.jsonl", {"step": step, **metrics})
        if self._wandb is not None:
            self._wandb.log({k: _clean(v) for k, v in metrics.items()}, step=step)

    def log_eval(self, step: int, metrics: dict) -> None:
        self._append("eval.jsonl", {"step": step, **metrics})
        if self._wandb is not None:
            self._wandb.log({f"eval/{k}": _clean(v) for k, v in metrics.items()}, step=step)

    def log_samples(self, step: int, prompts: list[str], responses: list[str], scores: list[float],
                    tag: str = "train") -> None:
        for p, r, s in zip(prompts, responses, scores):
            self._append("samples.jsonl", {"step": step, "tag": tag, "prompt": p, "response": r, "score": s})

    def progress(self, phase: str, step: int, total: int, extra: str = "") -> None:
        """One progress line: phase, step/total, elapsed, ETA, and whatever the caller adds."""
        if not (self.is_main and self.recipe.logging.progress):
            return
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / step * (total - step) if step else float("nan")
        eta_s = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
        print(f"[{phase}] step {step}/{total}  elapsed {elapsed:5.0f}s  eta {eta_s}  {extra}", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(run_dir: Path, keys: Optional[list[str]] = None) -> list[Path]:
    """Write plots/<key>.png curves from metrics.jsonl; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none wanted on cluster nodes
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        return []
    keys = keys or [k for k in ("score/mean", "reward/mean", "kl/mean", "kl/beta", "loss/policy", "loss/value",
                                "loss/ptx", "entropy", "response/length") if any(k in r for r in rows)]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for key in keys:
        xs = [r["step"] for r in rows if r.get(key) is not None]
        ys = [r[key] for r in rows if r.get(key) is not None]
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / (key.replace("/", "_") + ".png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    parts = sorted({k for r in rows for k in r if k.startswith("reward/") and k != "reward/mean"})
    if parts:  # several rewards: one figure with each part's curve
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for key in parts:
            ax.plot([r["step"] for r in rows if r.get(key) is not None],
                    [r[key] for r in rows if r.get(key) is not None], label=key[len("reward/"):])
        ax.set_xlabel("step")
        ax.set_title("rewards")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "reward_parts.png")
        plt.close(fig)
        written.append(out_dir / "reward_parts.png")
    return written


def run_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / recipe.name


def archive_previous_run(run_dir: Path) -> Optional[Path]:
    """Move an earlier run's folder aside (``<name>.<timestamp>``) so a fresh run never appends
    to or overwrites it. Returns where it went, or None if there was nothing."""
    run_dir = Path(run_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(run_dir.stat().st_mtime))
    target = run_dir.with_name(f"{run_dir.name}.{stamp}")
    n = 1
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}.{stamp}-{n}"), n + 1
    run_dir.rename(target)
    return target
