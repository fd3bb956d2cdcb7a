"""A run's console and its report: one line per model (the critic's new value head named in it, no
transformers LOAD REPORT table, no progress bars), and runs/<name>/report.md + report.png written at
the end; `rlhf-engine report A B` overlays two runs in one figure."""
import json
import shutil

from rlhf_engine import cli
from rlhf_engine.tracking import read_jsonl

from helpers import REPO


def test_quiet_console_run_report_and_overlay(tmp_path, capfd, restore_env):
    code = cli.main(["train", str(REPO / "recipes" / "tiny" / "ppo-zero3.yaml"), "--set", "deepspeed.zero_stage=0",
                     "--set", "deepspeed.precision=auto", "--set", "train.steps=2",
                     "--set", f"output_dir={tmp_path}"])
    out, err = capfd.readouterr()
    console = out + err
    assert code == 0, console[-3000:]
    models = [line for line in console.splitlines() if line.startswith("[model] ")]
    assert len(models) == 3, console  # actor, reference, critic: one line each
    critic = next(line for line in models if "LlamaForSequenceClassification" in line)
    assert "trained" in critic and "params" in critic and "ZeRO-0" in critic and "new (initialised): score" in critic
    assert "LOAD REPORT" not in console and "Loading weights" not in console
    assert "[precision] auto -> " in console

    run = tmp_path / "tiny-ppo-zero3"
    info = json.loads((run / "run.json").read_text())
    assert info["precision"]["chosen_by"] == "auto" and info["precision"]["probe"]["fp32_ms"] > 0
    assert info["summary"]["steps"] == 2
    report = (run / "report.md").read_text()
    assert (run / "report.png").stat().st_size > 10_000
    assert "![overview](report.png)" in report and "| eval score/mean |" in report
    assert "precision | " + info["precision"]["precision"] in report
    assert "**before training (step 0)**" in report and "**after training (step 2)**" in report
    assert "Write a sentence about cleaning the kitchen." in report  # the user turn, not the chat template

    # every logged metric has a line in the README's glossary
    glossary = (REPO / "README.md").read_text().split("### Metrics glossary", 1)[1].split("\n## ", 1)[0]
    logged = {k for name in ("metrics.jsonl", "eval.jsonl") for row in read_jsonl(run / name) for k in row} - {"step"}
    parts = {k for k in logged if k.startswith("reward/") and k != "reward/mean"}  # one reward of a list
    logged = logged - parts | ({"reward/<name>"} if parts else set())
    assert not [k for k in logged if f"`{k}`" not in glossary], "add these metrics to the README glossary"

    shutil.copytree(run, tmp_path / "other")
    (run / "report.md").unlink()
    assert cli.main(["report", str(run)]) == 0 and (run / "report.md").read_text() == report  # rebuilt as it was
    assert cli.main(["report", str(run), str(tmp_path / "other"), "--out", str(tmp_path / "cmp")]) == 0
    both = (tmp_path / "cmp" / "report.md").read_text()
    assert "# Run report: tiny-ppo-zero3 vs other" in both and "## other" in both
    assert (tmp_path / "cmp" / "report.png").exists()
