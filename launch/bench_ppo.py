"""PPO throughput benchmark on TRL's peer workload, optionally side by side with TRL itself.

    python launch/bench_ppo.py                       # our engine: TRL-equal config + recommended config
    python launch/bench_ppo.py --with-trl            # ... and TRL's PPOTrainer in the same invocation
    python launch/bench_ppo.py --with-trl --trl-tcmalloc  # ... TRL also on tcmalloc (like for like)
    python launch/bench_ppo.py --zero3               # ... and 2 ranks, ZeRO-3 + hybrid engine
    python launch/bench_ppo.py --batch-size 4 --response-length 64 --configs recommended
    python launch/bench_ppo.py --with-trl --batch-size 16 --response-length 64 --mini-batches 2  # TRL gets the same

Workload (../shared/peers/trl_ppo/README.md): SmolLM2-135M-Instruct as policy, reference, critic
(value head, trained) and reward model (scalar head on the same weights, frozen); prompts
"Write one sentence about {topic}." over 16 topics, chat template with the default system prompt;
batch 8, exactly 32 sampled tokens (temperature 1), 1 PPO epoch x 1 mini-batch, AdamW lr 3e-6,
KL 0.05 (k1), clip 0.2, value clip 0.2, gamma 1, lam 0.95; 8 steps, the first one a warm-up.

Each configuration runs as its own `rlhf-engine train` process under `/usr/bin/time -v` (peak RSS),
on tcmalloc when installed, as every CPU training run (recipe key cpu.allocator; a config entry
'trl_equal:cpu.allocator=system' runs on glibc malloc; the JSON records which);
step and phase times come from its metrics.jsonl. The compute floor is the workload's model FLOPs
(counted from the model config) over the matmul rate measured in this run. Prints one JSON line per
configuration, then a summary JSON line (`BENCH_JSON {...}`) and a short table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRL_DIR = REPO.parent / "shared" / "peers" / "trl_ppo"
TOPICS = ["the ocean", "mountains", "coffee", "the moon", "autumn", "robots", "music", "friendship", "the city",
          "rain", "books", "gardens", "the desert", "trains", "winter", "honey bees"]


def base_recipe(args, prompts: Path, name: str) -> dict:
    """The TRL workload as one of our recipes (float32, separate full-size critic, full fine-tuning)."""
    b, mini = args.batch_size, args.batch_size // args.mini_batches
    return {
        "name": name, "stage": "rl", "seed": 42, "output_dir": str(args.workdir / "runs"),
        "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "fp32"},
        "reward": {"type": "model", "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "fp32"}},
        "data": {"path": str(prompts), "max_prompt_length": 128, "eval_size": 0},
        "deepspeed": {"zero_stage": 0, "precision": "fp32", "gradient_clipping": 0.0},
        "optim": {"lr": 3e-6, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "scheduler": "linear"},
        # scoring forwards over the whole rollout batch: TRL's local_rollout_forward_batch_size
        "train": {"steps": args.steps, "rollout_batch_size": b, "mini_batch_size": mini,
                  "micro_batch_size": mini, "scoring_batch_size": b, "eval_size": 0},
        "generation": {"max_new_tokens": args.response_length, "ignore_eos": True, "temperature": args.temperature,
                       "top_k": 0, "top_p": 1.0},
        "ppo": {"kl_coef": 0.05, "kl_estimator": "k1", "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
                "gamma": 1.0, "lam": 0.95, "whiten_advantages": True},
        "critic": {"init_from": "actor"},
        "logging": {"plots": False, "num_samples": 2},
        "checkpoint": {"save_final": False},
    }


CONFIGS = {
    # same configuration as TRL: float32 everywhere
    "trl_equal": lambda r: r,
    # recommended on CPU: fp32 weights/optimizer with bf16 matmuls (autocast), eager attention
    # (SDPA's CPU backward is slow for short bf16 sequences, and its decode step is ~10% slower),
    # frozen models stored in bf16
    "recommended": lambda r: _merge(r, {"deepspeed": {"precision": "bf16_autocast"},
                                        "model": {"attn_implementation": "eager"},
                                        "reference": {"name_or_path": "smollm2-135m-instruct", "dtype": "bf16"},
                                        "reward": {"model": {"dtype": "bf16"}}}),
    # recommended + off-policy correction: old log-probs still recomputed by a training forward,
    # weighted by truncated importance sampling against the generation's log-probs (TRL's and veRL's TIS)
    "recommended_tis": lambda r: _merge(CONFIGS["recommended"](r), {"ppo": {"rollout_correction": "tis",
                                                                            "rollout_is_cap": 2.0}}),
    # recommended with the old log-probs taken from generation: no actor scoring pass at all
    "recommended_generation_logprobs": lambda r: _merge(CONFIGS["recommended"](r),
                                                        {"ppo": {"old_logprobs": "generation"}}),
}


def _merge(a: dict, b: dict) -> dict:
    out = json.loads(json.dumps(a))
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def write_prompts(path: Path, n: int = 64) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}) + "\n")
    return path


def parse_config(entry: str, ap: argparse.ArgumentParser) -> tuple[str, list[str]]:
    """'NAME[:KEY=VALUE;KEY=VALUE]' -> (NAME, overrides passed to `rlhf-engine train --set`)."""
    name, _, rest = entry.partition(":")
    overrides = [kv.strip() for kv in rest.split(";") if kv.strip()]
    if name not in CONFIGS:
        ap.error(f"--configs: unknown config '{name}' in '{entry}'; expected one of {', '.join(CONFIGS)}")
    bad = [kv for kv in overrides if "=" not in kv]
    if bad:
        ap.error(f"--configs: override '{bad[0]}' in '{entry}' is not KEY=VALUE (e.g. cpu.onednn_linear=false)")
    return name, overrides


def run_config(args, name: str, recipe: dict, nproc: int = 1, overrides: tuple = ()) -> dict:
    """Train one configuration (`recipe` + `rlhf-engine train --set` overrides) in a fresh process;
    return step/phase times, peak RSS and the training precision."""
    path = args.workdir / f"{recipe['name']}.yaml"
    path.write_text("# benchmark recipe (generated by launch/bench_ppo.py)\n" + yaml.safe_dump(recipe))
    timefile = args.workdir / f"{recipe['name']}.time"
    precision = dict(kv.split("=", 1) for kv in overrides).get("deepspeed.precision", recipe["deepspeed"]["precision"])
    cmd = ["/usr/bin/time", "-v", "-o", str(timefile), sys.executable, "-m", "rlhf_engine.cli", "train", str(path),
           "--nproc", str(nproc), *(x for kv in overrides for x in ("--set", kv))]
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:  # report it and go on with the other configurations
        print(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}", file=sys.stderr, flush=True)
        return {"config": name, "nproc": nproc, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"],
                "step_s_median": float("nan"), "phases_median_s": {}, "peak_rss_mib": None, "precision": precision}
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / recipe["name"] / "metrics.jsonl").open()]
    timed = rows[args.warmup:]
    med = lambda key: round(statistics.median(r.get(key) or 0.0 for r in timed), 4)  # noqa: E731
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timefile.read_text())
    step_s = med("time/step")
    allocator = re.search(r"\[cpu\] allocator: (\w+)", proc.stderr)
    phases = {k.split("/", 1)[1]: med(k) for k in rows[-1] if k.startswith("time/") and k != "time/step"}
    return {"config": name, "nproc": nproc, "step_s_median": step_s, "step_s_all": [r["time/step"] for r in timed],
            "warmup_step_s": rows[0]["time/step"], "phases_median_s": phases,
            "gen_tokens_per_s": round(args.batch_size * args.response_length / step_s, 2),
            "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "peak_rss_note": "largest single process (per rank when nproc > 1)",
            "allocator": allocator.group(1) if allocator else "unknown",
            "wall_s": round(wall, 1), "score_first": rows[0]["score/mean"], "score_last": rows[-1]["score/mean"],
            # train-inference mismatch of the generation's log-probs (NeMo-RL's check: exp_abs_mean <= 1.05)
            "mismatch": {k.split("/", 1)[1]: round(statistics.mean(r[k] for r in timed), 5)
                         for k in rows[-1] if k.startswith("mismatch/")},
            "precision": precision}


def model_flops(batch: int, prompt_len: int, resp_len: int) -> float:
    """Model FLOPs of one step of the workload as TRL runs it (independent of our shortcuts).

    2 x params per token per forward (plus attention), backward = 2 x forward: generation (prompt +
    response tokens, LM head), reference forward (LM head), value and reward forwards (no LM head),
    policy and value forward + backward.
    """
    from transformers import AutoConfig

    from rlhf_engine.config import ModelConfig
    from rlhf_engine.models import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct")).path)
    h, layers, v, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * (h * h * 2 + h * kv * 2 + 3 * h * inter)  # q,o + k,v + MLP
    seq = prompt_len + resp_len
    attn = 2 * 2 * layers * h * seq / 2  # scores + weighted sum, causal average context seq/2
    body = layers * per_layer + attn
    head = 2 * h * v
    tokens = batch * seq
    gen = tokens * (body + head)
    ref = tokens * (body + head)
    value_reward = 2 * tokens * body
    train = 3 * tokens * (body + head) + 3 * tokens * body
    return float(gen + ref + value_reward + train)


def matmul_rates(dtype_name: str, m: int = 2048, k: int = 2048, n: int = 2048, reps: int = 5) -> dict:
    """FLOP/s of one [m, k] @ [k, n] matmul (best of `reps`) on 2 threads, per kernel: torch's own
    (`a @ b`: MKL for float32, oneDNN for bf16) and oneDNN's inner product (what backends/cpu/onednn.py
    runs float32 linears on). The floor uses the faster: the best this box can do."""
    import torch

    from rlhf_engine.backends.cpu import onednn

    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    kernels = {"torch_matmul": lambda: a @ b}
    if onednn.AVAILABLE:
        bt = b.t().contiguous()
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    rates = {}
    for name, fn in kernels.items():
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rates[name] = 2 * m * k * n / min(times)
    return rates


def matmul_rate(dtype_name: str, m: int = 2048, k: int = 2048, n: int = 2048, reps: int = 5) -> float:
    """The best FLOP/s over `matmul_rates`' kernels."""
    return max(matmul_rates(dtype_name, m, k, n, reps).values())


