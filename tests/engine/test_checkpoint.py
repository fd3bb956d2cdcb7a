"""engine/checkpoint.py: atomic save / prune / exact resume on 2 real ZeRO-3 ranks, then single-process export.

One launch of tests/engine/workers/ckpt_worker.py (see its docstring) writes the run; the export tests
rebuild Hugging Face folders from its ZeRO-3 shards and compare with outputs the engines produced.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_engine.checkpoint import CheckpointError, CheckpointManager, export_run
from rlhf_engine.cli import main as cli_main
from rlhf_engine.config import ModelConfig
from rlhf_engine.models import load_scalar_model, resolve_model_path
from ckpt_shared import RUN_NAME, checkpoint_run

ENGINES = ("actor", "critic", "lora")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir, results = checkpoint_run(tmp_path_factory)
    return workdir / RUN_NAME, results, torch.load(workdir / "reference.pt")


def snapshot_tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


# --------------------------------------------------------------------------------------------
# save / resume (2 ranks, ZeRO-3)
def test_keep_last_and_crashed_saves(run):
    run_dir, results, _ = run
    for r in results["saved"].values():
        assert r["kept"] == ["step-2", "step-3"]  # 3 saves, keep_last=2
        assert r["latest"] == r["auto"] == r["by_step"] == "step-3"  # .tmp-step-4 and unmarked step-5 ignored
        files = set(r["files"])
        for name in ENGINES:
            for rank in (0, 1):  # every rank's ZeRO shards: weights + optimizer
                assert f"engines/{name}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
            assert f"hf/{name}/config.json" in files
        assert {"COMPLETE", "trainer_state.json", "checkpoint.json", "rng/rank0.json", "rng/rank1.json",
                "tokenizer/tokenizer.json", "tokenizer/chat_template.jinja", "hf/lora/adapter_config.json"} <= files
    for r in results["resaved"].values():  # the next save removed the leftover and pruned step-2
        assert r["entries"] == ["step-3", "step-4", "step-5"] and r["latest"] == "step-4"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_resume_restores_everything_exactly(run):
    _, results, _ = run
    for rank, r in results["resume"].items():
        assert r["state"] == {"step": 3, "sampler": {"epoch": 0, "pos": 12}, "kl": {"value": 0.15000000000000002}}
        assert r["rng_same"], f"rank {rank}: python/numpy/torch RNG not restored"
        before = r["differed_before"]  # the fresh engines really started elsewhere
        assert not before["optim"] and not before["sched"] and before["global_steps"] == [3, 0]
        if rank == "0":
            assert before["weights"] is False
        for name in ENGINES:
            got = r["restored"][name]
            assert got["optim"] and got["optim_tensors"] == 3, f"rank {rank} {name}: optimizer state differs"
            assert got["sched"] and got["global_steps"] == [3, 3] and got["lr"][0] == got["lr"][1]
            if rank == "0":
                assert got["weights"], f"{name}: weights differ after load"
    for rank, r in results["continue"].items():  # the step after resume is the step that would have run
        assert r["losses"] == r["losses_resumed"]
        for name in ENGINES:
            assert r["after"][name]["optim"] and r["after"][name]["sched"]
            if rank == "0":
                assert r["after"][name]["weights"], f"{name}: step 4 after resume differs"


def test_resolve_errors_list_what_exists(run):
    run_dir, _, _ = run
    manager = CheckpointManager(run_dir, 2, is_main=True)
    assert manager.resolve("step-4") == run_dir / "checkpoints" / "step-4"
    with pytest.raises(CheckpointError, match=r"step-1: no such checkpoint.*available: step-3, step-4"):
        manager.resolve("step-1")
    with pytest.raises(CheckpointError, match=r"step-5 is incomplete \(no COMPLETE marker"):
        manager.resolve("step-5")
    assert CheckpointManager(run_dir.parent / "nowhere", 2, is_main=True).resolve("auto") is None


# --------------------------------------------------------------------------------------------
# export (single process, from ZeRO-3 shards)
def test_export_actor_gives_the_engine_logits(run, tmp_path):
    run_dir, _, ref = run
    out = export_run(run_dir, tmp_path / "actor", step=3)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md", "plots"} <= names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    diff = (logits - ref["actor_logits"]).abs().max().item()
    assert diff < 1e-5, f"exported actor logits differ from the engine's by {diff}"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    card = (out / "README.md").read_text()
    for needle in ("base model: `tiny-llama`".lower(), "data/sft.jsonl", "final metrics (step 3)", "loss/policy",
                   "score/mean", "](plots/loss_policy.png)", "zero_stage: 3", "pipeline_tag: text-generation"):
        assert needle in card.lower(), f"model card lacks {needle!r}"
    assert (out / "plots" / "loss_policy.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".tmp-*"))


def test_export_critic_is_a_seq_cls_model_with_the_same_scores(run, tmp_path):
    run_dir, _, ref = run
    out = export_run(run_dir, tmp_path / "critic", step=3, which="critic")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    ids = ref["input_ids"]
    with torch.no_grad():
        scores = model(input_ids=ids).logits[:, 0]
        reloaded = load_scalar_model(ModelConfig(name_or_path=str(out))).scores(ids, torch.ones_like(ids))
    assert torch.allclose(scores, ref["critic_scores"], atol=1e-5), (scores, ref["critic_scores"])
    assert torch.allclose(reloaded, ref["critic_scores"], atol=1e-5)
    assert "pipeline_tag: text-classification" in (out / "README.md").read_text()


def test_export_lora_merged_and_adapter(run, tmp_path):
    from peft import PeftModel

    run_dir, _, ref = run
    ids = ref["input_ids"]
    merged = export_run(run_dir, tmp_path / "merged", step=3, which="lora", merge_lora=True)
    keys = load_file(merged / "model.safetensors").keys()
    assert not any("lora" in k for k in keys) and "model.layers.0.self_attn.q_proj.weight" in keys
    with torch.no_grad():
        diff = (AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits - ref["lora_logits"]).abs().max()
    assert diff < 1e-4, f"merged LoRA logits differ by {diff}"

    adapter = export_run(run_dir, tmp_path / "adapter", step=3, which="lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    assert "--merge-lora" in (adapter / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(ModelConfig(name_or_path="tiny-llama")).path)
    with torch.no_grad():
        diff = (PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits - ref["lora_logits"]).abs().max()
    assert diff < 1e-5, f"adapter on the base model differs by {diff}"


def test_export_errors_name_the_problem_and_write_nothing(run, tmp_path, capsys):
    run_dir, _, _ = run
    empty_run = tmp_path / "runs" / "empty"
    empty_run.mkdir(parents=True)
    (empty_run / "recipe.yaml").write_text("name: empty\n")
    before = snapshot_tree(tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoints in .*empty/checkpoints; train with checkpoint.save_f"):
        export_run(empty_run, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"--step 1: no complete checkpoint step-1 .*available: step-3, step-4"):
        export_run(run_dir, tmp_path / "out", step=1)
    with pytest.raises(CheckpointError, match=r"--which reward: this checkpoint holds actor, critic, lora"):
        export_run(run_dir, tmp_path / "out", which="reward")
    assert snapshot_tree(tmp_path) == before  # nothing created

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"export target .*taken already exists and is not empty.*--overwrite"):
        export_run(run_dir, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    # the CLI turns these into exit code 2 with the message
    assert cli_main(["export", str(empty_run), "--out", str(tmp_path / "out")]) == 2
    assert "no checkpoints in" in capsys.readouterr().err
    assert cli_main(["export", str(run_dir), "--out", str(taken), "--overwrite", "--step", "4"]) == 0
    assert "keep.txt" not in {p.name for p in taken.iterdir()} and (taken / "model.safetensors").is_file()
