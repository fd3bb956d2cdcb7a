"""`rlhf-engine` command line: train, validate, plan, export, report, presets, serve-reward.

Thin on purpose: every command parses a recipe (or a run folder) and calls one library function.
Settings live in the recipe, not in flags: `--set a.b.c=value` overrides any recipe key.
"""
from __future__ import annotations

import argparse
import contextlib
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


def _add_model_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", action="append", default=[], metavar="NAME=SOURCE",
                   help="plan a model path that does not exist yet (e.g. a reward model still to be trained) with the "
                        "config of SOURCE (hub id, folder or config.json); repeatable")


def cmd_validate(args) -> int:
    """Check each recipe; every error is printed (naming its file) before exiting 2, so one call checks a tree."""
    failed = 0
    for path in args.recipes:
        try:
            _validate_one(path, args)
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    if failed and len(args.recipes) > 1:
        print(f"error: {failed} of {len(args.recipes)} recipes failed validation", file=sys.stderr)
    return 2 if failed else 0


def _validate_one(path: str, args) -> None:
    from rlhf_engine.inputs import check_inputs
    from rlhf_engine.pipeline import is_pipeline, load_pipeline

    if len(args.recipes) > 1:
        print(f"# ---- {path}")
    if is_pipeline(path):
        spec, stages = load_pipeline(path, args.overrides)
        for stage_path, _, recipe in stages:
            print(f"# stage {recipe.stage}: {stage_path}\n{recipe_to_yaml(recipe)}", end="")
        return
    recipe = load_recipe(path, args.overrides)
    check_inputs(recipe, outputs_later=True)  # data files, models and the reward function exist
    if args.world_size:
        sizes = derive_batch_sizes(recipe, args.world_size)
        print(f"# derived batch sizes for {args.world_size} rank(s): {sizes.model_dump()}")
    print(recipe_to_yaml(recipe), end="")


def cmd_presets(args) -> int:
    from rlhf_engine.models import list_presets

    for name, desc in list_presets():
        print(f"{name:24s} {desc}")
    return 0


def _aliases(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise RecipeError(f"--model-config {item!r}: expected NAME_OR_PATH=HUB_ID_FOLDER_OR_CONFIG_JSON")
        out[name] = source
    return out


def cmd_plan(args) -> int:
    import json

    from rlhf_engine.plan import plan_recipe, render

    recipe = load_recipe(args.recipe, args.overrides)
    with contextlib.redirect_stdout(sys.stderr):  # library chatter (DeepSpeed's accelerator line) off the JSON
        plan = plan_recipe(recipe, args.gpus_per_node, args.nodes, args.gpu_memory, args.host_memory,
                           _aliases(args.model_config), name=args.recipe)
    print(json.dumps(plan.to_json(), indent=1) if args.json else render(plan))
    return 0


def _memory_check(args, recipe, gpu_gib=None) -> int:
    """On a GPU (or for ``gpu_gib``): plan the run for this device first; 2 when it does not fit, else 0."""
    import torch

    from rlhf_engine.plan import GIB, plan_recipe, render

    if gpu_gib is None and torch.cuda.is_available():
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    if args.no_memory_check or gpu_gib is None:
        return 0
    try:
        plan = plan_recipe(recipe, args.nproc, args.nodes, gpu_gib, aliases=_aliases(args.model_config))
    except RecipeError as e:
        print(f"[plan] memory check skipped: {e}", file=sys.stderr)
        return 0
    if plan.fits:
        return 0
    print(render(plan), file=sys.stderr)
    print(f"error: the plan needs {plan.peak_bytes / GIB:.1f} GiB per GPU in phase '{plan.peak_phase}', this GPU has "
          f"{gpu_gib:.1f} GiB; apply one of the changes above, or pass --no-memory-check to start anyway",
          file=sys.stderr)
    return 2


def cmd_train(args) -> int:
    from rlhf_engine.pipeline import is_pipeline, run_pipeline

    if is_pipeline(args.recipe) and args.dry_run:
        raise RecipeError(f"{args.recipe} is a pipeline: --dry-run takes one stage's recipe (later stages read "
                          "models the earlier ones have not written yet)")
    if is_pipeline(args.recipe):
        return run_pipeline(args.recipe, args.overrides, nproc=args.nproc)
    recipe = load_recipe(args.recipe, args.overrides)  # fail fast, before any launcher starts
    if args.dry_run:
        from rlhf_engine.dryrun import dry_run, render_dry_run

        print(render_dry_run(dry_run(recipe, args.nproc, args.nodes, args.gpu_memory, _aliases(args.model_config))))
        return 0
    if _memory_check(args, recipe):
        return 2
    if args.nproc > 1:
        from rlhf_engine.inputs import check_inputs, check_output_dir

        check_output_dir(recipe)
        check_inputs(recipe)
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
                     overwrite=args.overwrite, ema=args.ema)
    print(f"exported {out}")
    if args.push_to_hub:
        print(f"pushed {out} -> {push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision)}")
    return 0


