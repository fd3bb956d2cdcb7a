"""Every shipped recipe validates, opens with a header, and its batch sizes divide for the world
size its own launch command uses."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_engine.config import derive_batch_sizes, load_recipe
from rlhf_engine.pipeline import is_pipeline, load_pipeline

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml"))


def launch_world_size(text: str) -> int:
    """World size from the header's launch command: --num_gpus x --num_nodes (1 if neither is given)."""
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    gpus = re.search(r"--num_gpus\s+(\d+)", header)
    nodes = re.search(r"--num_nodes\s+(\d+)", header)
    if gpus:
        return int(gpus.group(1)) * (int(nodes.group(1)) if nodes else 1)
    return 1


def test_recipes_exist():
    assert len(RECIPES) >= 5, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_validates_with_header(path):
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and text.startswith("#"), f"{path} must open with a header comment"
    joined = "\n".join(header).lower()
    for word in ("hardware", "launch"):
        assert word in joined, f"{path}: header lacks '{word}'"
    if is_pipeline(path):
        _, stages = load_pipeline(path)
        recipes = [recipe for _, _, recipe in stages]
        assert len(recipes) >= 2
    else:
        recipes = [load_recipe(path)]
    for recipe in recipes:
        sizes = derive_batch_sizes(recipe, launch_world_size(text))
        assert sizes.gradient_accumulation_steps >= 1
    if "/gpu/" in str(path):
        assert "memory" in joined, f"{path}: GPU recipes state their expected memory per GPU"


def test_cli_validate_accepts_every_recipe(tmp_path):
    """One `validate` call checks the whole tree; a bad recipe among good ones is named and fails the call."""
    out = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "validate", *map(str, RECIPES)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("# ---- ") == len(RECIPES)
    assert out.stdout.count("stage:") >= len(RECIPES)
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "recipes/tiny/rm.yaml").read_text().replace("stage: reward", "stage: reward\ntrain_steps: 3"))
    out = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "validate", str(RECIPES[0]), str(bad)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert str(bad) in out.stderr and "train_steps" in out.stderr and "1 of 2 recipes" in out.stderr, out.stderr