"""Datasets for the three stages: prompts (RL), preference pairs (reward model), prompt/response rows (SFT).

Pipeline: ``read_rows`` (JSONL / JSON / CSV / parquet file or a ``datasets`` name; every row keeps its
source "file:line N" for errors) -> seeded shuffle -> ``limit`` -> field mapping and checks
(``data.fields``) -> chat template -> tokenize -> too-long rows dropped or truncated -> eval split.

A prompt is either plain text (column ``prompt``) or chat messages (column ``messages``: a list of
{role, content}). For RL prompts and preference pairs the messages are the prompt (trailing assistant
turns are removed); for SFT the last assistant message is the response. Responses are appended to the
rendered prompt and end with the EOS token, so the model learns to stop. RL prompt rows may also carry
``references`` (one string or a list: the texts a reward or metric compares the response with) and
``meta`` (any JSON value, handed to rewards and metrics as is).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch.utils.data import Dataset

from rlhf_engine.config import DatasetConfig, RecipeError, read_utf8

log = logging.getLogger(__name__)
Messages = list[dict]
Prompt = Union[str, Messages]
OUR_FIELDS = "prompt, response, chosen, rejected, messages, margin, references, meta"


class DataError(RecipeError):
    """Bad data or data settings; the message names the file and line (or recipe key) and the fix."""


class Row(dict):
    """One input row (column -> value) plus ``source`` ("file:line N") used in error messages."""

    def __init__(self, values: dict, source: str):
        super().__init__(values)
        self.source = source


@dataclass
class DataReport:
    """What happened to the rows. ``rows`` = rows taken from the source (after ``limit``);
    ``kept`` = rows in train + eval; ``eval_rows`` of them are held out."""

    rows: int
    kept: int
    dropped_too_long: int
    truncated: int
    eval_rows: int
    dropped_identical: int = 0  # preference pairs whose chosen == rejected (no preference to learn)

    def __str__(self) -> str:
        return (f"{self.rows} rows read, {self.kept} kept ({self.kept - self.eval_rows} train / {self.eval_rows} eval), "
                f"{self.dropped_too_long} dropped as too long, {self.truncated} truncated"
                + (f", {self.dropped_identical} dropped with chosen == rejected" if self.dropped_identical else ""))


# --------------------------------------------------------------------------------------------
# reading
def _as_row(obj: Any, source: str) -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected an object of fields ({{\"prompt\": ...}}), got {type(obj).__name__}")
    return Row(obj, source)


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    for n, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:line {n}: not valid JSON ({e.msg}); each line must hold one JSON object") from None
        rows.append(_as_row(obj, f"{path}:line {n}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved with a .json name
            return _read_jsonl(path)
        raise DataError(f"{path}:line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrapper
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects (or JSON lines), got {type(data).__name__}")
    return [_as_row(obj, f"{path}:index {i}") for i, obj in enumerate(data)]


def _read_csv(path: Path) -> list[Row]:
    # data row i sits on line i + 1 (the header is line 1)
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    return [Row(rec, f"{path}:line {i + 1}") for i, rec in enumerate(reader, 1)]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    return [Row(rec, f"{path}:row {i}") for i, rec in enumerate(pq.read_table(path).to_pylist())]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
            ".pq": _read_parquet}


def _read_datasets(cfg: DatasetConfig) -> list[Row]:
    try:
        import datasets

        ds = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split)
    except Exception as e:  # network, cache, missing split, ...: all end in one actionable message
        offline = any(os.environ.get(k, "0") not in ("0", "") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        hint = ("offline mode is on and it is not in the datasets cache: download it once with network access, "
                "or " if offline else "")
        raise DataError(f"data.path '{cfg.path}' is not a local file, and loading it with datasets.load_dataset("
                        f"{cfg.path!r}, {cfg.subset!r}, split={cfg.split!r}) failed ({type(e).__name__}: {e}); {hint}"
                        f"point data.path to a .jsonl/.json/.csv/.parquet file, or fix data.subset / data.split") from None
    return [Row(rec, f"{cfg.path}[{cfg.split}]:row {i}") for i, rec in enumerate(ds)]


def read_rows(cfg: DatasetConfig) -> list[Row]:
    """All rows of ``cfg.path``: a local file chosen by extension, else a ``datasets`` name or folder."""
    path = Path(cfg.path)
    reader = _READERS.get(path.suffix.lower())
    if path.is_file():
        if reader is None:
            raise DataError(f"data.path {path}: unknown file type '{path.suffix}'; use .jsonl, .json, .csv or .parquet")
        rows = reader(path)
    elif reader is not None:
        raise DataError(f"data.path: file not found: {path} (a relative path is resolved against the recipe's folder)")
    else:
        rows = _read_datasets(cfg)
    if not rows:
        raise DataError(f"data.path {cfg.path}: no rows found")
    return rows


# --------------------------------------------------------------------------------------------
# fields
def _column(cfg: DatasetConfig, ours: str) -> str:
    return cfg.fields.get(ours, ours)


def _bad(row: Row, cfg: DatasetConfig, ours: str, expected: str, problem: str) -> DataError:
    col = _column(cfg, ours)
    via = f" (column '{col}', mapped in data.fields)" if col != ours else ""
    return DataError(f"{row.source}: field '{ours}'{via} {problem}; expected {expected}. The row has fields "
                     f"{sorted(map(str, row))}. Map our field names ({OUR_FIELDS}) to your columns with "
                     f"`data.fields` in the recipe, e.g. fields: {{{ours}: your_column}}")


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _messages(row: Row, cfg: DatasetConfig, ours: str, value: Any) -> Messages:
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    expected = "a non-empty list of {role, content} messages with non-empty string content"
    if value is None:
        raise _bad(row, cfg, ours, expected, "is missing")
    ok = isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        and m["content"].strip() for m in value)
    if not ok:
        raise _bad(row, cfg, ours, expected, f"is {_short(value)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(row: Row, cfg: DatasetConfig, ours: str, expected: str = "a non-empty string") -> str:
    """A non-empty string field; a message list (conversational format) gives its last message."""
    value = row.get(_column(cfg, ours))
    if value is None:
        raise _bad(row, cfg, ours, expected, "is missing")
    if isinstance(value, list):
        value = _messages(row, cfg, ours, value)[-1]["content"]
    if not isinstance(value, str):
        raise _bad(row, cfg, ours, expected, f"has type {type(value).__name__}")
    if not value.strip():
        raise _bad(row, cfg, ours, expected, "is empty")
    return value


def _uses_messages(row: Row, cfg: DatasetConfig) -> bool:
    if "messages" in cfg.fields or "prompt" in cfg.fields:
        return "messages" in cfg.fields
    return _column(cfg, "prompt") not in row and _column(cfg, "messages") in row


def _prompt(row: Row, cfg: DatasetConfig) -> Prompt:
    """The prompt of a row: plain text, or messages with trailing assistant turns removed."""
    if _uses_messages(row, cfg):
        messages = _messages(row, cfg, "messages", row.get(_column(cfg, "messages")))
    elif isinstance(row.get(_column(cfg, "prompt")), list):
        messages = _messages(row, cfg, "prompt", row[_column(cfg, "prompt")])
    else:
        return _text(row, cfg, "prompt", "a non-empty string (or a 'messages' column of {role, content} lists)")
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise _bad(row, cfg, "messages", "at least one user message", "holds only assistant messages")
    return messages


def _margin(row: Row, cfg: DatasetConfig) -> Optional[float]:
    value = row.get(_column(cfg, "margin"))
    if value is None or value == "":
        if "margin" in cfg.fields:
            raise _bad(row, cfg, "margin", "a number", "is missing")
        return None
    try:
        return float(value)  # CSV cells are strings
    except (TypeError, ValueError):
        raise _bad(row, cfg, "margin", "a number", f"is {_short(value)}") from None


def _references(row: Row, cfg: DatasetConfig) -> list[str]:
    """The row's reference texts: a string or a list of strings (CSV: a JSON list); [] when absent and unmapped."""
    value = row.get(_column(cfg, "references"))
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    expected = "a non-empty string or a list of non-empty strings"
    if value is None or value == "":
        if "references" in cfg.fields:
            raise _bad(row, cfg, "references", expected, "is missing")
        return []
    refs = [value] if isinstance(value, str) else value
    if not (isinstance(refs, list) and refs and all(isinstance(t, str) and t.strip() for t in refs)):
        raise _bad(row, cfg, "references", expected, f"is {_short(value)}")
    return list(refs)


