"""Compare how variants of one recipe learn: same recipe, a few `--set` overrides, several seeds.

    python launch/compare_runs.py recipes/smoke/ppo-smollm2.yaml \\
        --variant fp32:deepspeed.precision=fp32 --variant recommended: --seeds 7,8

Each (variant, seed) is a fresh `rlhf-engine train` process writing its own run folder under
``--workdir``; nothing else of the recipe changes. Reads back metrics.jsonl and eval.jsonl and prints
one JSON line per run, a summary line (``COMPARE_JSON {...}``) and a table: eval reward before and
after training (mean over seeds, and the seed range), the training reward curve averaged over seeds
(the mean of the first and of the last quarter of the steps), final KL, and median seconds per step.

A variant is ``name:key=value,key=value`` (an empty right side runs the recipe as written). Use it
to decide whether a faster setting learns as well, e.g. bf16 autocast against fp32 (README).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from rlhf_engine.tracking import read_jsonl  # noqa: E402

RESERVED = ("seed", "name", "output_dir")  # set per run by this script


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'fp32:deepspeed.precision=fp32,train.steps=5' -> ('fp32', ['deepspeed.precision=fp32', 'train.steps=5']).

    Commas split only before the next KEY=, so list values stay whole: 'b:optim.betas=[0.9,0.95]'.
    """
    name, sep, sets = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] "
                                         "(NAME: alone runs the recipe unchanged)")
    overrides = [s.strip() for s in re.split(r",(?=\s*[\w.]+\s*=)", sets) if s.strip()]
    bad = [s for s in overrides if "=" not in s]
    if bad:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: {bad[0]!r} is not KEY=VALUE")
    check_not_reserved(overrides, f"--variant {name.strip()}")
    return name.strip(), overrides


def check_not_reserved(overrides: list[str], where: str) -> None:
    """seed, name and output_dir are this script's to set per run (they pick the run folder it reads)."""
    for item in overrides:
        if item.split("=", 1)[0].strip() in RESERVED:
            raise argparse.ArgumentTypeError(f"{where}: {item!r} sets a key this script sets per run "
                                             f"({', '.join(RESERVED)}); use --seeds and --workdir instead")