def load_reward_section(path: str, overrides: list[str]):
    """The reward(s) of a recipe, or of a YAML file holding only a `reward:` section -> (configs, cache_dir)."""
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from rlhf_engine.config import RewardConfig, apply_overrides

    if not Path(path).is_file():
        raise RecipeError(f"reward config file not found: {path}")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(data, dict) and "stage" in data:
        recipe = load_recipe(path, overrides)
        if not recipe.reward_configs():
            raise RecipeError(f"{path}: the recipe has no reward section to serve")
        return recipe.reward_configs(), recipe.cache_dir
    if not (isinstance(data, dict) and set(data) <= {"reward", "cache_dir"} and "reward" in data):
        raise RecipeError(f"{path}: expected a recipe or a file with a top-level `reward:` section (one reward or a list)")
    apply_overrides(data, overrides)
    try:
        section = TypeAdapter(RewardConfig | list[RewardConfig]).validate_python(data["reward"])
    except ValidationError as e:
        raise RecipeError(f"{path}: bad reward section:\n{e}") from None
    return (section if isinstance(section, list) else [section]), data.get("cache_dir")


def cmd_serve_reward(args) -> int:
    from rlhf_engine.remote_reward import make_server
    from rlhf_engine.reward_set import build_reward_set

    configs, cache_dir = load_reward_section(args.config, args.overrides)
    reward = build_reward_set(configs, cache_dir=cache_dir)
    server = make_server(reward, args.host, args.port)
    names = ", ".join(f"{c.label} (x{c.weight:g})" for c in configs)
    print(f"[serve-reward] {names} on http://{args.host}:{server.server_address[1]}/ (OpenRLHF protocol)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
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
    p.add_argument("--dry-run", action="store_true",
                   help="resolve, build the models on the meta device, derive sizes and DeepSpeed configs, check the "
                        "data, print the memory plan, and stop")
    p.add_argument("--nodes", type=int, default=1, help="nodes the run spans (--dry-run and the memory check)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="--dry-run: GPU memory to plan for")
    p.add_argument("--no-memory-check", action="store_true",
                   help="on a GPU, start even when the memory plan says the run does not fit")
    _add_model_config_arg(p)
    p.add_argument("--verbose", action="store_true",
                   help="keep the libraries' progress bars and warnings (default: one line per model)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("plan", help="per-rank peak memory by phase and component, and what makes it fit")
    _add_recipe_args(p)
    p.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="memory per GPU: say if it fits")
    p.add_argument("--host-memory", type=float, default=None, metavar="GIB", help="CPU memory per node (offload)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_model_config_arg(p)
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("validate", help="check recipes and print them resolved (exit code 2 on errors)")
    p.add_argument("recipes", nargs="+", metavar="recipe", help="YAML recipe(s) (see recipes/); each is checked")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key in every recipe, e.g. --set train.steps=10 (repeatable)")
    p.add_argument("--world-size", type=int, default=0, help="also check batch sizes divide for this many ranks")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("export", help="write a Hugging Face model folder from a run's checkpoint (and push it)")
    p.add_argument("run_dir", help="run folder (<output_dir>/<name>) holding checkpoints/")
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty; see --overwrite)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--which", default=None, help="engine: actor (default), critic, model, or reward (a reward run)")
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--ema", action="store_true", help="export the actor's moving average (runs with ppo.ema_decay)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this hub repo")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p.add_argument("--revision", default=None, help="hub branch to push to (created if missing)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("serve-reward", help="serve a recipe's reward(s) over HTTP (OpenRLHF's remote reward protocol)")
    p.add_argument("config", help="a recipe, or a YAML file with only a `reward:` section (one reward or a list)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set reward.scale=2 (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=5000, help="port (0 picks a free one)")
    p.set_defaults(fn=cmd_serve_reward)

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
