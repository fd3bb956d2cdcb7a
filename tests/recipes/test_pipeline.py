"""The tiny three-stage pipeline (SFT -> reward model -> PPO) through the real CLI, and its
stage-by-stage resume: a second run skips the finished stages, and an interrupted stage resumes."""
import subprocess
import sys

from rlhf_engine.pipeline import DONE
from rlhf_engine.tracking import read_jsonl
from helpers import REPO


def test_tiny_pipeline_chains_stages_and_skips_done_ones(tmp_path):
    cmd = [sys.executable, "-m", "rlhf_engine.cli", "train", "recipes/tiny/pipeline.yaml", f"--set=output_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("tiny-e2e-sft", "tiny-e2e-rm", "tiny-e2e-ppo"):
        assert (tmp_path / name / DONE).exists(), name
    assert (tmp_path / "tiny-e2e-sft" / "final" / "config.json").exists()
    assert (tmp_path / "tiny-e2e-rm" / "final" / "config.json").exists()
    recipe = (tmp_path / "tiny-e2e-ppo" / "recipe.yaml").read_text()
    assert f"{tmp_path}/tiny-e2e-sft/final" in recipe and f"{tmp_path}/tiny-e2e-rm/final" in recipe
    metrics = read_jsonl(tmp_path / "tiny-e2e-ppo" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss/value"] is not None for m in metrics)

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("done before, skipped") == 3

    # the reward stage as if cut off after its last checkpoint: the pipeline resumes it, skips the others
    (tmp_path / "tiny-e2e-rm" / DONE).unlink()
    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "(reward: tiny-e2e-rm): starting (resuming)" in resumed.stdout and "[resume] from" in resumed.stdout
    assert resumed.stdout.count("done before, skipped") == 2 and (tmp_path / "tiny-e2e-rm" / DONE).exists()
