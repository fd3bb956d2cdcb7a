"""Nothing a user types destroys data, and bad input ends in one clean line (exit code 2) naming the
file / key / line: strict types, non-UTF-8 files, missing data / model / reward files, an unwritable
output_dir, export --overwrite onto the run, `--resume auto` without a checkpoint, a retry with bad
input, and preference pairs whose chosen == rejected."""
import json

import pytest

from rlhf_engine.cli import main as cli
from rlhf_engine.config import load_recipe
from rlhf_engine.data import load_preferences
from rlhf_engine.models import load_tokenizer
from rlhf_engine.sft import train_sft
from rlhf_engine.tracking import read_jsonl
from helpers import REPO

SFT = str(REPO / "recipes/tiny/sft-zero3.yaml")
PPO = str(REPO / "recipes/tiny/ppo-zero3.yaml")
FAST = ["--set", "deepspeed.zero_stage=0", "--set", "train.steps=1", "--set", "train.eval_size=2",
        "--set", "data.limit=24", "--set", "data.eval_size=2", "--set", "num_threads=2"]


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("value, ok", [("true", False), ("'3'", False), ("3", True)])
def test_values_are_not_coerced(capsys, value, ok):
    code, text = run_cli(capsys, "validate", SFT, "--set", f"train.steps={value}", "--set", "optim.lr=3e-3")
    assert code == (0 if ok else 2), text
    if not ok:
        assert "train.steps" in text and "valid integer" in text


def test_non_utf8_recipe_and_data_name_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(open(SFT, "rb").read() + b"# caf\xe9\n")
    code, text = run_cli(capsys, "validate", str(recipe))
    assert code == 2 and f"{recipe}, line {len(open(SFT).read().splitlines()) + 1}" in text, text
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    code, text = run_cli(capsys, "validate", SFT, "--set", f"data.path={data}")
    assert code == 2 and f"{data}, line 2" in text and "UTF-8" in text, text


@pytest.mark.parametrize("override, named", [
    ("data.path=/nonexistent/rows.jsonl", "data.path"),
    ("model.name_or_path=./no-such-model", "model.name_or_path"),
    ("reward.function=no_such_file.py:score", "reward.function"),
])
def test_validate_checks_that_inputs_exist(capsys, override, named):
    args = ["validate", PPO, "--set", override]
    if override.startswith("reward."):
        args += ["--set", "reward.type=callable", "--set", "reward.kwargs={}"]
    code, text = run_cli(capsys, *args)
    assert code == 2 and named in text and "Traceback" not in text, text


def test_unwritable_output_dir_fails_first(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, text = run_cli(capsys, "train", SFT, "--set", f"output_dir={blocker}/runs")
    assert code == 2 and "output_dir" in text and "[data]" not in text, text


def test_runs_keep_user_data_safe(tmp_path, capsys, restore_env, monkeypatch):
    args = [*FAST, "--set", f"output_dir={tmp_path}/runs", "--set", "name=r"]
    recipe = load_recipe(SFT, [a for a in args if a != "--set"])
    run = tmp_path / "runs" / "r"
    # --resume auto with no checkpoint: said, and a clean start (no duplicate rows)
    train_sft(recipe.model_copy(update={"checkpoint": recipe.checkpoint.model_copy(update={"save_final": False})}))
    train_sft(recipe, resume="auto")
    assert "no complete checkpoint" in capsys.readouterr().out
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1]
    # a retry with a bad input fails before the earlier run is touched
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    code, text = run_cli(capsys, "train", SFT, *args, "--set", "data.path=/nonexistent.jsonl")
    assert code == 2 and sorted(p.name for p in (tmp_path / "runs").iterdir()) == before
    assert (run / "checkpoints" / "step-1" / "COMPLETE").is_file()
    # export --overwrite never deletes the run, a folder holding it, or the working folder
    monkeypatch.chdir(tmp_path)
    for target in (run, tmp_path / "runs", tmp_path):
        code, text = run_cli(capsys, "export", str(run), "--out", str(target), "--overwrite")
        assert code == 2 and "would delete" in text, text
    assert (run / "checkpoints" / "step-1" / "COMPLETE").is_file()
    # RNG state is plain JSON
    assert json.loads((run / "checkpoints/step-1/rng/rank0.json").read_text())["torch"]


def test_identical_preference_pairs_are_dropped_with_a_count(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no" if i % 3 else "yes"} for i in range(9)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(REPO / "recipes/tiny/rm.yaml", [f"data.path={path}", "data.limit=9", "data.eval_size=0"])
    train, _, report = load_preferences(recipe.data, load_tokenizer(recipe.model), recipe.seed)
    assert len(train) == 6 and report.dropped_identical == 3 and report.dropped_too_long == 0
    assert "3 dropped with chosen == rejected" in str(report)
