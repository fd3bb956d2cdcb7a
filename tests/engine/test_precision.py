"""deepspeed.precision: auto (rlhf_engine.precision): a recipe's explicit precision is kept; auto on CPU
times fp32 against bf16 matmuls at the model's shapes and keeps bf16 only when clearly faster."""
import pytest

from rlhf_engine.config import load_recipe
from rlhf_engine.precision import choose, probe_cpu, resolve_precision

from helpers import REPO

TINY = REPO / "recipes" / "tiny" / "ppo-zero3.yaml"


def test_choose_keeps_fp32_unless_bf16_is_clearly_faster():
    assert choose({"fp32_ms": 10.0, "bf16_ms": 5.0}) == "bf16_autocast"
    assert choose({"fp32_ms": 10.0, "bf16_ms": 9.5}) == "fp32"  # a tie goes to the exact one
    assert choose({"fp32_ms": 5.0, "bf16_ms": 10.0}) == "fp32"  # no native bf16 (emulated, slower)


def test_explicit_precision_is_kept_and_auto_is_the_default():
    recipe = load_recipe(TINY)
    assert recipe.deepspeed.precision == "fp32"
    assert resolve_precision(recipe) == {"precision": "fp32", "chosen_by": "recipe"}
    assert load_recipe(REPO / "recipes" / "smoke" / "ppo-smollm2.yaml").deepspeed.precision == "auto"  # main job
    from rlhf_engine.config import DeepSpeedSection

    assert DeepSpeedSection().precision == "auto"  # the default


def test_auto_on_cpu_probes_the_models_shapes_and_records_the_numbers(capsys):
    recipe = load_recipe(TINY, ["deepspeed.precision=auto"])
    info = resolve_precision(recipe)
    assert info["chosen_by"] == "auto" and info["precision"] in ("fp32", "bf16_autocast")
    assert recipe.deepspeed.precision == info["precision"]  # resolved in place: DeepSpeed sees a real one
    probe = info["probe"]
    assert probe["shape"] == "112x64x128"  # micro-batch 2 x (48 prompt + 8 new) tokens, tiny-llama 64 x 128
    assert probe["fp32_ms"] > 0 and probe["bf16_ms"] > 0
    assert info["precision"] == choose(probe)
    assert f"[precision] auto -> {info['precision']}" in capsys.readouterr().out


def test_probe_times_both_dtypes():
    probe = probe_cpu(64, 32, 64, seconds=0.01)
    assert set(probe) == {"fp32_ms", "bf16_ms", "shape"} and probe["shape"] == "64x32x64"
