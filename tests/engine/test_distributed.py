"""engine/distributed.py: DeepSpeed configs (no launcher) and real 2-rank ZeRO-3 runs (deepspeed launcher, gloo)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_engine.config import Recipe, RecipeError, derive_batch_sizes
from rlhf_engine.distributed import config_dtype, ds_config, frozen_stage, lr_lambda
from helpers import REPO, TEST_ENV, json_lines, run_deepspeed

WORKER = Path(__file__).parent / "workers" / "zero3_step.py"


def recipe(deepspeed: dict | None = None, optim: dict | None = None, mini: int = 16, micro: int = 2) -> Recipe:
    return Recipe.model_validate(dict(
        name="t", stage="sft", model={"name_or_path": "tiny"}, data={"path": "rows.jsonl"},
        train={"steps": 10, "mini_batch_size": mini, "micro_batch_size": micro},
        deepspeed=deepspeed or {}, optim=optim or {}))


# --------------------------------------------------------------------------------------------
# config dicts
def test_batch_keys_follow_derived_sizes():
    r = recipe(mini=16, micro=2)
    sizes = derive_batch_sizes(r, 4)
    cfg = ds_config(r, sizes)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 2  # 16 / (2 x 4)
    assert cfg["train_batch_size"] == 16


def test_indivisible_batch_sizes_are_an_error_not_a_rewrite():
    r = recipe(mini=12, micro=2)
    with pytest.raises(RecipeError, match=r"mini_batch_size 12 must divide by micro_batch_size x world = 8"):
        derive_batch_sizes(r, 4)


def test_zero3_offload_bf16_clipping():
    r = recipe({"zero_stage": 3, "offload_optimizer": True, "offload_params": True, "precision": "bf16",
                "gradient_clipping": 0.5})
    cfg = ds_config(r, derive_batch_sizes(r, 2))
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["pin_memory"] is False  # no GPU here: pinning buys nothing
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["gradient_clipping"] == 0.5


def test_fp32_and_fp16_precision_keys():
    r32 = recipe({"zero_stage": 2})
    cfg32 = ds_config(r32, derive_batch_sizes(r32, 2))
    assert "bf16" not in cfg32 and "fp16" not in cfg32
    assert cfg32["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 50_000_000,
                                          "allgather_bucket_size": 50_000_000}  # not DeepSpeed's 2 GB default
    r16 = recipe({"zero_stage": 1, "precision": "fp16"})
    cfg16 = ds_config(r16, derive_batch_sizes(r16, 2))
    assert cfg16["fp16"]["enabled"] is True and cfg16["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_bf16_autocast_keeps_fp32_weights_and_plain_adamw():
    r = recipe({"zero_stage": 0, "precision": "bf16_autocast"})
    cfg = ds_config(r, derive_batch_sizes(r, 1))
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in cfg and "fp16" not in cfg and config_dtype(cfg) == torch.float32
    frozen = ds_config(r, derive_batch_sizes(r, 1), trainable=False)
    assert frozen["torch_autocast"]["enabled"]  # reference computes like the actor: KL starts at 0
    # a real engine, in a fresh process (a world of one): bf16 compute, fp32 weights, fused AdamW
    code = """
import json, torch
from rlhf_engine.config import Recipe, derive_batch_sizes
from rlhf_engine.distributed import autocast_dtype, create_frozen_engine, create_train_engine, init_distributed
init_distributed()
r = Recipe.model_validate(dict(name="t", stage="sft", model={"name_or_path": "tiny"}, data={"path": "x.jsonl"},
                               train={"steps": 2, "mini_batch_size": 1, "micro_batch_size": 1},
                               deepspeed={"precision": "bf16_autocast"}))
engine = create_train_engine(torch.nn.Sequential(torch.nn.Linear(8, 8)), r, derive_batch_sizes(r, 1), total_steps=2)
x = torch.randn(4, 8)
copy = torch.nn.Linear(8, 8)
copy.load_state_dict(engine.module[0].state_dict())
with torch.autocast("cpu", dtype=torch.bfloat16):
    expected = torch.autograd.grad(copy(x).float().pow(2).mean(), copy.weight)[0]
