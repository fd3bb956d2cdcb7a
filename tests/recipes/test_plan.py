"""The memory planner: its numbers against an independent count, the recipes/gpu headers equal its output,
the fixes it proposes do fit, and `train --dry-run` runs every GPU recipe on CPU, offline."""
import json
import re
import shlex
from pathlib import Path

import pytest

from rlhf_engine.cli import main
from rlhf_engine.config import load_recipe
from rlhf_engine.plan import GIB, Plan, header_lines, plan_recipe

REPO = Path(__file__).resolve().parents[2]
GPU_RECIPES = sorted((REPO / "recipes" / "gpu").glob("*.yaml"))
L8B = "meta-llama/Meta-Llama-3-8B-Instruct"


def header_plan_args(path: Path) -> list[str]:
    """The `rlhf-engine plan` arguments written in a recipe header (continuation lines joined)."""
    header = "\n".join(line[1:] for line in path.read_text().splitlines() if line.startswith("#"))
    match = re.search(r"rlhf-engine plan (\S+) \\\n\s*(.*)", header)
    assert match, f"{path}: the header names no `rlhf-engine plan` command"
    return [str(REPO / match.group(1)), *shlex.split(match.group(2))]


def run_plan(args, capsys) -> Plan:
    assert main(["plan", *args, "--json"]) == 0
    return Plan(**json.loads(capsys.readouterr().out))


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_header_memory_lines_are_the_planner_output(path, capsys):
    plan = run_plan(header_plan_args(path), capsys)
    header = [line for line in path.read_text().splitlines()
              if re.match(r"#   (generate|score|train|host memory per node): ", line)]
    assert header == header_lines(plan), f"{path}: regenerate the header's memory lines with the command it names"
    assert plan.fits, f"{path}: the recipe does not fit the GPU its header names"


def test_planner_matches_an_independent_count_8b_zero3():
    """Bytes per parameter per ZeRO stage and KV cache per token, counted by hand for Llama-3-8B."""
    recipe = load_recipe(REPO / "recipes/gpu/llama3-8b-ppo-zero3.yaml")
    plan = plan_recipe(recipe, 8, 1, 80, aliases={"./runs/llama3-8b-rm/export": L8B})
    lm = 32 * (4096 * (4096 * 2 + 1024 * 2) + 3 * 4096 * 14336 + 2 * 4096) + 4096 + 2 * 128256 * 4096
    scalar = lm - 128256 * 4096 + 4096  # no LM head; a 4096 -> 1 score head
    assert plan.models["actor"]["params"] == lm and plan.models["critic"]["params"] == scalar
    world, bf16 = 8, 2
    assert plan.phases["generate"]["weights"] == pytest.approx(2 * (lm + scalar) * bf16 / world, abs=8)
    assert plan.phases["generate"]["optimizer"] == pytest.approx((lm + scalar) * (4 + 8) / world, abs=8)
    kv = 16 * (512 + 1024) * 32 * 2 * (8 * 128) * bf16  # generation_batch_size x tokens x layers x (k, v) x width
    assert plan.phases["generate"]["kv_cache"] == kv
    assert plan.phases["generate"]["gathered_params"] == lm * bf16  # hybrid engine gathers the whole actor
    # both trained engines keep their gradient partitions between their updates
    assert plan.phases["train"]["gradients"] == pytest.approx((lm + scalar) * bf16 / world, abs=8)
    assert plan.host_bytes_per_node == 0 and plan.peak_phase == "generate"


def test_stage0_lora_and_offload_counts():
    recipe = load_recipe(REPO / "recipes/gpu/qwen2.5-0.5b-lora-ppo.yaml")
    plan = plan_recipe(recipe, 1, 1, 16)
    actor = plan.models["actor"]
    base = 494_032_768  # Qwen2.5-0.5B with tied embeddings
    # LoRA r=16 on every linear of 24 layers: q, k, v, o (896 wide; k, v 128), gate, up, down (4864)
    lora = 24 * 16 * ((896 + 896) * 2 + (896 + 128) * 2 + (896 + 4864) * 2 + (4864 + 896))
    assert actor["trainable"] == lora and actor["params"] == base + lora
    critic = plan.models["critic"]["params"]
    assert plan.phases["train"]["optimizer"] == pytest.approx((lora + critic) * 12, abs=8)  # bf16: master + Adam
    off = plan_recipe(recipe, 1, 1, 16, aliases=None, suggest=False).host_bytes_per_node
    assert off == 0
    offloaded = load_recipe(REPO / "recipes/gpu/llama3-70b-ppo-multinode.yaml")
    plan70 = plan_recipe(offloaded, 8, 4, 80, aliases={"./runs/llama3-70b-rm/export": "meta-llama/Meta-Llama-3-70B"})
    trained = plan70.models["actor"]["trainable"] + plan70.models["critic"]["trainable"]
    assert "optimizer" not in plan70.phases["train"]
    assert plan70.host_bytes_per_node == pytest.approx(trained * 12 / 32 * 8, rel=1e-6)  # 8 ranks per node


