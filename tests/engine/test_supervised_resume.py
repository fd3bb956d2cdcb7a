"""SFT and reward-model runs keep RL's checkpoint guarantees: kill -9 both ranks of a 2-rank ZeRO-3 run
after a checkpoint, `--resume auto`, and get the uninterrupted run's metrics step for step; the run
exports (`rlhf-engine export`) as a causal LM / a sequence-classification model that transformers
loads and that scores as in training."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_engine.checkpoint import export_run
from rlhf_engine.config import load_recipe
from rlhf_engine.data import collate_pairs, load_preferences
from rlhf_engine.tracking import read_jsonl
from helpers import REPO, deepspeed_cmd, kill_when, run_deepspeed

CASES = {"sft": ("recipes/tiny/sft-zero3.yaml", ("loss/train", "grad_norm")),
         "reward": ("recipes/tiny/rm.yaml", ("loss/train", "accuracy/train", "margin/train", "grad_norm"))}
COMMON = ("train.steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=2", "train.eval_every=2")


def launch_args(recipe, tmp_path, name):
    return [recipe, f"--set=output_dir={tmp_path}", f"--set=name={name}", *[f"--set={o}" for o in COMMON]]


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_kill9_resume_and_export(tmp_path, stage):
    recipe, compared = CASES[stage]
    run_deepspeed("launch/train.py", *launch_args(recipe, tmp_path, "full"))
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")

    kill_when(deepspeed_cmd("launch/train.py", *launch_args(recipe, tmp_path, "killed")),
              tmp_path / "killed/checkpoints/step-2/COMPLETE")
    run_deepspeed("launch/train.py", *launch_args(recipe, tmp_path, "killed"), "--resume=auto")
    resumed = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for key in compared:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    evals = [e["step"] for e in read_jsonl(tmp_path / "killed" / "eval.jsonl")]
    assert evals == [0, 2, 4]  # no duplicated rows from the interrupted attempt
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-3", "step-4"]

    out = export_run(tmp_path / "full", tmp_path / "export")
    cfg = load_recipe(REPO / recipe)
    final_eval = read_jsonl(tmp_path / "full" / "eval.jsonl")[-1]
    if stage == "sft":
        model = AutoModelForCausalLM.from_pretrained(out)
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")
        for (k, v), (_, w) in zip(model.state_dict().items(), reference.state_dict().items()):
            torch.testing.assert_close(v, w, rtol=0, atol=1e-6, msg=k)
        return
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    _, held, _ = load_preferences(cfg.data, tokenizer, cfg.seed)
    batch = collate_pairs([held[i] for i in range(cfg.train.eval_size)], tokenizer.pad_token_id)
    with torch.no_grad():
        chosen = model(input_ids=batch["chosen_ids"], attention_mask=batch["chosen_mask"]).logits[:, 0]
        rejected = model(input_ids=batch["rejected_ids"], attention_mask=batch["rejected_mask"]).logits[:, 0]
    assert float((chosen > rejected).float().mean()) == pytest.approx(final_eval["accuracy"], abs=1e-6)
    assert float((chosen - rejected).mean()) == pytest.approx(final_eval["margin"], abs=1e-4)
