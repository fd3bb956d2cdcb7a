"""launch/bench_ppo.py: its generated recipes are valid and its FLOP count matches a hand count."""
import argparse
from pathlib import Path

import pytest

from rlhf_engine.config import Recipe, derive_batch_sizes
from helpers import load_launch_script


@pytest.mark.parametrize("config", ["trl_equal", "recommended", "recommended_tis", "recommended_generation_logprobs"])
def test_generated_recipes_validate_and_describe_the_trl_workload(tmp_path, config):
    bench = load_launch_script("bench_ppo")
    args = argparse.Namespace(batch_size=8, response_length=32, steps=8, mini_batches=1, temperature=1.0,
                              workdir=Path(tmp_path))
    recipe = Recipe.model_validate(bench.CONFIGS[config](bench.base_recipe(args, tmp_path / "p.jsonl", config)))
    sizes = derive_batch_sizes(recipe, 1)
    assert sizes.gradient_accumulation_steps == 1 and sizes.num_mini_batches == 1  # 1 epoch x 1 mini-batch
    assert recipe.generation.max_new_tokens == 32 and recipe.generation.ignore_eos
    assert recipe.generation.temperature == 1.0
    assert recipe.reward.type == "model" and recipe.reward.share_reference_backbone
    assert recipe.deepspeed.precision == ("fp32" if config == "trl_equal" else "bf16_autocast")
    assert recipe.ppo.rollout_correction == ("tis" if config == "recommended_tis" else "none")
    assert recipe.ppo.old_logprobs == ("generation" if config.endswith("generation_logprobs") else "recompute")


def test_mini_batches_split_the_rollout_batch_like_trls_num_mini_batches(tmp_path):
    bench = load_launch_script("bench_ppo")
    args = argparse.Namespace(batch_size=16, response_length=48, steps=5, mini_batches=2, temperature=0.7,
                              workdir=Path(tmp_path))
    recipe = Recipe.model_validate(bench.base_recipe(args, tmp_path / "p.jsonl", "trl_equal"))
    sizes = derive_batch_sizes(recipe, 1)
    assert sizes.num_mini_batches == 2 and sizes.gradient_accumulation_steps == 1  # 2 optimizer steps per PPO step
    assert recipe.train.rollout_batch_size == 16 and recipe.generation.temperature == 0.7


def test_model_flops_match_a_hand_count():
    bench = load_launch_script("bench_ppo")
    # SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 KV heads (kv width 192), MLP 1536, vocab 49152
    h, layers, kv, inter, v = 576, 30, 192, 1536, 49152
    seq, tokens = 37 + 32, 8 * (37 + 32)
    body = layers * 2 * (2 * h * h + 2 * h * kv + 3 * h * inter) + 2 * layers * h * seq
    head = 2 * h * v
    # generation + reference (body + head), value + reward (body), policy + value fwd/bwd (3x)
    expected = tokens * (2 * (body + head) + 2 * body + 3 * (body + head) + 3 * body)
    assert bench.model_flops(8, 37, 32) == pytest.approx(expected, rel=1e-12)
    assert bench.model_flops(16, 37, 32) == pytest.approx(2 * expected, rel=1e-12)  # linear in the batch


def test_a_config_entry_carries_recipe_overrides_and_bad_ones_are_refused(capsys):
    bench = load_launch_script("bench_ppo")
    ap = argparse.ArgumentParser(prog="bench_ppo")
    assert bench.parse_config("trl_equal", ap) == ("trl_equal", [])
    assert bench.parse_config("trl_equal:cpu.onednn_linear=false; train.steps=3", ap) == (
        "trl_equal", ["cpu.onednn_linear=false", "train.steps=3"])
    for entry, expected in (("fp16", "unknown config 'fp16'"), ("recommended:model.dtype", "is not KEY=VALUE")):
        with pytest.raises(SystemExit):
            bench.parse_config(entry, ap)
        assert expected in capsys.readouterr().err


def test_matmul_rates_measure_each_kernel():
    bench = load_launch_script("bench_ppo")
    rates = bench.matmul_rates("float32", 64, 64, 64, reps=2)
    assert set(rates) == {"torch_matmul", "onednn"} and all(r > 0 for r in rates.values())
    assert bench.matmul_rate("float32", 64, 64, 64, reps=2) > 0


def test_table_shows_ratios_and_a_dash_where_a_row_has_none(capsys):
    ours = {"config": "trl_equal", "step_s_median": 8.0, "peak_rss_mib": 4300.0, "speedup_vs_trl": 2.0,
            "over_floor": 1.1, "rss_vs_trl": 0.6, "phases_median_s": {"generate": 1.5, "hybrid/gather_s": 0.1},
            "mismatch": {"exp_abs_mean": 1.0213, "abs_max": 0.4}}
    trl = {"config": "trl", "step_s_median": 16.0, "peak_rss_mib": 7166.0, "phases_median_s": {"generation": 4.0}}
    load_launch_script("bench_ppo").print_table([ours, trl])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:7] == ["config", "s/step", "vs", "TRL", "/floor", "RSS", "MiB"]
    assert lines[1].split() == ["trl_equal", "8.00", "2.00", "1.10", "4300", "0.60", "1.0213", "generate=1.50"]
    assert lines[2].split() == ["trl", "16.00", "-", "-", "7166", "-", "-", "generation=4.00"]
