"""Hybrid engine on 2 real ZeRO ranks (gloo, CPU): exact generation, exact restore, training after.

One launch of tests/engine/workers/hybrid_worker.py (~1 min) runs every check; see its docstring.
"""
import pytest
import torch

from helpers import REPO, json_lines, run_deepspeed

WORKER = REPO / "tests/engine/workers/hybrid_worker.py"
ROUND_TRIPS = ["zero3_whole", "zero3_groups", "stage2", "lora_stage3", "lora_stage0", "cast_stage3", "cast_stage0",
               "cast_lora_stage0"]


@pytest.fixture(scope="module")
def results() -> dict:
    proc = run_deepspeed(WORKER, nproc=2)
    lines = json_lines(proc.stdout, "HYBRID ")
    by_check: dict = {}
    for line in lines:
        by_check.setdefault(line["check"], {})[line["rank"]] = line
    missing = [c for c in ROUND_TRIPS + ["zero3_training", "zero3_speed"] if sorted(by_check.get(c, {})) != [0, 1]]
    assert not missing, f"checks missing from the worker output: {missing}\n{proc.stdout[-3000:]}"
    return by_check


@pytest.mark.parametrize("check", ROUND_TRIPS)
def test_round_trip_is_exact_and_restores_everything(results, check):
    for rank, r in results[check].items():
        where = f"{check} rank {rank}"
        assert r["tokens_equal"], f"{where}: greedy tokens differ from the unsharded copy"
        assert r["logits_equal"], f"{where}: logits differ from the unsharded copy"
        assert r["new_tokens"] > 0
        cast = check.startswith("cast")
        assert r["inside"] == {"training": False, "ckpt": False, "use_cache": True, "deepspeed_hooks": 0,
                               "hooks": r["inside"]["hooks"], "attn": "eager" if cast else "sdpa",
                               "dtypes": ["torch.bfloat16" if cast else "torch.float32"]}, f"{where}: {r['inside']}"
        assert r["deepspeed_hooks_after"] >= 2, f"{where}: DeepSpeed hooks must be back after the context"
        assert r["shards_same"] and r["optim_same"], f"{where}: weights or optimizer state changed"
        assert r["hooks_same"] and r["training_same"], f"{where}: hooks or train modes not restored"
        assert r["ckpt_restored"] and r["use_cache_restored"] and r["attn_restored"], where
        assert r["same_tensors"], f"{where}: parameters must get their very own tensors back"
        assert r["adapters_unmerged"], f"{where}: peft must see its adapters unmerged again"
        assert set(r["timings"]) >= {"gather_s", "generate_s", "release_s"}


def test_zero3_layer_groups_are_gathered_per_forward(results):
    for r in results["zero3_groups"].values():
        assert r["timings"]["group_gathers"] >= 2 * r["new_tokens"], "layers are gathered group by group"


def test_training_after_round_trips_matches_training_without(results):
    for rank, r in results["zero3_training"].items():
        assert r["losses_a"] == r["losses_b"], f"rank {rank}: losses diverged after the hybrid round trips"
        assert r["shards_equal"] and r["optim_equal"], f"rank {rank}: weights/optimizer diverged"
        assert r["losses_a"][-1] != r["losses_a"][0], "training must actually move"


def test_lora_adapters_are_merged_for_generation(results):
    for check in ("lora_stage3", "lora_stage0", "cast_lora_stage0"):
        for r in results[check].values():
            assert r["adapters_matter"], "test setup: adapters must change the output to prove the merge"


def test_hybrid_is_faster_than_sharded_generate(results):
    for r in results["zero3_speed"].values():
        assert r["hybrid_s"] < r["sharded_s"], r
        empty = r["empty_round_trip"]
        assert empty["gather_s"] + empty["release_s"] < 2.0, f"round trip overhead too high: {empty}"


def test_decode_linear_takes_skinny_bf16_products_only_and_restores_f_linear():
    import torch.nn.functional as F

    from rlhf_engine.backends.cpu.linear import DECODE_ROWS, WIDE_HEAD_ROWS, decode_linear

    real = F.linear
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(8, 1, 64, generator=g).bfloat16()  # batch 8 x 1 new token
    with torch.no_grad(), decode_linear():
        assert F.linear is not real
        skinny = F.linear(x, w, b)
        fp32 = x.float() @ w.float().t() + b.float()
        torch.testing.assert_close(skinny.float(), fp32, rtol=2e-2, atol=2e-2)  # bf16 rounding of the output
        torch.testing.assert_close(skinny, real(x, w, b), rtol=1e-2, atol=1e-2)
        assert skinny.shape == (8, 1, 96) and skinny.dtype == torch.bfloat16
        prefill = torch.randn(2, DECODE_ROWS, 64, generator=g).bfloat16()  # > DECODE_ROWS rows: the real kernel
        assert torch.equal(F.linear(prefill, w), real(prefill, w))
        assert torch.equal(F.linear(x.float(), w.float()), real(x.float(), w.float()))  # fp32 layer: untouched
        head = torch.randn(WIDE_HEAD_ROWS, 64, generator=g)  # fp32 LM head over a vocabulary: W @ x.T
        torch.testing.assert_close(F.linear(x.float(), head), real(x.float(), head), rtol=1e-5, atol=1e-4)
    assert F.linear is real
    with decode_linear():  # with gradients on (training), always the real kernel
        leaf = x.clone().requires_grad_(True)
        assert torch.equal(F.linear(leaf, w), real(leaf, w))
    assert F.linear is real
