"""engine/models.py + engine/presets.py: presets, cache, tokenizer, policy, scalar models, ZeRO-3 loading.

Real models only: the embedded SmolLM2 (converted once into the shared default cache), MiniLM, and
the seeded tiny presets. Only the conversion test uses a private (tmp) cache.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rlhf_engine.config import LoraConfig, ModelConfig
from rlhf_engine.models import (ScalarModel, dtype_of, last_token_index, list_presets, load_policy, load_scalar_model,
                           load_tokenizer, resolve_model_path)
from rlhf_engine.presets import COMPLETE_MARKER, PRESETS, cache_root, cached_folder
from helpers import TEST_ENV, json_lines, run_deepspeed

SMOL = ModelConfig(name_or_path="smollm2-135m-instruct")
TINY = ModelConfig(name_or_path="tiny-llama")
WORKER = Path(__file__).parent / "workers" / "models_worker.py"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi", "A reward model reads this sentence."]


def _padded(tokenizer, side: str):
    tokenizer.padding_side = side
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    tokenizer.padding_side = "left"
    return batch["input_ids"], batch["attention_mask"]


# --------------------------------------------------------------------------------------------
# presets, tokenizer, generation
def test_presets_listed():
    names = [name for name, _ in list_presets()]
    assert names == list(PRESETS) and {"smollm2-135m-instruct", "minilm-l6", "tiny-llama", "tiny-bert"} <= set(names)
    assert all(desc for _, desc in list_presets())


def test_smollm2_tokenizer_pads_left_with_non_eos():
    tokenizer = load_tokenizer(SMOL)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left" and tokenizer.chat_template
    ids, mask = _padded(tokenizer, "left")
    assert (ids[1, :-2] == 0).all() and (mask[1, :-2] == 0).all() and mask[:, -1].all()


def test_smollm2_chat_generates_english():
    tokenizer = load_tokenizer(SMOL)
    policy = load_policy(SMOL, for_training=False)
    assert not policy.training and not any(p.requires_grad for p in policy.parameters())
    assert policy.config.pad_token_id == 0 and policy.generation_config.pad_token_id == 0
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = policy.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer  # a broken conversion (weights, template, rope) would not say this


def test_tiny_llama_preset_generates_and_is_deterministic():
    resolved = resolve_model_path(TINY)
    config = json.loads((Path(resolved.path) / "config.json").read_text())
    sizes = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size")
    assert [config[k] for k in sizes] == [2, 64, 4, 2, 128, 49152]
    tokenizer = load_tokenizer(TINY)
    assert len(tokenizer) == 49152 and tokenizer.pad_token_id == 0 and tokenizer.chat_template
    policy = load_policy(TINY, for_training=False)
    ids, mask = _padded(tokenizer, "left")
    out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (3, ids.shape[1] + 4)


def test_tiny_llama_rebuild_in_fresh_cache_has_same_weights(tmp_path):
    # tiny-llama needs the converted SmolLM2 tokenizer; link the shared one instead of converting again
    (tmp_path / "models").mkdir()
    os.symlink(resolve_model_path(SMOL).path, tmp_path / "models" / "smollm2-135m-instruct")
    fresh = resolve_model_path(TINY, cache_dir=str(tmp_path)).path
    shared = resolve_model_path(TINY).path
    with safe_open(Path(fresh) / "model.safetensors", "pt") as a, \
            safe_open(Path(shared) / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_minilm_and_tiny_bert_tokenizers():
    for name in ("minilm-l6", "tiny-bert"):
        tokenizer = load_tokenizer(ModelConfig(name_or_path=name))
        assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "left" and len(tokenizer) == 30522


# --------------------------------------------------------------------------------------------
# scalar models (critic / reward)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "minilm-l6"])
def test_scores_equal_for_left_right_and_no_padding(name):
    cfg = ModelConfig(name_or_path=name)
    tokenizer = load_tokenizer(cfg)
    model = load_scalar_model(cfg, init_head_seed=0).eval()
    with torch.no_grad():
        left = model.scores(*_padded(tokenizer, "left"))
        right = model.scores(*_padded(tokenizer, "right"))
        alone = torch.cat([model(**{k: v for k, v in tokenizer([t], return_tensors="pt").items()
                                     if k in ("input_ids", "attention_mask")}) for t in TEXTS])
    assert left.shape == (3,) and left.dtype == torch.float32
    assert left.abs().min() > 0 and len(set(left.tolist())) == 3  # a real, input-dependent score
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-4)


def test_causal_score_is_the_value_at_the_last_real_token():
    tokenizer = load_tokenizer(TINY)
    model = load_scalar_model(TINY, init_head_seed=0).eval()
    ids, mask = _padded(tokenizer, "right")
    with torch.no_grad():
        values = model.values(ids, mask)
        scores = model.scores(ids, mask)
        changed_pad = ids.clone()
        changed_pad[mask == 0] = 17  # what sits under padding must not matter
        assert torch.equal(model.scores(changed_pad, mask), scores)
    assert values.shape == ids.shape and values.dtype == torch.float32
    assert (values[mask == 0] == 0).all() and (values[mask == 1] != 0).all()
    last = last_token_index(mask)
    assert last.tolist() == (mask.sum(-1) - 1).tolist()
    torch.testing.assert_close(scores, values[torch.arange(3), last])


def test_critic_head_seeded_and_backbone_from_causal_lm():
    a = load_scalar_model(TINY, init_head_seed=3)
    b = load_scalar_model(TINY, init_head_seed=3)
    c = load_scalar_model(TINY, init_head_seed=4)
    head = lambda m: m.hf_model.score.weight  # noqa: E731
    assert torch.equal(head(a), head(b)) and not torch.equal(head(a), head(c))
    policy = load_policy(TINY, for_training=False)
    torch.testing.assert_close(a.hf_model.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    torch.testing.assert_close(a.hf_model.model.layers[1].mlp.up_proj.weight, policy.model.layers[1].mlp.up_proj.weight)


def test_scalar_model_saves_and_reloads_as_one_hf_model(tmp_path):
    tokenizer = load_tokenizer(TINY)
    model = load_scalar_model(TINY, init_head_seed=5).eval()
    with torch.no_grad():
        model.hf_model.score.weight.mul_(10.0)  # "trained": differs from any fresh seeded head
    model.hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_scalar_model(ModelConfig(name_or_path=str(tmp_path)), init_head_seed=99).eval()
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    ids, mask = _padded(tokenizer, "left")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.scores(ids, mask), model.scores(ids, mask))


def test_encoder_has_no_per_token_values_and_is_no_policy():
    bert = ModelConfig(name_or_path="tiny-bert")
    model = load_scalar_model(bert, init_head_seed=0)
    assert isinstance(model, ScalarModel) and model.encoder
    with pytest.raises(ValueError, match="causal LM backbone"):
        model.values(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="not a causal or encoder-decoder language model"):
        load_policy(ModelConfig(name_or_path="minilm-l6"))


# --------------------------------------------------------------------------------------------
# options: LoRA, checkpointing, dtype, attention
def test_lora_policy_trains_only_adapters_with_checkpointing():
    cfg = TINY.model_copy(update={"lora": LoraConfig(r=4, alpha=8), "gradient_checkpointing": True})
    policy = load_policy(cfg)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("mlp.down_proj.lora_A" in n for n in trainable)  # 'all-linear' reaches the MLP too
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    assert policy.get_base_model().is_activation_checkpointing
    ids = torch.randint(3, 1000, (2, 12))
    policy.train()
    policy(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert grads and grads <= set(trainable)


def test_lora_scalar_model_trains_adapters_and_head():
    cfg = TINY.model_copy(update={"lora": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])})
    model = load_scalar_model(cfg, init_head_seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    heads = [n for n in trainable if "lora_" not in n]
    assert heads and all("score" in n for n in heads)
    assert all("q_proj" in n or "v_proj" in n for n in trainable if "lora_" in n)
    ids = torch.randint(3, 1000, (2, 8))
    assert model(ids, torch.ones_like(ids)).shape == (2,)


def test_bf16_weights_float32_outputs():
    policy = load_policy(TINY, dtype="bf16", for_training=False)
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    scalar = load_scalar_model(TINY.model_copy(update={"dtype": "bf16"}), init_head_seed=0)
    assert scalar.hf_model.score.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 1000, (2, 8))
    assert policy(input_ids=ids).logits.dtype == torch.bfloat16
    assert scalar(ids, torch.ones_like(ids)).dtype == torch.float32
    assert dtype_of("fp16") == torch.float16
    with pytest.raises(ValueError, match="expected one of fp32, bf16, fp16"):
        dtype_of("float8")


def test_flash_attention_without_cuda_is_a_clear_error():
    cfg = TINY.model_copy(update={"attn_implementation": "flash_attention_2"})
    with pytest.raises(ValueError, match=r"flash_attention_2' needs CUDA.*use 'sdpa'"):
        load_policy(cfg)


# --------------------------------------------------------------------------------------------
# resolving names: errors, hub cache, .gguf, conversion cache
def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruc"))
    msg = str(err.value)
    assert "not a preset, not a local folder and not in the Hugging Face cache (offline)" in msg
    assert "hf download smollm2-135m-instruc" in msg and "model.name_or_path to a local folder" in msg
    assert "Did you mean the preset 'smollm2-135m-instruct'" in msg


def test_bad_local_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "missing" / "model")))
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(ValueError, match="GGUF file not found"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path), gguf_file="nope.gguf"))


def test_hub_id_resolves_offline_from_the_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/files}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--test-org--tiny-llama"
    shutil.copytree(resolve_model_path(TINY).path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name_or_path="test-org/tiny-llama")
    resolved = resolve_model_path(cfg)
    assert resolved.source == "hub" and resolved.path == str(repo / "snapshots" / commit)
    assert load_policy(cfg, for_training=False).config.num_hidden_layers == 2


def test_cached_folder_is_atomic_and_built_once(tmp_path):
    def failing(out: Path):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-build")

    with pytest.raises(RuntimeError, match="crash mid-build"):
        cached_folder(tmp_path, "thing", failing, "test")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".thing.lock"]  # no half folder, no tmp

    calls = []

    def slow(out: Path):
        calls.append(1)
        time.sleep(0.5)
        (out / "weights.bin").write_bytes(b"ok")

    results = []
    threads = [threading.Thread(target=lambda: results.append(cached_folder(tmp_path, "thing", slow, "test")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1] == tmp_path / "models" / "thing"
    assert (results[0] / "weights.bin").read_bytes() == b"ok" and (results[0] / COMPLETE_MARKER).is_file()


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_ENGINE_CACHE", str(tmp_path / "env"))
    assert cache_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("RLHF_ENGINE_CACHE")
    assert cache_root() == Path("~/.cache/rlhf-engine").expanduser()


def test_smollm2_conversion_is_cached_in_a_clean_folder(tmp_path, monkeypatch):
    shared = Path(resolve_model_path(SMOL).path)  # the shared cache, before the env var points elsewhere
    monkeypatch.setenv("RLHF_ENGINE_CACHE", str(tmp_path))  # the env var picks the (private) cache
    start = time.perf_counter()
    first = resolve_model_path(SMOL)
    convert_s = time.perf_counter() - start
    folder = Path(first.path)
    assert folder == tmp_path / "models" / "smollm2-135m-instruct" and first.gguf_file is None
    assert sorted(p.name for p in folder.parent.iterdir()) == [".smollm2-135m-instruct.lock", "smollm2-135m-instruct"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["pad_token_id"] == 0
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", COMPLETE_MARKER} <= {
        p.name for p in folder.iterdir()}
    start = time.perf_counter()
    second = resolve_model_path(SMOL)
    assert second == first and time.perf_counter() - start < 0.5 < convert_s
    # the same weights as the shared cache: the conversion is deterministic
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(folder / "model.safetensors", "pt") as a, safe_open(shared / "model.safetensors", "pt") as b:
        assert a.get_tensor(name).dtype == torch.float32 and a.get_tensor(name).shape == (576, 576)
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))


# --------------------------------------------------------------------------------------------
def test_zero3_two_ranks(tmp_path):
    """ZeRO-3 construction: race-free cache build, seeded partitioned head, LoRA starts at B = 0."""
    run_deepspeed(WORKER, str(tmp_path))
    rows = [json.loads(line) for f in sorted(tmp_path.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
    by = lambda check: sorted((r for r in rows if r["check"] == check), key=lambda r: r["rank"])  # noqa: E731
    race, solo, scalar, lora = by("race"), by("rank1_build"), by("scalar"), by("lora")
    assert len(race) == len(solo) == len(scalar) == len(lora) == 2
    # built by rank 1 alone: the whole model is there, not just the tokenizer
    assert {"config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER} <= set(solo[0]["files"])
    assert race[0]["folder"] == race[1]["folder"] and race[0]["entries"] == [".tiny-bert.lock", "tiny-bert"]
    built = Path(race[0]["folder"]) / "model.safetensors"
    with safe_open(built, "pt") as a, safe_open(Path(resolve_model_path(
            ModelConfig(name_or_path="tiny-bert")).path) / "model.safetensors", "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in b.keys())  # saved whole, not shards

    assert all(r["all_partitioned"] and r["local_numels"] == [0] for r in scalar)
    assert scalar[0]["scores"] == scalar[1]["scores"] and scalar[0]["values_shape"] == [2, 10]
    # the same seeded head as a plain (unpartitioned) load
    tokenizer = load_tokenizer(TINY)
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Hello!"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = load_scalar_model(TINY, init_head_seed=7).scores(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(torch.tensor(scalar[0]["scores"]), expected, atol=1e-5, rtol=1e-4)

    for r in lora:
        assert r["trainable"] and all("lora_" in n for n in r["trainable"]) and r["gradient_checkpointing"]
        assert r["lora_b_before"] == 0.0 < r["lora_b_after"]  # adapters start as a no-op, then train


ZERO3_FIRST_IMPORT = """
import json, sys
import torch
from rlhf_engine.config import ModelConfig
from rlhf_engine.distributed import init_distributed, zero_init_context
from rlhf_engine.models import import_model_classes

folder = sys.argv[1]
init_distributed(1)
assert "transformers.models.qwen2.modeling_qwen2" not in sys.modules  # first imported below
import_model_classes([ModelConfig(name_or_path=folder)])
from transformers import AutoModelForCausalLM
with zero_init_context({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}):
    model = AutoModelForCausalLM.from_pretrained(folder)
whole = AutoModelForCausalLM.from_pretrained(folder)  # built after the context (a frozen stage-0 model)
logits = whole(torch.tensor([[1, 2, 3]])).logits
print("RESULT " + json.dumps({"finite": bool(torch.isfinite(logits).all())}))
"""


def test_a_model_class_first_imported_for_zero3_keeps_its_kernel_wrappers(tmp_path):
    """deepspeed.zero.Init puts back the __init__ a class was created with; transformers' attention layers
    carry Hugging Face kernels' decorator, whose __init__ was lost for models built after the context when
    the modeling module was first imported inside it. import_model_classes (run start) imports it before."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", ZERO3_FIRST_IMPORT, str(tmp_path / "qwen")], cwd=tmp_path,
                          env={**env, **TEST_ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json_lines(proc.stdout, "RESULT ")[0] == {"finite": True}
