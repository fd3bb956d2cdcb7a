"""The prepared GPU check: what only a CUDA machine can show, in a few minutes, offline. Prints JSON.

    bash launch/gpu_check.sh          # installs the carried wheels (.whl/) first, then runs this
    python launch/gpu_check.py OUT    # OUT: folder for the runs and gpu_check.json

Checks (each one's result, numbers and verdict under its name in the JSON):
1. kernels: Triton against the torch backend on CUDA tensors, fp32 and bf16, forward and gradient;
2. hybrid: a ZeRO-3 actor of world size 1 generating through the hybrid engine gives the same greedy
   tokens as an unsharded copy;
3. flash_attention: flash-attention 2 logits against SDPA (skipped when flash-attn is not installed);
4. ppo: 10 PPO steps of a tiny Llama in bf16, ZeRO-3 + LoRA, through `rlhf-engine train`;
5. planner: the plan of that run and of a 190 M Llama run against torch.cuda.max_memory_allocated.
Everything it needs is made here: a tiny Llama folder with a word-level tokenizer trained on the
shipped prompts (no hub, no embedded GGUF). Without CUDA it says so and checks nothing (exit 0).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # "cpu" runs checks 2 and 4 here, to test this script


def tiny_llama(folder: Path, **shape) -> Path:
    """A seeded random Llama with a word-level tokenizer trained on recipes/data/prompts.jsonl."""
    if (folder / "config.json").is_file():
        return folder
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["prompt"] for line in (REPO / "recipes/data/prompts.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    config = LlamaConfig(vocab_size=len(fast), pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, max_position_embeddings=1024,
                         **{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True), **shape})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def check_kernels() -> dict:
    from rlhf_engine import kernels

    torch.manual_seed(0)
    out = {}
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        logits = torch.randn(4, 33, 5000, device="cuda", dtype=dtype, requires_grad=True)
        labels = torch.randint(0, 5000, (4, 33), device="cuda")
        hidden = torch.randn(4, 33, 64, device="cuda", dtype=dtype)
        weight = torch.randn(5000, 64, device="cuda", dtype=dtype) / 8
        lp, ref_lp = torch.randn(4, 33, device="cuda"), torch.randn(4, 33, device="cuda")
        mask = (torch.rand(4, 33, device="cuda") > 0.2).float()
        errs = {}
        for name, fn in {
            "logprobs": lambda: kernels.logprobs_from_logits(logits, labels, 0.7),
            "logprobs_grad": lambda: torch.autograd.grad(kernels.logprobs_from_logits(logits, labels).sum(), logits)[0],
            "entropy": lambda: kernels.entropy_from_logits(logits),
            "linear_logprobs": lambda: kernels.linear_logprobs(hidden, weight, labels),
            "kl_k3": lambda: kernels.kl_penalty(lp, ref_lp, "k3"),
            "gae": lambda: torch.cat(kernels.gae(lp, ref_lp, mask, 1.0, 0.95)),
            "whiten": lambda: kernels.masked_whiten(lp, mask),
        }.items():
            with kernels.set_backend("triton"):
                a = fn().float()
            with kernels.set_backend("torch"):
                b = fn().float()
            errs[name] = float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))
        out[str(dtype).split(".")[-1]] = {"max_rel_err": errs, "ok": all(e < tol for e in errs.values())}
    return {**out, "ok": all(v["ok"] for v in out.values())}


def check_hybrid(model_dir: Path) -> dict:
    """Greedy tokens of a ZeRO-3 (world size 1) actor through the hybrid engine == an unsharded copy."""
    from rlhf_engine.config import load_recipe, derive_batch_sizes
    from rlhf_engine.distributed import create_train_engine, ds_config, init_distributed, zero_init_context
    from rlhf_engine.hybrid import HybridEngine
    from rlhf_engine.models import load_policy, load_tokenizer

    init_distributed()
    recipe = load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", [f"model.name_or_path={model_dir}",
                                                                "deepspeed.zero_stage=3", "train.rollout_batch_size=4",
                                                                "train.mini_batch_size=4", "train.micro_batch_size=4"])
    sizes = derive_batch_sizes(recipe, 1)
    tok = load_tokenizer(recipe.model)
    batch = tok(["What is the capital of France ?", "Write one sentence"], return_tensors="pt", padding=True).to(DEVICE)
    plain = load_policy(recipe.model, for_training=False).to(DEVICE)
    with zero_init_context(ds_config(recipe, sizes)):
        actor = load_policy(recipe.model)
    engine = create_train_engine(actor, recipe, sizes, total_steps=1)
    hybrid = HybridEngine(engine)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    want = plain.generate(**batch, **kwargs)
    with hybrid.inference() as model:
        got = model.generate(**batch, **kwargs)
    return {"tokens_equal": bool(torch.equal(want, got)), "ok": bool(torch.equal(want, got)),
            "new_tokens": int(got.shape[1] - batch["input_ids"].shape[1])}


def check_flash_attention(model_dir: Path) -> dict:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return {"skipped": "flash-attn is not installed", "ok": None}
    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 100, (2, 64), device="cuda")
    logits = {impl: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=impl)
              .cuda()(ids).logits.float() for impl in ("sdpa", "flash_attention_2")}
    err = float((logits["sdpa"] - logits["flash_attention_2"]).abs().max())
    return {"max_abs_err": err, "ok": err < 5e-2}


def run_ppo(out: Path, name: str, overrides: list[str]) -> dict:
    sets = [f"output_dir={out}", f"name={name}", "logging.progress=false", *overrides]
    cmd = [sys.executable, "-m", "rlhf_engine.cli", "train", str(REPO / "recipes/tiny/ppo-zero3.yaml"),
           "--no-memory-check", *[f"--set={s}" for s in sets]]
    t = time.perf_counter()
    env = {k: v for k, v in os.environ.items()  # check_hybrid's world of one set these in this process
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONSAFEPATH": "1"})
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-3000:]}
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line]
    from rlhf_engine.config import load_recipe
    from rlhf_engine.plan import plan_recipe

    plan = plan_recipe(load_recipe(REPO / "recipes/tiny/ppo-zero3.yaml", sets), 1, 1)
    measured = max(r.get("memory/peak_device_mib", r["memory/peak_rss_mib"]) for r in rows)
    predicted = plan.peak_bytes / 2 ** 20
    finite = all(all(v == v for v in r.values() if isinstance(v, float)) for r in rows)
    return {"steps": len(rows), "seconds": round(time.perf_counter() - t, 1), "finite": finite,
            "kl_last": rows[-1]["kl/mean"], "measured_mib": round(measured, 1), "predicted_mib": round(predicted, 1),
            "planner_error": round(predicted / measured - 1, 3), "ok": finite and len(rows) >= 1}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "checked": [], "message": "the GPU check needs CUDA; this machine has none, "
                          "so nothing was checked"}))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    tiny = tiny_llama(out / "tiny-llama")
    mid = tiny_llama(out / "llama190m", hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                     num_attention_heads=16, num_key_value_heads=4)
    common = [f"model.name_or_path={tiny}", "deepspeed.precision=bf16", "data.chat_template=false",
              "generation.max_new_tokens=32", "train.eval_size=0", "logging.plots=false"]
    checks = {
        "kernels": check_kernels,
        "hybrid": lambda: check_hybrid(tiny),
        "flash_attention": lambda: check_flash_attention(tiny),
        "ppo": lambda: run_ppo(out, "ppo-lora-zero3", common + ["train.steps=10", "deepspeed.zero_stage=3",
                                                               "model.lora.r=8"]),
        "planner_190m": lambda: run_ppo(out, "planner-190m", common + [
            f"model.name_or_path={mid}", "train.steps=2", "deepspeed.zero_stage=0", "generation.max_new_tokens=128"]),
    }
    result = {"cuda": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in checks.items():
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # one broken check must not hide the others
            result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        result[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"[gpu_check] {name}: ok={result[name].get('ok')} ({result[name]['seconds']} s)", file=sys.stderr,
              flush=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if all(v.get("ok") is not False for v in result.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