def run_one(recipe: str, variant: str, overrides: list[str], seed: int, workdir: Path, extra: list[str]) -> dict:
    """Train one (variant, seed) in a fresh process; return its curves and timings."""
    name = f"{variant}-seed{seed}"
    sets = [*extra, *overrides, f"seed={seed}", f"name={name}", f"output_dir={workdir}"]  # later wins
    cmd = [sys.executable, "-m", "rlhf_engine.cli", "train", recipe, *[f"--set={s}" for s in sets]]
    t = time.perf_counter()
    log = workdir / f"{name}.log"
    with open(log, "w") as fh:
        code = subprocess.call(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONSAFEPATH": "1"})
    wall = time.perf_counter() - t
    if code != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        return {"variant": variant, "seed": seed, "error": f"exit code {code}; see {log}", "log_tail": tail}
    run_dir = workdir / name
    metrics, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    if not metrics:
        return {"variant": variant, "seed": seed, "error": f"the run logged no metrics in {run_dir}", "log_tail": []}
    curve = [round(r["score/mean"], 4) for r in metrics]  # one entry per logged step (logging.log_every)
    q = max(1, len(curve) // 4)
    return {"variant": variant, "seed": seed, "steps": [r["step"] for r in metrics], "wall_s": round(wall, 1),
            "eval_before": evals[0]["score/mean"] if evals else None,
            "eval_after": evals[-1]["score/mean"] if evals else None,
            "train_score_curve": curve,
            "eval_steps": [r["step"] for r in evals], "eval_curve": [round(r["score/mean"], 4) for r in evals],
            "train_score_first_quarter": round(statistics.mean(curve[:q]), 4),
            "train_score_last_quarter": round(statistics.mean(curve[-q:]), 4),
            "kl_last": metrics[-1].get("kl/mean"),
            # the first step includes warm-up (allocation, packing): left out when there are others
            "step_s_median": round(statistics.median(r["time/step"] for r in metrics[1:] or metrics), 3)}


def summarize(runs: list[dict]) -> dict:
    """Per variant: means over seeds (and min/max of the eval reward after training)."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        ok = [r for r in runs if r["variant"] == variant and "error" not in r]
        if not ok:
            out[variant] = {"error": "every run failed"}
            continue
        mean = lambda key: (round(statistics.mean(r[key] for r in ok), 4)  # noqa: E731
                            if all(r[key] is not None for r in ok) else None)
        n = min(len(r["train_score_curve"]) for r in ok)
        out[variant] = {
            "seeds": [r["seed"] for r in ok], "eval_before": mean("eval_before"), "eval_after": mean("eval_after"),
            "eval_after_range": ([min(r["eval_after"] for r in ok), max(r["eval_after"] for r in ok)]
                                 if all(r["eval_after"] is not None for r in ok) else None),
            "train_score_first_quarter": mean("train_score_first_quarter"),
            "train_score_last_quarter": mean("train_score_last_quarter"),
            "train_score_curve_mean": [round(statistics.mean(r["train_score_curve"][i] for r in ok), 4)
                                       for i in range(n)],
            "kl_last": mean("kl_last"), "step_s_median": mean("step_s_median")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="the YAML recipe every variant starts from")
    ap.add_argument("--variant", type=parse_variant, action="append", required=True,
                    help="NAME:KEY=VALUE[,KEY=VALUE...] (repeat; 'NAME:' runs the recipe unchanged)")
    ap.add_argument("--seeds", default="7", help="comma list of seeds, each variant runs once per seed")
    ap.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                    help="override applied to every variant (e.g. train.steps=10)")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "compare")
    ap.add_argument("--plot", type=Path, default=None, metavar="PNG",
                    help="also draw the eval and training reward curves (mean over seeds, min-max band) here")
    args = ap.parse_args()
    names = [v[0] for v in args.variant]
    if len(set(names)) != len(names):
        ap.error(f"--variant names must differ, got {names}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        ap.error(f"--seeds {args.seeds!r}: expected a comma list of integers, e.g. 7,8")
    try:
        check_not_reserved(args.common, "--set")
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if not Path(args.recipe).is_file():
        ap.error(f"recipe {args.recipe} not found")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    recipe = str(Path(args.recipe).resolve())

    runs, total, t0 = [], len(names) * len(seeds), time.perf_counter()
    for seed in seeds:  # seed-major: a partial comparison still has every variant
        for name, overrides in args.variant:
            done = len(runs)
            eta = (time.perf_counter() - t0) / done * (total - done) if done else float("nan")
            print(f"[compare] run {done + 1}/{total}: {name} seed {seed} (ETA {eta / 60:.0f} min)",
                  file=sys.stderr, flush=True)
            runs.append(run_one(recipe, name, overrides, seed, args.workdir, args.common))
            print("RUN_JSON " + json.dumps(runs[-1]), flush=True)
    summary = summarize(runs)
    print("COMPARE_JSON " + json.dumps({"recipe": args.recipe, "common": args.common,
                                        "variants": {n: o for n, o in args.variant}, "summary": summary}),
          flush=True)
    print(f"\n{'variant':16s} {'eval before':>11s} {'eval after':>10s} {'(range)':>17s} {'train 1st q':>11s} "
          f"{'train last q':>12s} {'KL':>6s} {'s/step':>7s}")
    fmt = lambda v, w: f"{v:{w}.3f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"  # noqa: E731
    for name, s in summary.items():
        if "error" in s:
            print(f"{name:16s} {s['error']}")
            continue
        rng = f"[{s['eval_after_range'][0]:.2f}, {s['eval_after_range'][1]:.2f}]" if s["eval_after_range"] else "-"
        print(f"{name:16s} {fmt(s['eval_before'], 11)} {fmt(s['eval_after'], 10)} {rng:>17s} "
              f"{fmt(s['train_score_first_quarter'], 11)} {fmt(s['train_score_last_quarter'], 12)} "
              f"{fmt(s['kl_last'], 6)} {fmt(s['step_s_median'], 7)}")
    if args.plot:
        plot(runs, args.plot, title=Path(args.recipe).name)
        print(f"plot: {args.plot}")
    return 0 if all("error" not in r for r in runs) else 1


def plot(runs: list[dict], out: Path, title: str) -> None:
    """Two panels, one line per variant: eval reward at each evaluation and training reward per step, the mean
    over seeds with the seeds' min-max as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant in dict.fromkeys(r["variant"] for r in runs):
        ok = [r for r in runs if r["variant"] == variant and "error" not in r]
        if not ok:
            continue
        for ax, xs_key, ys_key in ((axes[0], "eval_steps", "eval_curve"), (axes[1], "steps", "train_score_curve")):
            n = min(len(r[ys_key]) for r in ok)
            if n == 0:
                continue
            xs = ok[0][xs_key][:n]
            cols = [[r[ys_key][i] for r in ok] for i in range(n)]
            line, = ax.plot(xs, [statistics.mean(c) for c in cols], label=f"{variant} ({len(ok)} seeds)")
            if len(ok) > 1:
                ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2,
                                color=line.get_color())
    axes[0].set(title="eval reward (held-out prompts)", xlabel="step", ylabel="mean score")
    axes[1].set(title="training reward (rollouts)", xlabel="step", ylabel="mean score")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
