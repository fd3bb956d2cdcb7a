"""`rlhf-engine` command line: train, validate, export, report, presets.

Thin on purpose: every command parses a recipe (or a run folder) and calls one library function.
Settings live in the recipe, not in flags: `--set a.b.c=value` overrides any recipe key.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from rlhf_engine.config import RecipeError, derive_batch_sizes, load_recipe, recipe_to_yaml

WORKER = Path(__file__).with_name("worker.py")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.steps=10 (repeatable)")


def cmd_validate(args) -> int:
    from rlhf_engine.pipeline import is_pipeline, load_pipeline

    if is_pipeline(args.recipe):
        spec, stages = load_pipeline(args.recipe, args.overrides)
        for path, _, recipe in stages:
            print(f"# stage {recipe.stage}: {path}\n{recipe_to_yaml(recipe)}", end="")
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.world_size:
        sizes = derive_batch_sizes(recipe, args.world_size)
        print(f"# derived batch sizes for {args.world_size} rank(s): {sizes.model_dump()}")
    print(recipe_to_yaml(recipe), end="")
    return 0


def cmd_presets(args) -> int:
    from rlhf_engine.models import list_presets

    for name, desc in list_presets():
        print(f"{name:24s} {desc}")
    return 0


def cmd_train(args) -> int:
    from rlhf_engine.pipeline import is_pipeline, run_pipeline

    if is_pipeline(args.recipe):
        return run_pipeline(args.recipe, args.overrides, nproc=args.nproc)
    recipe = load_recipe(args.recipe, args.overrides)  # fail fast, before any launcher starts
    if args.nproc > 1:
        derive_batch_sizes(recipe, args.nproc)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc), str(WORKER),
               args.recipe, *[f"--set={o}" for o in args.overrides],
               *([f"--resume={args.resume}"] if args.resume else []), *(["--verbose"] if args.verbose else [])]
        print("[launch] " + " ".join(cmd), file=sys.stderr, flush=True)
        return subprocess.call(cmd)
    from rlhf_engine.worker import run

    run(recipe, resume=args.resume, process_start=args.process_start, verbose=args.verbose)
    return 0


def cmd_export(args) -> int:
    from rlhf_engine.checkpoint import export_run, hub_preflight, push_to_hub

    if args.push_to_hub:
        hub_preflight(args.push_to_hub)  # token and endpoint first: fail before any export work
    out = export_run(args.run_dir, args.out, step=args.step, which=args.which, merge_lora=args.merge_lora,
                     overwrite=args.overwrite)
    print(f"exported {out}")
    if args.push_to_hub:
        print(f"pushed {out} -> {push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision)}")
    return 0


def cmd_report(args) -> int:
    from rlhf_engine.report import write_report

    print(f"report: {write_report(args.runs, args.out)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe (SFT, reward model or RL)")
    _add_recipe_args(p)
    p.add_argument("--nproc", type=int, default=1, help="ranks on this machine (>1 starts the deepspeed launcher)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest checkpoint of the run folder (auto) or from PATH")
    p.add_argument("--verbose", action="store_true",
                   help="keep the libraries' progress bars and warnings (default: one line per model)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("validate", help="check a recipe and print it resolved (exit code 2 on errors)")
    _add_recipe_args(p)
    p.add_argument("--world-size", type=int, default=0, help="also check batch sizes divide for this many ranks")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("export", help="write a Hugging Face model folder from a run's checkpoint (and push it)")
    p.add_argument("run_dir", help="run folder (<output_dir>/<name>) holding checkpoints/")
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty; see --overwrite)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--which", default=None, help="engine: actor (default), critic, model, or reward (a reward run)")
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this hub repo")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p.add_argument("--revision", default=None, help="hub branch to push to (created if missing)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("report", help="rebuild a run's report.md (several runs: one overlaid figure)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) (<output_dir>/<name>)")
    p.add_argument("--out", default=None, help="folder for report.md and report.png (default: the run's folder; "
                   "several runs: <first run's parent>/compare)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("presets", help="list the named model presets")
    p.set_defaults(fn=cmd_presets)

    args = parser.parse_args(argv)
    args.process_start = argv is None  # a real process start (not a library call): the CPU backend may re-exec
    try:
        return args.fn(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
