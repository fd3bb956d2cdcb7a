"""The run report: ``runs/<name>/report.md`` with one overview figure, the summary numbers, and
samples before and after training. Written at the end of every run (main rank); ``rlhf-engine report
RUN [RUN...]`` rebuilds it from the run folder's files, and with several runs overlays them in one
figure (written to ``--out``, default ``<first run's parent>/compare/``).

Reads only the run folder: metrics.jsonl (per step), eval.jsonl (evaluations), samples.jsonl
(tag "eval": the fixed eval prompts), run.json (summary, precision, CPU settings), recipe.yaml.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from rlhf_engine.tracking import read_jsonl

# panels of the overview figure: (title, [(metric key, label, from eval.jsonl?)], second axis key)
PANELS = [
    ("reward", [("score/mean", "reward (train)", False), ("score/mean", "reward (eval)", True)], None),
    ("KL to reference", [("kl/mean", "KL", False)], "kl/beta"),
    ("entropy", [("entropy", "entropy", False)], None),
    ("response length", [("response/length", "tokens", False)], None),
    ("loss", [("loss/train", "train", False), ("loss", "eval", True)], None),  # supervised stages
    ("eval accuracy", [("accuracy", "accuracy", True)], None),  # reward-model stage
]
SMOOTH = 0.8  # exponential moving average weight of the smoothed reward line


def smooth(values: list[float], weight: float = SMOOTH) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing), bias-corrected so it starts at values[0]."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _phase_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith("time/") and k.count("/") == 1 and k != "time/step"}
    return sorted(keys)


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl; pass a run folder (<output_dir>/<name>) of a "
                                "run that logged at least one step")
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    evals = read_jsonl(run_dir / "eval.jsonl")  # RL test-split lines carry split: test
    return {"dir": run_dir, "name": run_dir.name, "metrics": read_jsonl(run_dir / "metrics.jsonl"),
            "eval": [r for r in evals if r.get("split", "eval") == "eval"],
            "test": [r for r in evals if r.get("split") == "test"],
            "samples": read_jsonl(run_dir / "samples.jsonl"), "info": info}


def _metric_rows(run: dict) -> list[str]:
    """Table rows of the evaluation metrics (eval.metrics, reward parts), first -> last evaluation, per split."""
    out = []
    for split in ("eval", "test"):
        rows = run.get(split) or []
        keys = [k for k in rows[0] if "/" in k and k not in ("score/mean", "kl/mean", "response/length")] if rows else []
        for key in keys:
            pts = [r for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                out.append(f"| {split} | {key} | {pts[0][key]:.4f} (step {pts[0]['step']}) | "
                           f"{pts[-1][key]:.4f} (step {pts[-1]['step']}) |")
    return out


def overview_figure(runs: list[dict], path: Path) -> Path:
    """One figure: a panel per available metric group plus phase times; several runs overlaid."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also on nodes without a display
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(_series(r["eval" if ev else "metrics"], k)[0]
                                       for r in runs for k, _, ev in p[1])]
    phases = sorted({k for r in runs for k in _phase_keys(r["metrics"])})
    n = len(panels) + bool(phases)
    cols = min(3, max(n, 1))
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.3 * rows_n), dpi=100, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, lines, twin) in zip(axes.flat, panels):
        ax2 = ax.twinx() if twin else None
        for i, run in enumerate(runs):
            c, tag = colors[i % len(colors)], (f"{run['name']}: " if len(runs) > 1 else "")
            for key, label, from_eval in lines:
                xs, ys = _series(run["eval" if from_eval else "metrics"], key)
                if not xs:
                    continue
                if from_eval:
                    ax.plot(xs, ys, "o", color=c, mec="black", label=tag + label)
                elif title == "reward":
                    ax.plot(xs, ys, color=c, alpha=0.3, label=tag + label)
                    ax.plot(xs, smooth(ys), color=c, label=tag + "smoothed")
                else:
                    ax.plot(xs, ys, color=c, label=tag + label)
            if ax2 is not None:
                xs, ys = _series(run["metrics"], twin)
                ax2.plot(xs, ys, "--", color=c, alpha=0.7, label=tag + "beta")
                ax2.set_ylabel("beta")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if phases:
        ax = axes.flat[len(panels)]
        styles = ["-", "--", ":", "-."]
        for i, run in enumerate(runs):
            for j, key in enumerate(phases):
                xs, ys = _series(run["metrics"], key)
                if xs:
                    tag = f"{run['name']}: " if len(runs) > 1 else ""
                    ax.plot(xs, ys, styles[i % len(styles)], color=colors[j % len(colors)],
                            label=tag + key.split("/", 1)[1])
        ax.set_title("phase times (s per step)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _summary_rows(run: dict) -> list[tuple[str, str]]:
    m, ev, info = run["metrics"], run["eval"], run["info"]
    rows = [("steps", str(m[-1]["step"]) if m else "0")]
    summary = info.get("summary", {})
    if "train_seconds" in summary:
        rows.append(("training time", f"{summary['train_seconds']:.0f} s"))
    steps = [r.get("time/step", r.get("time_step")) for r in m]
    steps = [t for t in steps if isinstance(t, (int, float))]
    if steps:
        rows.append(("median step time", f"{sorted(steps)[len(steps) // 2]:.2f} s"))
    for key in ("score/mean", "kl/mean", "response/length", "loss", "perplexity", "accuracy"):
        pts = [r for r in ev if isinstance(r.get(key), (int, float))]
        if len(pts) >= 1:
            rows.append((f"eval {key}", f"{pts[0][key]:.4f} (step {pts[0]['step']}) -> {pts[-1][key]:.4f} "
                                        f"(step {pts[-1]['step']})"))
    p = info.get("precision", {})
    if p:
        probe = p.get("probe")
        rows.append(("precision", p.get("precision", "?") + (f" (auto: probe {probe['shape']}, fp32 "
                     f"{probe['fp32_ms']:.1f} ms vs bf16 {probe['bf16_ms']:.1f} ms)" if probe else "")))
    if info.get("cpu"):
        rows.append(("CPU settings", ", ".join(f"{k} {v}" for k, v in info["cpu"].items())))
    peak = max((r.get("memory/peak_rss_mib") or 0 for r in m), default=0)
    if peak:
        rows.append(("peak RSS (rank 0)", f"{peak:.0f} MiB"))
    return rows


def _user_text(prompt: str) -> str:
    """The last user turn of a chat-templated prompt (special tags and role names dropped)."""
    lines = [ln.strip() for ln in re.sub(r"<\|[^|]*\|>", "\n", prompt).splitlines()]
    lines = [ln for ln in lines if ln and ln not in ("system", "user", "assistant")]
    return lines[-1] if lines else prompt.strip()


def _samples(run: dict, limit: int = 3) -> list[str]:
    ev = [s for s in run["samples"] if s.get("tag") == "eval"]
    if not ev:
        return []
    out = []
    for title, step in (("before", min(s["step"] for s in ev)), ("after", max(s["step"] for s in ev))):
        out.append(f"**{title} training (step {step})**\n")
        for s in [s for s in ev if s["step"] == step][:limit]:
            prompt = _user_text(str(s["prompt"]))[-160:]
            resp = str(s["response"]).strip().replace("\n", " ")[:300]
            score = s.get("score")
            out.append(f"- prompt: `{prompt}`\n  response: {resp}" + (f" (score {score:+.3f})" if score is not None
                                                                       else ""))
        out.append("")
    return out


def write_report(run_dirs: list, out_dir: Optional[Path] = None) -> Path:
    """Write report.md and report.png for one run (into its folder) or several (overlaid, into
    `out_dir`, default ``<first run's parent>/compare``); returns the report.md path."""
    runs = [load_run(Path(d)) for d in run_dirs]
    if out_dir is None:
        out_dir = runs[0]["dir"] if len(runs) == 1 else runs[0]["dir"].parent / "compare"
    out_dir = Path(out_dir)
    figure = overview_figure(runs, out_dir / "report.png")
    title = runs[0]["name"] if len(runs) == 1 else " vs ".join(r["name"] for r in runs)
    lines = [f"# Run report: {title}", "", f"![overview]({figure.name})", "",
             "Reward per step (faint) with its smoothed line and the eval points; KL to the reference with "
             "the KL coefficient beta (dashed, right axis); entropy; response length; seconds per phase.", ""]
    for run in runs:
        lines += [f"## {run['name']}" if len(runs) > 1 else "## Summary", "", f"Run folder: `{run['dir']}`", "",
                  "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in _summary_rows(run)], ""]
        metric_rows = _metric_rows(run)
        if metric_rows:
            lines += ["### Evaluation metrics" if len(runs) > 1 else "## Evaluation metrics", "",
                      "| split | metric | first | last |", "|---|---|---|---|", *metric_rows, ""]
        samples = _samples(run)
        if samples:
            lines += ["### Samples (eval prompts)" if len(runs) > 1 else "## Samples (eval prompts)", "", *samples]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