y = engine(x)
engine.backward(y.float().pow(2).mean())
grad_ok = torch.equal(engine.module[0].weight.grad, expected)  # no all-reduce in a world of one, same gradient
engine.step()
frozen = create_frozen_engine(torch.nn.Linear(8, 8), r, derive_batch_sizes(r, 1))
print("RESULT " + json.dumps({"frozen_out": str(frozen(torch.randn(2, 8)).dtype), "frozen_weight": str(frozen.weight.dtype),
      "autocast": str(autocast_dtype(engine)), "out": str(y.dtype),
      "weight": str(engine.module[0].weight.dtype), "optimizer": type(engine.optimizer).__name__,
      "fused": engine.optimizer.defaults["fused"],
      "allreduce": engine.enable_backward_allreduce, "grad_ok": grad_ok}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **TEST_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json_lines(proc.stdout, "RESULT ")[0] == {"frozen_out": "torch.bfloat16", "frozen_weight": "torch.float32",
                                                     "autocast": "torch.bfloat16", "out": "torch.bfloat16",
                                                     "weight": "torch.float32", "optimizer": "AdamW",
                                                     "fused": True, "allreduce": False, "grad_ok": True}


def test_frozen_config_has_no_optimizer_keys_and_follows_stage():
    r = recipe({"zero_stage": 3, "offload_optimizer": True})
    sizes = derive_batch_sizes(r, 2)
    frozen = ds_config(r, sizes, trainable=False)
    assert frozen["zero_optimization"]["stage"] == 3
    assert "offload_optimizer" not in frozen["zero_optimization"] and "gradient_clipping" not in frozen
    assert ds_config(r, sizes, trainable=False, zero_stage=0)["zero_optimization"]["stage"] == 0
    # ZeRO 1/2 partition only optimizer state and grads: a frozen model is then simply replicated
    assert frozen_stage(recipe({"zero_stage": 2})) == 0
    assert frozen_stage(recipe({"zero_stage": 2, "frozen_zero_stage": 3})) == 3


def test_extra_keys_merge_recursively():
    r = recipe({"zero_stage": 3, "extra": {"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}})
    cfg = ds_config(r, derive_batch_sizes(r, 2))
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    assert cfg["steps_per_print"] == 5


def test_lr_schedules():
    warm = lr_lambda(recipe(optim={"warmup_steps": 4}).optim, total_steps=10)
    assert [warm(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lr_lambda(recipe(optim={"scheduler": "linear", "warmup_steps": 2}).optim, total_steps=10)
    assert linear(2) == 1.0 and linear(6) == pytest.approx(0.5) and linear(10) == 0.0
    cosine = lr_lambda(recipe(optim={"scheduler": "cosine"}).optim, total_steps=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert cosine(3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


# --------------------------------------------------------------------------------------------
# real engines
def by_check(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["check"], []).append(r)
    return out


def test_single_process_without_launcher(tmp_path):
    """No launcher: a world of one; ZeRO-0 bf16 engine (fp32 masters) and a replicated frozen model."""
    env = {**os.environ, **TEST_ENV, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "--single"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checks = by_check(json_lines(proc.stdout, "RESULT "))
    assert checks["dist"][0]["world_size"] == 1 and checks["dist"][0]["is_main"]
    single = checks["single"][0]
    assert single["accumulation"] == 4 and single["global_steps"] == 2  # 8 micro-steps, 2 optimizer steps
    assert single["param_dtype"] == "torch.bfloat16" and single["master_dtype"] == "torch.float32"
    assert single["changed"] and not single["is_zero3"]
    losses = single["micro_losses"]
    assert sum(losses[4:]) < sum(losses[:4])
    assert single["frozen_dtype"] == "torch.bfloat16"
    assert not single["frozen_training"] and not single["frozen_requires_grad"]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> dict[str, list[dict]]:
    proc = run_deepspeed(WORKER, str(tmp_path_factory.mktemp("zero3")), nproc=2)
    return by_check(json_lines(proc.stdout, "RESULT "))


def test_process_group(zero3_run):
    dist_rows = sorted(zero3_run["dist"], key=lambda r: r["rank"])
    assert [r["rank"] for r in dist_rows] == [0, 1] and [r["local_rank"] for r in dist_rows] == [0, 1]
    assert all(r["world_size"] == 2 and r["device"] == "cpu" for r in dist_rows)
    assert [r["is_main"] for r in dist_rows] == [True, False]
    assert all(r["broadcast"] == {"from": 0} and r["mean"] == 0.5 for r in dist_rows)
    assert all(r["threads"] == max(1, os.cpu_count() // 2) for r in dist_rows)


def test_ranks_hold_different_shards_of_one_parameter(zero3_run):
    rows = zero3_run["shards"]
    assert len(rows) == 2
    for r in rows:
        assert r["local_numel"] == 0  # partitioned: nothing materialised outside forward
        assert r["shard_numel"] == r["full_numel"] // 2
        assert r["shards_differ"] and r["joined_equals_full"]
    assert rows[0]["shard_sums"] == rows[1]["shard_sums"]


def test_training_agrees_across_ranks_and_learns(zero3_run):
    rows = zero3_run["train"]
    assert len(rows) == 2 and rows[0]["losses"] == rows[1]["losses"]  # global mean over the same batch
    losses = rows[0]["losses"]
    assert losses[-1] < losses[0] - 0.3, losses
    for r in rows:
        assert r["accumulation"] == 2 and r["global_steps"] == 4 and r["is_zero3"]
        assert not any(r["changed_mid"]) and all(r["changed_at_boundary"])  # step() only acts at the boundary
    assert [r["state_dict_is_none"] for r in sorted(rows, key=lambda r: r["rank"])] == [False, True]
    gather = zero3_run["gather"][0]
    assert gather["keys_match"] and gather["initial_equals_saved"] and gather["max_change"] > 1e-3


def test_accumulation_matches_one_big_micro_batch(zero3_run):
    acc = zero3_run["accumulation"][0]
    assert acc["accumulation_b"] == 1
    assert acc["loss_a"] == pytest.approx(acc["loss_b"], abs=1e-5)
    assert acc["max_update"] > 1e-3
    assert acc["max_update_diff"] < 1e-3 * acc["max_update"]


def test_frozen_zero3_forward_equals_unsharded(zero3_run):
    for r in zero3_run["frozen"]:
        assert r["stage"] == 3 and r["is_zero3"] and not r["plain_is_zero3"]
        assert not r["training"] and not r["any_requires_grad"]
        assert r["optimizer"] == "DeepSpeedZeRoOffload"  # parameter manager only, no training optimizer
        assert r["max_logit_diff"] < 1e-5


def test_bf16_zero3_keeps_fp32_master_weights(zero3_run):
    rows = zero3_run["bf16"]
    assert rows[0]["losses"] == rows[1]["losses"]
    for r in rows:
        assert r["param_dtype"] == "torch.bfloat16" and r["master_dtype"] == "torch.float32"
        assert r["losses"][-1] < r["losses"][0]