def model_shape_rate(dtype_name: str, batch: int, seq: int) -> float:
    """FLOP/s at the workload's own dominant shape (tokens x hidden @ hidden x MLP width): large square
    matmuls overstate what a 576-wide model can reach, most of all with AMX, so this gives a second floor."""
    from transformers import AutoConfig

    from rlhf_engine.config import ModelConfig
    from rlhf_engine.models import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct")).path)
    return matmul_rate(dtype_name, batch * seq, cfg.hidden_size, cfg.intermediate_size, reps=20)


def run_trl(args, tcmalloc: bool = False) -> dict:
    """TRL's PPOTrainer on the same workload, via the peer harness (its own venv).

    tcmalloc=True preloads the allocator our training processes use, for a like-for-like comparison.
    """
    extra = (f"--batch-size {args.batch_size} --response-length {args.response_length} "
             f"--mini-batches {args.mini_batches} --temperature {args.temperature} "
             f"--warmup-steps {args.warmup} --timed-steps {args.steps - args.warmup} --skip-baselines")
    env = {**os.environ, "RUNS": "1", "EXTRA_ARGS": extra,
           "OUTDIR": str(args.workdir / ("trl_tcmalloc" if tcmalloc else "trl"))}
    if tcmalloc:
        from rlhf_engine.backends.cpu.process import find_tcmalloc
        lib = find_tcmalloc()
        if lib is None:
            raise SystemExit("--trl-tcmalloc: libtcmalloc_minimal.so.4 not found (make install adds it)")
        env["LD_PRELOAD"] = lib
    proc = subprocess.run(["bash", str(TRL_DIR / "run.sh")], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"TRL harness failed:\n{proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    run = summary["runs"][0]
    return {"config": "trl_tcmalloc" if tcmalloc else "trl",
            "step_s_median": run["step_s_median"], "step_s_all": run["step_s_all"],
            "phases_median_s": run["breakdown_grouped_median_s"], "peak_rss_mib": run["peak_rss_mib_time_v"],
            "versions": {k: summary["versions"].get(k) for k in ("trl", "transformers", "torch")}}


def print_table(rows: list[dict]) -> None:
    """The short human-readable table after the JSON ("-" where a row has no such ratio)."""
    print(f"\n{'config':40s} {'s/step':>8s} {'vs TRL':>7s} {'/floor':>7s} {'RSS MiB':>8s} {'RSS/TRL':>7s} "
          f"{'mismatch':>8s}  phases (s)")
    for r in rows:
        ph = " ".join(f"{k}={v:.2f}" for k, v in r["phases_median_s"].items() if not k.startswith("hybrid"))
        vs_trl, floor, rss_ratio = (f"{r[k]:7.2f}" if k in r else f"{'-':>7s}"
                                    for k in ("speedup_vs_trl", "over_floor", "rss_vs_trl"))
        mismatch = (r.get("mismatch") or {}).get("exp_abs_mean")  # mean exp|logp_train - logp_inference|
        mm = f"{mismatch:8.4f}" if mismatch is not None else f"{'-':>8s}"
        print(f"{r['config']:40s} {r['step_s_median']:8.2f} {vs_trl} {floor} {r['peak_rss_mib'] or 0:8.0f} "
              f"{rss_ratio} {mm}  {ph[:90]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="trl_equal,recommended",
                    help=f"comma list of {', '.join(CONFIGS)}; a config may carry recipe overrides after a colon, "
                    "';'-separated: 'trl_equal:cpu.onednn_linear=false' (an A/B in one invocation)")
    ap.add_argument("--with-trl", action="store_true", help="also run TRL's PPO (../shared/peers/trl_ppo)")
    ap.add_argument("--trl-tcmalloc", action="store_true",
                    help="with --with-trl: run TRL a second time on tcmalloc (our allocator); ratios use both")
    ap.add_argument("--zero3", action="store_true", help="also run 2 ranks, ZeRO-3 + hybrid (recommended config)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--mini-batches", type=int, default=1, help="PPO mini-batches per rollout batch (TRL's too)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.mini_batches < 1 or args.batch_size % args.mini_batches:
        ap.error(f"--batch-size {args.batch_size} does not split into --mini-batches {args.mini_batches} equal parts")
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup {args.warmup} must leave at least one timed step of --steps {args.steps}")
    if args.zero3 and (args.batch_size // args.mini_batches) % 2:
        ap.error("--zero3 splits each mini-batch over 2 ranks: batch size / mini-batches must be even")
    configs = [parse_config(entry, ap) for entry in args.configs.split(",")]
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ppo_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(args.workdir / "prompts.jsonl")

    results = []
    for name, overrides in configs:
        label = name + (":" + ";".join(overrides) if overrides else "")
        run_name = re.sub(r"[^\w.-]+", "_", label)  # its own run folder and files, overrides and all
        results.append(run_config(args, label, CONFIGS[name](base_recipe(args, prompts, run_name)),
                                  overrides=tuple(overrides)))
        print("RESULT_JSON " + json.dumps(results[-1]), flush=True)
    if args.zero3:
        recipe = CONFIGS["recommended"](base_recipe(args, prompts, "recommended_zero3_2ranks"))
        recipe["deepspeed"]["zero_stage"] = 3
        recipe["train"]["micro_batch_size"] = args.batch_size // args.mini_batches // 2  # each rank: half
        results.append(run_config(args, "recommended_zero3_2ranks", recipe, nproc=2))
        print("RESULT_JSON " + json.dumps(results[-1]), flush=True)
    trl = run_trl(args) if args.with_trl else None
    if trl:
        print("RESULT_JSON " + json.dumps(trl), flush=True)
    trl_tc = run_trl(args, tcmalloc=True) if args.with_trl and args.trl_tcmalloc else None
    if trl_tc:
        print("RESULT_JSON " + json.dumps(trl_tc), flush=True)

    flops = model_flops(args.batch_size, 37, args.response_length)
    by_kernel = {d: matmul_rates(d) for d in ("float32", "bfloat16")}
    rates = {d: max(r.values()) for d, r in by_kernel.items()}
    floors = {"fp32": flops / rates["float32"], "bf16": flops / rates["bfloat16"]}
    seq = 37 + args.response_length
    shape_rates = {d: model_shape_rate(d, args.batch_size, seq) for d in ("float32", "bfloat16")}
    shape_floors = {"fp32": flops / shape_rates["float32"], "bf16": flops / shape_rates["bfloat16"]}
    for r in results:
        kind = "bf16" if r["precision"].startswith("bf16") else "fp32"  # the matmul dtype of its training
        r["over_floor"] = round(r["step_s_median"] / floors[kind], 3)
        r["over_model_shape_floor"] = round(r["step_s_median"] / shape_floors[kind], 3)
        for base in (b for b in (trl, trl_tc) if b):
            suffix = base["config"]  # "trl" or "trl_tcmalloc"
            r[f"speedup_vs_{suffix}"] = round(base["step_s_median"] / r["step_s_median"], 3)
            if r["peak_rss_mib"] and base["peak_rss_mib"]:
                r[f"rss_vs_{suffix}"] = round(r["peak_rss_mib"] / base["peak_rss_mib"], 3)
    by = {r["config"]: r for r in results}
    if "recommended" in by and "recommended_zero3_2ranks" in by:
        by["recommended_zero3_2ranks"]["scaling_efficiency"] = round(
            by["recommended"]["step_s_median"] / by["recommended_zero3_2ranks"]["step_s_median"], 3)
    summary = {"bench": "ppo_trl_workload", "batch_size": args.batch_size, "response_length": args.response_length,
               "mini_batches": args.mini_batches, "temperature": args.temperature,
               "steps": args.steps, "warmup": args.warmup, "model_tflop_per_step": round(flops / 1e12, 3),
               "matmul_gflops": {k: round(v / 1e9, 1) for k, v in rates.items()},
               "matmul_gflops_by_kernel": {d: {k: round(v / 1e9, 1) for k, v in r.items()}
                                           for d, r in by_kernel.items()},
               "floor_s": {k: round(v, 3) for k, v in floors.items()},
               "matmul_gflops_model_shape": {k: round(v / 1e9, 1) for k, v in shape_rates.items()},
               "floor_s_model_shape": {k: round(v, 3) for k, v in shape_floors.items()},
               "results": results, "trl": trl, "trl_tcmalloc": trl_tc}
    print("BENCH_JSON " + json.dumps(summary), flush=True)
    print_table(results + [t for t in (trl, trl_tc) if t])
    return 0


if __name__ == "__main__":
    sys.exit(main())
