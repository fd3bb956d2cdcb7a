"""Per-rank entry point: what each process started by the deepspeed launcher runs.

`deepspeed --num_gpus N launch/train.py RECIPE [--set KEY=VALUE ...]` (launch/train.py calls `main`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys

from rlhf_engine.config import Recipe, RecipeError, load_recipe


def run(recipe: Recipe, resume: str | None = None, *, process_start: bool = False, verbose: bool = False) -> dict:
    """Run the recipe's stage on this rank; the main rank prints the summary.

    ``process_start``: called from a process entry (CLI, launcher), so the CPU backend may re-execute
    the process to get its allocator and huge pages (see rlhf_engine.backends.cpu). ``verbose``: keep
    the libraries' progress bars and warnings (otherwise one line per model, rlhf_engine.console)."""
    from rlhf_engine.backends import on_cpu

    run_info: dict = {}
    if on_cpu():  # CPU tuning, once per run; never on GPU
        from rlhf_engine.backends import cpu

        run_info["cpu"] = cpu.start_run(recipe.cpu, process_start=process_start)  # may re-exec: first
    if not verbose:
        from rlhf_engine.console import quiet_libraries

        quiet_libraries()
    from rlhf_engine.distributed import init_distributed
    from rlhf_engine.inputs import check_inputs, check_output_dir
    from rlhf_engine.precision import resolve_precision

    check_output_dir(recipe)
    check_inputs(recipe)
    from rlhf_engine.models import import_model_classes

    import_model_classes([recipe.model, *([recipe.reference] if recipe.reference else []),
                          *(r.model for r in recipe.reward_configs() if r.model is not None)], recipe.cache_dir)
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        dist = init_distributed(recipe.num_threads)  # DeepSpeed prints a line when it loads its CPU comm op
    run_info["precision"] = resolve_precision(recipe, dist.is_main)
    if recipe.stage == "rl":
        from rlhf_engine.trainer import train_rl

        summary = train_rl(recipe, dist, resume=resume)
    elif recipe.stage == "sft":
        from rlhf_engine.sft import train_sft

        summary = train_sft(recipe, dist, resume=resume)
    elif recipe.stage == "reward":
        from rlhf_engine.reward_model import train_reward_model

        summary = train_reward_model(recipe, dist, resume=resume)
    elif recipe.stage == "dpo":
        from rlhf_engine.dpo import train_dpo

        summary = train_dpo(recipe, dist, resume=resume)
    else:
        raise RecipeError(f"stage '{recipe.stage}' is not available yet in this build; use stage: rl")
    summary.update(run_info)
    if dist.is_main:
        _write_run_info(summary, run_info)
        print_summary(summary)
        print("SUMMARY_JSON " + json.dumps(summary, default=str), flush=True)
    _shutdown_process_group()
    return summary


def _write_run_info(summary: dict, run_info: dict) -> None:
    """run.json in the run folder (the precision chosen and the probe's numbers, the CPU settings, the
    summary numbers), then report.md from the folder's files (rlhf_engine.report)."""
    from pathlib import Path

    from rlhf_engine.report import write_report

    run_dir = Path(summary.get("run_dir") or "")
    if not summary.get("run_dir") or not run_dir.is_dir():
        return
    numbers = {k: v for k, v in summary.items() if not k.startswith("samples_") and k not in run_info}
    (run_dir / "run.json").write_text(json.dumps({**run_info, "summary": numbers}, indent=1, default=str) + "\n")
    if (run_dir / "metrics.jsonl").exists():
        summary["report"] = str(write_report([run_dir]))


def _shutdown_process_group() -> None:
    """Tear the process group down before interpreter exit. Left to static destructors, the gloo
    threads were once seen to abort a finished rank ("terminate called without an active exception",
    exit code -6, 1 of ~8 two-rank runs), which fails the launcher although the run was complete."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def print_summary(s: dict) -> None:
    """Human summary at the end of a run: scores before/after, KL, samples, where things are."""
    line = "=" * 78
    print(f"\n{line}\nrun finished: {s.get('steps')} steps in {s.get('train_seconds', 0):.0f} s")
    if isinstance(s.get("score_before"), float) and math.isfinite(s["score_before"]):  # NaN: evaluation off
        print(f"mean reward (eval prompts): before {s['score_before']:+.4f}  ->  after {s['score_after']:+.4f}")
        print(f"KL(actor || reference) per response after training: {s['kl_after']:.4f}")
    if s.get("eval_after"):  # supervised stages: eval metrics before -> after
        print(f"eval on {s.get('eval_rows')} {s.get('eval_on')}:")
        for key, after in s["eval_after"].items():
            print(f"  {key:12s} before {s['eval_before'].get(key, float('nan')):.4f}  ->  after {after:.4f}")
    for tag in ("before", "after"):
        for prompt, resp, score in s.get(f"samples_{tag}", [])[:2]:
            print(f"  [{tag}] {str(prompt).strip()[:70]!r}\n      -> {resp.strip()[:160]!r}  (score {score:+.3f})")
    p = s.get("precision") or {}
    if p.get("probe"):
        print(f"precision: {p['precision']} (auto; probe fp32 {p['probe']['fp32_ms']:.1f} ms vs bf16 "
              f"{p['probe']['bf16_ms']:.1f} ms at {p['probe']['shape']})")
    print(f"run folder: {s.get('run_dir')}")
    if s.get("final_dir"):
        print(f"trained model (Hugging Face folder): {s['final_dir']}")
    if s.get("report"):
        print(f"report: {s['report']}")
    if s.get("plots"):
        print(f"plots: {', '.join(s['plots'])}")
    print(line, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="per-rank training entry (run by the deepspeed launcher)")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint folder")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--verbose", action="store_true", help="keep library progress bars and warnings")
    args = parser.parse_args(argv)
    try:
        run(load_recipe(args.recipe, args.overrides), resume=args.resume, process_start=argv is None,
            verbose=args.verbose)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