def _meta(row: Row, cfg: DatasetConfig) -> Any:
    """The row's meta data (any JSON value), None when absent; an explicitly mapped column must exist."""
    value = row.get(_column(cfg, "meta"))
    if _column(cfg, "meta") not in row and "meta" in cfg.fields:
        raise _bad(row, cfg, "meta", "any value (e.g. an object)", "is missing")
    return value


# --------------------------------------------------------------------------------------------
# chat template and tokenization
_warned: set = set()


def _templated(tokenizer, chat_template: bool) -> bool:
    if chat_template and getattr(tokenizer, "chat_template", None) is None and "no-template" not in _warned:
        _warned.add("no-template")
        log.warning("data.chat_template is true but the tokenizer has no chat template: plain-text prompts are used as is")
    return chat_template and getattr(tokenizer, "chat_template", None) is not None


def render_prompt(tokenizer, text_or_messages: Prompt, *, system_prompt: Optional[str] = None,
                  chat_template: bool = True, add_generation_prompt: bool = True) -> str:
    """The prompt as the model sees it (text, before tokenization).

    Plain text goes through the tokenizer's chat template as one user message when ``chat_template``
    (the generation prompt, e.g. "<|im_start|>assistant\\n", is added for generation); without a template
    the text is used as is, after ``system_prompt`` and a blank line. Messages always need a template.
    """
    is_messages = isinstance(text_or_messages, list)
    if not _templated(tokenizer, chat_template or is_messages):
        if is_messages:
            raise DataError("chat messages need a chat template: set data.chat_template: true and use a tokenizer "
                            "that has one (model.tokenizer), or give plain-text prompts")
        return f"{system_prompt}\n\n{text_or_messages}" if system_prompt else text_or_messages
    messages = list(text_or_messages) if is_messages else [{"role": "user", "content": text_or_messages}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_rendered(tokenizer, text: str, templated: bool) -> list[int]:
    """Token ids of a rendered prompt. A chat template already wrote BOS and friends: add nothing."""
    if templated:
        return tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids
    eos = tokenizer.eos_token
    if ids and ids[-1] == tokenizer.eos_token_id and not (eos and text.endswith(eos)):
        ids = ids[:-1]  # tokenizers that append EOS: a prompt must leave the answer open
    return ids


def _own_text(prompt: Prompt) -> str:
    """The text the user wrote: plain text, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])


def _with_own_text(prompt: Prompt, text: str) -> Prompt:
    if isinstance(prompt, str):
        return text
    i = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=len(prompt) - 1)
    return prompt[:i] + [{**prompt[i], "content": text}] + prompt[i + 1:]


def _fit_prompt(tokenizer, cfg: DatasetConfig, prompt: Prompt, budget: int):
    """(rendered text, ids, truncated) within ``budget`` tokens, or None when the row must be dropped.
    Truncation shortens the user's own text (keeping its start) and re-renders, so the template stays whole."""
    templated = _templated(tokenizer, cfg.chat_template or isinstance(prompt, list))

    def build(p):
        text = render_prompt(tokenizer, p, system_prompt=cfg.system_prompt, chat_template=cfg.chat_template)
        return text, _encode_rendered(tokenizer, text, templated)

    text, ids = build(prompt)
    if len(ids) <= budget:
        return text, ids, False
    if cfg.overflow == "drop":
        return None
    own = tokenizer(_own_text(prompt), add_special_tokens=False).input_ids
    keep = len(own) - (len(ids) - budget)
    for _ in range(4):  # token boundaries may shift after decoding; a few passes settle it
        if keep <= 0:
            return None  # the template alone is over budget
        text, ids = build(_with_own_text(prompt, tokenizer.decode(own[:keep])))
        if len(ids) <= budget:
            return text, ids, True
        keep -= len(ids) - budget
    return None


def _encode_response(tokenizer, text: str) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one (set model.tokenizer)")
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def _fit_response(cfg: DatasetConfig, prompt_len: int, response_ids: list[int]):
    """(ids, truncated) so that prompt + response fit ``max_length``, or None to drop the row."""
    room = cfg.max_length - prompt_len
    if len(response_ids) <= room:
        return response_ids, False
    if cfg.overflow == "drop" or room <= 0:
        return None
    return response_ids[:room], True  # a cut response has no EOS: it did not end


# --------------------------------------------------------------------------------------------
# datasets and loaders
class _Items(Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PromptDataset(_Items):
    """Items: {"input_ids": list[int], "prompt": rendered text, "raw": the user's own prompt text,
    "references": list[str] (may be empty), "meta": any JSON value or None}."""


class PreferenceDataset(_Items):
    """Items: {"chosen_ids", "rejected_ids": prompt + response + EOS ids, "prompt_len": int,
    "prompt": rendered text, "margin": float or None}."""


class SFTDataset(_Items):
    """Items: {"input_ids": prompt + response + EOS ids, "prompt_len": int, "prompt": rendered text}."""


def _load(cfg: DatasetConfig, seed: int, make_item: Callable[[Row], Optional[tuple[dict, bool]]], cls):
    rows = read_rows(cfg)
    if cfg.shuffle:
        random.Random(seed).shuffle(rows)
    rows = rows[:cfg.limit]
    items, dropped, truncated = [], 0, 0
    for row in rows:
        made = make_item(row)
        if made is None:
            dropped += 1
            continue
        items.append(made[0])
        truncated += made[1]
    kept = len(items)
    if kept == 0:
        raise DataError(f"{cfg.path}: all {len(rows)} rows are longer than data.max_prompt_length "
                        f"({cfg.max_prompt_length}) / data.max_length ({cfg.max_length}); raise them or set "
                        f"data.overflow: truncate")
    if cfg.eval_size is not None:
        n_eval = cfg.eval_size
    else:
        n_eval = max(1, round(kept * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
    if n_eval >= kept:
        raise DataError(f"{cfg.path}: data.eval_size / data.eval_fraction hold out {n_eval} of the {kept} kept rows, "
                        f"leaving none to train on; lower it")
    report = DataReport(rows=len(rows), kept=kept, dropped_too_long=dropped, truncated=truncated, eval_rows=n_eval)
    log.info("%s: %s", cfg.path, report)
    train, held = items[:kept - n_eval], items[kept - n_eval:]
    return cls(train), (cls(held) if n_eval else None), report


def load_prompts(cfg: DatasetConfig, tokenizer, seed: int):
    """RL prompts -> (train PromptDataset, eval PromptDataset or None, DataReport).
    Prompts are rendered with the generation prompt and fit ``max_prompt_length`` tokens."""

    def make(row: Row):
        prompt = _prompt(row, cfg)
        fit = _fit_prompt(tokenizer, cfg, prompt, cfg.max_prompt_length)
        if fit is None:
            return None
        text, ids, cut = fit
        return {"input_ids": ids, "prompt": text, "raw": _own_text(prompt), "references": _references(row, cfg),
                "meta": _meta(row, cfg)}, cut

    return _load(cfg, seed, make, PromptDataset)


def _prompt_budget(cfg: DatasetConfig) -> int:
    return min(cfg.max_prompt_length, cfg.max_length - 1)  # leave room for at least one response token


def load_preferences(cfg: DatasetConfig, tokenizer, seed: int):
    """Preference pairs (prompt, chosen, rejected, optional margin) ->
    (train PreferenceDataset, eval PreferenceDataset or None, DataReport)."""

    identical = []

    def make(row: Row):
        prompt = _prompt(row, cfg)
        chosen, rejected = _text(row, cfg, "chosen"), _text(row, cfg, "rejected")
        if chosen == rejected:
            identical.append(row.source)
            return None
        margin = _margin(row, cfg)
        fit = _fit_prompt(tokenizer, cfg, prompt, _prompt_budget(cfg))
        if fit is None:
            return None
        text, p_ids, cut = fit
        c = _fit_response(cfg, len(p_ids), _encode_response(tokenizer, chosen))
        r = _fit_response(cfg, len(p_ids), _encode_response(tokenizer, rejected))
        if c is None or r is None:
            return None
        item = {"chosen_ids": p_ids + c[0], "rejected_ids": p_ids + r[0], "prompt_len": len(p_ids),
                "prompt": text, "margin": margin}
        return item, cut or c[1] or r[1]

    train, held, report = _load(cfg, seed, make, PreferenceDataset)
    if identical:
        report.dropped_too_long -= len(identical)
        report.dropped_identical = len(identical)
        log.warning("%s: %d pairs dropped with chosen == rejected (first: %s)", cfg.path, len(identical), identical[0])
    return train, held, report


def load_sft(cfg: DatasetConfig, tokenizer, seed: int):
    """SFT rows (prompt + response, or messages ending in an assistant turn) ->
    (train SFTDataset, eval SFTDataset or None, DataReport)."""

    def make(row: Row):
        if _uses_messages(row, cfg):
            messages = _messages(row, cfg, "messages", row.get(_column(cfg, "messages")))
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise _bad(row, cfg, "messages", "a conversation ending with an assistant message (the response)",
                           f"ends with a '{messages[-1]['role']}' message")
            prompt, response = messages[:-1], messages[-1]["content"]
        elif row.get(_column(cfg, "response")) is None and row.get(_column(cfg, "references")) is not None:
            # a task with references and no response column: the warm start trains on the first reference
            prompt, response = _prompt(row, cfg), _references(row, cfg)[0]
        else:
            prompt, response = _prompt(row, cfg), _text(row, cfg, "response")
        fit = _fit_prompt(tokenizer, cfg, prompt, _prompt_budget(cfg))
        if fit is None:
            return None
        text, p_ids, cut = fit
        resp = _fit_response(cfg, len(p_ids), _encode_response(tokenizer, response))
        if resp is None:
            return None
        return {"input_ids": p_ids + resp[0], "prompt_len": len(p_ids), "prompt": text}, cut or resp[1]

    return _load(cfg, seed, make, SFTDataset)


# --------------------------------------------------------------------------------------------
# collators
def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and 0/1 mask, L = longest sequence; padding on the left or the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """-> {"input_ids": [B, P] LEFT padded (generation continues from the right edge),
    "attention_mask": [B, P], "prompts": list[str] rendered prompts, "references": list[list[str]],
    "meta": list}."""
    ids, mask = _pad([it["input_ids"] for it in items], pad_id, left=True)
    return {"input_ids": ids, "attention_mask": mask, "prompts": [it["prompt"] for it in items],
            "references": [it.get("references", []) for it in items], "meta": [it.get("meta") for it in items]}


def collate_pairs(items: list[dict], pad_id: int) -> dict:
    """-> {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask": [B, L] RIGHT padded to one common L
    (so both halves stack into one [2B, L] batch), "margin": [B] float or None if any item has none}."""
    n = len(items)
    ids, mask = _pad([it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items], pad_id, left=False)
    margins = [it.get("margin") for it in items]
    margin = None if any(m is None for m in margins) else torch.tensor(margins, dtype=torch.float32)
    return {"chosen_ids": ids[:n], "chosen_mask": mask[:n], "rejected_ids": ids[n:], "rejected_mask": mask[n:],
            "margin": margin}


def collate_sft(items: list[dict], pad_id: int, pack: bool = False, max_length: Optional[int] = None) -> dict:
    """-> {"input_ids", "attention_mask", "labels": [B, L] RIGHT padded}; labels equal input_ids (the model
    shifts them) with -100 on prompt tokens and padding.

    ``pack=True`` concatenates consecutive sequences into rows of at most ``max_length`` tokens (B = rows)
    and adds "position_ids" [B, L] restarting at 0 for each sequence. The attention mask only marks padding:
    SFT calls the model with the position ids and no attention mask (engine/sft.py), and transformers then
    builds a block-diagonal causal mask from them, so packed sequences stay apart with any attention kernel.
    """
    if not pack:
        ids, mask = _pad([it["input_ids"] for it in items], pad_id, left=False)
        labels = ids.masked_fill(mask == 0, -100)
        for i, it in enumerate(items):
            labels[i, :it["prompt_len"]] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if max_length is None:
        raise ValueError("collate_sft(pack=True) needs max_length (the packed row length)")
    rows: list[list[dict]] = [[]]
    for it in items:
        if len(it["input_ids"]) > max_length:
            raise ValueError(f"a sequence of {len(it['input_ids'])} tokens does not fit max_length {max_length}")
        if sum(len(x["input_ids"]) for x in rows[-1]) + len(it["input_ids"]) > max_length:
            rows.append([])
        rows[-1].append(it)
    seqs, labels, positions = [], [], []
    for row in rows:
        seqs.append([t for it in row for t in it["input_ids"]])
        labels.append([-100 if j < it["prompt_len"] else t for it in row for j, t in enumerate(it["input_ids"])])
        positions.append([j for it in row for j in range(len(it["input_ids"]))])
    ids, mask = _pad(seqs, pad_id, left=False)
    lab, _ = _pad(labels, -100, left=False)
    pos, _ = _pad(positions, 0, left=False)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab, "position_ids": pos}
