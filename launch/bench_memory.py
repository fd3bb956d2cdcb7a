"""Planner vs measured peak memory of real runs (engine/plan.py against this machine).

    python launch/bench_memory.py                 # every run below, CPU here (or GPU when there is one)
    python launch/bench_memory.py --runs smollm2-stage0 smollm2-zero3-2ranks --steps 1
    python launch/bench_memory.py --runs llama190m-grpo-zero3-2ranks --set hybrid.enabled=false   # an A/B

Each run is a real `rlhf-engine train` (1 rank) or deepspeed-launcher job (2 ranks) of a small PPO
recipe; its rank 0 logs `memory/peak_rss_mib` (and on CUDA `memory/peak_device_mib`, from
torch.cuda.max_memory_allocated) in metrics.jsonl. The prediction is `rlhf-engine plan` for the same
recipe and world size.

On CPU the measured number is the peak RSS minus a process baseline: the RSS of a process that has
imported the engine (torch, transformers, DeepSpeed), joined a process group and loaded the tokenizer,
measured here in its own process. That memory is code, library data and allocator arenas, which a GPU
never holds, so the planner does not count it. Host memory (offload) is added to the prediction on CPU,
since there the "device" and the host are the same RAM. On CUDA the device peak is compared directly.
Prints one JSON line per run (`MEMORY_JSON {...}`) and a table; target: within 15% of the measured peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "recipes/tiny/ppo-zero3.yaml"
SMOL = ["model.name_or_path=smollm2-135m-instruct", "data.max_prompt_length=64", "generation.max_new_tokens=32",
        "train.rollout_batch_size=8", "train.mini_batch_size=8", "train.micro_batch_size=4", "train.eval_size=0",
        "data.eval_size=0", "reward.type=length", "logging.plots=false", "checkpoint.save_final=false"]
# a random Llama of ~190 M parameters with the SmolLM2 tokenizer (written once into the bench folder)
LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=2048)
RUNS = {
    "smollm2-stage0": (1, SMOL + ["deepspeed.zero_stage=0"]),
    "smollm2-zero3-2ranks": (2, SMOL + ["deepspeed.zero_stage=3"]),
    "smollm2-lora": (1, SMOL + ["deepspeed.zero_stage=0", "model.lora.r=16", "critic.lora.r=16"]),
    "smollm2-checkpointing": (1, SMOL + ["deepspeed.zero_stage=0", "model.gradient_checkpointing=true",
                                         "train.micro_batch_size=8", "generation.max_new_tokens=64"]),
    "smollm2-zero3-offload": (2, SMOL + ["deepspeed.zero_stage=3", "deepspeed.offload_params=true"]),
    "llama190m-grpo-zero3-2ranks": (2, SMOL + ["model.name_or_path={llama}", "deepspeed.zero_stage=3",
                                               "ppo.algorithm=grpo", "ppo.group_size=2", "train.rollout_batch_size=4"]),
}


def random_llama(folder: Path) -> Path:
    """A seeded random Llama (LLAMA shape) saved as a Hugging Face folder with the SmolLM2 tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlhf_engine.presets import PRESETS, cache_root, use_distinct_pad

    tokenizer = AutoTokenizer.from_pretrained(PRESETS["smollm2-135m-instruct"].materialize(cache_root()))
    use_distinct_pad(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         **LLAMA))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


BASELINE = r"""
from rlhf_engine.backends.cpu.process import prepare_process
prepare_process("auto", False)  # the allocator a training run gets (engine/backends/cpu)
import rlhf_engine.trainer, deepspeed, transformers
from rlhf_engine.distributed import init_distributed
from rlhf_engine.models import load_tokenizer
from rlhf_engine.config import ModelConfig
init_distributed()
load_tokenizer(ModelConfig(name_or_path="smollm2-135m-instruct"))
print("RSS_MIB", int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20)
"""


def env() -> dict:
    return {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "TOKENIZERS_PARALLELISM": "false"}


def baseline_mib() -> float:
    out = subprocess.run([sys.executable, "-c", BASELINE], env=env(), capture_output=True, text=True, check=True)
    return float(out.stdout.split("RSS_MIB")[-1])


def measure(name: str, nproc: int, overrides: list[str], out_dir: Path, steps: int) -> dict:
    """Run one recipe; return its peak memory from rank 0's metrics.jsonl."""
    sets = [*overrides, f"output_dir={out_dir}", f"name={name}", f"train.steps={steps}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "rlhf_engine.cli", "train", str(REPO / BASE), *[f"--set={s}" for s in sets]]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), str(REPO / "launch/train.py"), str(REPO / BASE),
               *[f"--set={s}" for s in sets]]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines() if line]
    return {"rss_mib": max(r["memory/peak_rss_mib"] for r in rows),
            "device_mib": max((r.get("memory/peak_device_mib", 0) for r in rows), default=0)}


def predict(nproc: int, overrides: list[str], on_cpu: bool = True) -> dict:
    from rlhf_engine.config import load_recipe
    from rlhf_engine.plan import plan_recipe

    plan = plan_recipe(load_recipe(REPO / BASE, overrides), nproc, 1, on_cpu=on_cpu)
    return {"device_mib": plan.peak_bytes / 2 ** 20, "host_mib": plan.host_bytes_per_node / nproc / 2 ** 20,
            "peak_phase": plan.peak_phase}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override added to every run, for the prediction too (an A/B in one setting)")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench-memory-"))
    llama = random_llama(out_dir / "llama190m")
    base = 0.0 if cuda else baseline_mib()
    results = []
    for name in args.runs:
        nproc, overrides = RUNS[name]
        overrides = [o.replace("{llama}", str(llama)) for o in overrides] + args.extra
        pred = predict(nproc, overrides, on_cpu=not cuda)
        got = measure(name, nproc, overrides, out_dir, args.steps)
        measured = got["device_mib"] if cuda else got["rss_mib"] - base
        predicted = pred["device_mib"] + (0 if cuda else pred["host_mib"])
        row = {"run": name, "ranks": nproc, "device": "cuda" if cuda else "cpu", "baseline_mib": round(base),
               "measured_mib": round(measured), "predicted_mib": round(predicted),
               "error": round(predicted / measured - 1, 3), "peak_phase": pred["peak_phase"],
               "rss_mib": round(got["rss_mib"])}
        results.append(row)
        print("MEMORY_JSON " + json.dumps(row), flush=True)
    print(f"\n{'run':30s} {'ranks':>5s} {'measured MiB':>13s} {'predicted MiB':>14s} {'error':>7s}  peak phase")
    for r in results:
        print(f"{r['run']:30s} {r['ranks']:5d} {r['measured_mib']:13d} {r['predicted_mib']:14d} "
              f"{r['error']:+7.1%}  {r['peak_phase']}")
    print(f"(CPU: measured = peak RSS of rank 0 - {base:.0f} MiB process baseline)" if not cuda else
          "(CUDA: measured = torch.cuda.max_memory_allocated of rank 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