def test_fixes_make_the_plan_fit(capsys):
    args = [str(REPO / "recipes/gpu/llama3-8b-ppo-zero3.yaml"), "--gpus-per-node", "2", "--gpu-memory", "80",
            "--model-config", f"./runs/llama3-8b-rm/export={L8B}"]
    plan = run_plan(args, capsys)
    assert plan.fits is False and plan.fixes
    for fix in plan.fixes:
        fixed = load_recipe(args[0], fix["set"])
        again = plan_recipe(fixed, 2, 1, 80, aliases={"./runs/llama3-8b-rm/export": L8B}, suggest=False)
        assert again.fits and again.peak_bytes / GIB == pytest.approx(fix["peak_gib"], abs=0.06), fix
    assert main(["plan", args[0], "--gpus-per-node", "2"]) == 2  # the reward model's path: no config, exit 2
    assert "--model-config" in capsys.readouterr().err


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_train_dry_run_every_gpu_recipe(path, capsys):
    args = header_plan_args(path)
    world = dict(zip(args[1::2], args[2::2]))
    aliases = [f"--model-config={v}" for k, v in zip(args[1::2], args[2::2]) if k == "--model-config"]
    rc = main(["train", str(path), "--dry-run", "--nproc", world.get("--gpus-per-node", "1"),
               "--nodes", world.get("--nodes", "1"), *aliases])
    out = capsys.readouterr().out
    assert rc == 0
    recipe = load_recipe(path)
    roles = ["actor", "reference", "critic"] + (["reward"] if recipe.reward_configs()[0].type == "model" else [])
    for role in roles:
        assert re.search(rf"model {role}: \w+ on meta, [\d,]+ params", out), (role, out)
    assert "deepspeed (trained): stage" in out and "data: 230 rows" in out and "<- peak" in out


def test_train_memory_check_stops_a_run_that_does_not_fit(capsys):
    """What `train` does first on a GPU, here with the GPU's size given: exit code 2 and the plan's fixes."""
    import argparse

    from rlhf_engine.cli import _memory_check

    recipe = load_recipe(REPO / "recipes/gpu/llama3-8b-ppo-zero3.yaml")
    args = argparse.Namespace(no_memory_check=False, nproc=8, nodes=1,
                              model_config=[f"./runs/llama3-8b-rm/export={L8B}"])
    assert _memory_check(args, recipe, gpu_gib=80) == 0
    assert _memory_check(args, recipe, gpu_gib=24) == 2
    err = capsys.readouterr().err
    assert "this GPU has 24.0 GiB" in err and "--no-memory-check" in err and "fits with --set" in err
    args.no_memory_check = True
    assert _memory_check(args, recipe, gpu_gib=24) == 0


def test_encoder_decoder_models_are_planned(tmp_path):
    """A T5 (flan-t5-base's shape) plans as a seq2seq LM: its real parameter count, both stacks' layers;
    the shipped seq2seq recipe plans instead of failing."""
    from transformers import T5Config, T5ForConditionalGeneration
    import torch

    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                      num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    config.save_pretrained(tmp_path / "t5")
    with torch.device("meta"):
        expected = sum(p.numel() for p in T5ForConditionalGeneration(config).parameters())
    recipe = load_recipe(REPO / "recipes/smoke/ppo-t5-numbers.yaml",
                         ["deepspeed.zero_stage=3", "deepspeed.precision=bf16"])
    plan = plan_recipe(recipe, 1, 1, 80, aliases={"tiny-t5-words": str(tmp_path / "t5")})
    assert plan.models["actor"]["params"] == expected  # ~248M
    from rlhf_engine.plan import model_shape
    shape = model_shape(str(tmp_path / "t5"))
    assert shape.num_layers == 24 and shape.intermediate == 2048 and shape.hidden == 768
    assert plan.fits and plan.phases["train"]["activations"] > 0
    assert main(["plan", str(REPO / "recipes/smoke/ppo-t5-numbers.yaml")]) == 0
