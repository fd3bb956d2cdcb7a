"""Load the tokenizer, the policy (causal LM) and scalar models (critic / reward) from a recipe.

``ModelConfig.name_or_path`` may be a preset (see ``engine.presets``), a local Hugging Face
folder, a ``.gguf`` file (dequantised once into the cache), or a hub id (online, or offline from
the Hugging Face cache). Everything ends in ``from_pretrained`` on a folder, so the loaders also
work inside DeepSpeed ZeRO-3 (transformers' ``HfDeepSpeedConfig`` integration partitions the
parameters at construction and initialises missing ones, like a fresh value head, gathered).
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PretrainedConfig, PreTrainedModel)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from rlhf_engine.batching import position_ids_from_mask
from rlhf_engine.config import ModelConfig, RecipeError
from rlhf_engine.console import LoadReport, new_modules
from rlhf_engine.backends import cpu as cpu_backend
from rlhf_engine.presets import (PRESETS, cache_root, cached_folder, convert_gguf, gguf_cache_key, list_presets,
                            use_distinct_pad)
from rlhf_engine.seq2seq import Seq2SeqScalarModel, disable_dropout, is_seq2seq_config, set_decoder_start

__all__ = ["PRESETS", "ResolvedModel", "ScalarModel", "dtype_of", "is_encoder", "list_presets", "load_policy",
           "load_scalar_model", "load_tokenizer", "resolve_model_path"]

DType = Union[torch.dtype, str, None]  # loaders accept a torch dtype or a recipe name ('bf16')
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{name}': expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# where a model comes from
@dataclass(frozen=True)
class ResolvedModel:
    path: str  # local folder (or, online and not cached, a hub id) for from_pretrained
    gguf_file: Optional[str]  # only for GGUF files inside a hub repo fetched online; else None
    tokenizer_path: str  # folder or hub id of the tokenizer
    source: str  # "preset" | "folder" | "gguf" | "hub"


def _offline() -> bool:
    import huggingface_hub.constants as hub_constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return hub_constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _not_found(name: str, why: str) -> RecipeError:
    hint = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.6)
    return RecipeError(
        f"model '{name}' {why}. Download it on a machine with network (`hf download {name}`, formerly "
        f"`huggingface-cli download`) or set model.name_or_path to a local folder."
        + (f" Did you mean the preset '{hint[0]}'?" if hint else "")
        + f" Presets: {', '.join(PRESETS)}.")


def _gguf_folder(gguf: Path, root: Path) -> str:
    if not gguf.is_file():
        raise RecipeError(f"GGUF file not found: {gguf} (model.name_or_path / model.gguf_file)")
    return str(cached_folder(root, gguf_cache_key(gguf), lambda out: convert_gguf(gguf, out), f"GGUF {gguf}"))


def _resolve_source(name: str, gguf_file: Optional[str], revision: Optional[str],
                    root: Path) -> tuple[str, Optional[str], str]:
    """(path, gguf_file, source) for one name: preset, .gguf, folder or hub id."""
    if name in PRESETS:
        return str(PRESETS[name].materialize(root)), None, "preset"
    local = Path(name).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return _gguf_folder(local, root), None, "gguf"
    if local.is_dir():
        if gguf_file:
            return _gguf_folder(local / gguf_file, root), None, "gguf"
        if not (local / "config.json").is_file():
            raise RecipeError(f"model folder {local} has no config.json: expected a Hugging Face model folder "
                             "(config.json + weights + tokenizer) or set model.gguf_file to a .gguf file in it")
        return str(local), None, "folder"
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        raise RecipeError(f"model path '{name}' does not exist (model.name_or_path); presets: {', '.join(PRESETS)}")
    return _resolve_hub(name, gguf_file, revision, root)


def _resolve_hub(name: str, gguf_file: Optional[str], revision: Optional[str], root: Path):
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    offline = _offline()
    try:
        cached = try_to_load_from_cache(name, gguf_file or "config.json", revision=revision)
    except HFValidationError:
        raise RecipeError(f"model '{name}' is not a preset, not a local folder and not a valid hub id "
                         f"(model.name_or_path). Presets: {', '.join(PRESETS)}.") from None
    if isinstance(cached, str):  # in the HF cache: use the snapshot folder, no network needed
        if gguf_file:
            return _gguf_folder(Path(cached), root), None, "gguf"
        return str(Path(cached).parent), None, "hub"
    if offline:
        raise _not_found(name, "is not a preset, not a local folder and not in the Hugging Face cache (offline)")
    if gguf_file:
        return _gguf_folder(Path(hf_hub_download(name, gguf_file, revision=revision)), root), None, "gguf"
    return name, None, "hub"  # from_pretrained downloads it


def resolve_model_path(cfg: ModelConfig, cache_dir: Optional[str] = None) -> ResolvedModel:
    """Turn ``cfg.name_or_path`` (+ ``gguf_file``, ``tokenizer``) into folders ready for from_pretrained.

    Builds the preset / GGUF conversion cache on first use (under ``cache_root(cache_dir)``).
    Raises ValueError naming the key and the fix when the model cannot be found.
    """
    root = cache_root(cache_dir)
    path, gguf, source = _resolve_source(cfg.name_or_path, cfg.gguf_file, cfg.revision, root)
    tokenizer_path = path
    if cfg.tokenizer and cfg.tokenizer != cfg.name_or_path:
        tokenizer_path = _resolve_source(cfg.tokenizer, None, cfg.revision, root)[0]
    return ResolvedModel(path=path, gguf_file=gguf, tokenizer_path=tokenizer_path, source=source)


# --------------------------------------------------------------------------------------------
# architecture and options
def is_encoder(config: PretrainedConfig) -> bool:
    """True for bidirectional encoders (BERT-like: they have a masked-LM head class), by model type."""
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def _check_attn(cfg: ModelConfig) -> None:
    if cfg.attn_implementation != "flash_attention_2":
        return
    missing = [why for why, ok in (("CUDA", torch.cuda.is_available()),
                                   ("the flash-attn package", importlib.util.find_spec("flash_attn") is not None))
               if not ok]
    if missing:
        raise ValueError(f"model.attn_implementation 'flash_attention_2' needs {' and '.join(missing)}, which "
                         "this machine lacks; use 'sdpa' (the default, fast on CPU and GPU) or 'eager'")


def _load_kwargs(cfg: ModelConfig, resolved: ResolvedModel, dtype: DType) -> dict:
    dtype = dtype_of(dtype) if isinstance(dtype, str) else dtype
    kwargs = dict(dtype=dtype or dtype_of(cfg.dtype), attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code)
    if resolved.source == "hub":
        kwargs["revision"] = cfg.revision
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    return kwargs


def _model_config(cfg: ModelConfig, resolved: ResolvedModel) -> PretrainedConfig:
    return AutoConfig.from_pretrained(resolved.path, trust_remote_code=cfg.trust_remote_code,
                                      revision=cfg.revision if resolved.source == "hub" else None)


def import_model_classes(cfgs, cache_dir: Optional[str] = None) -> None:
    """Import each model's transformers modeling module now, before any ZeRO-3 construction context.

    ``deepspeed.zero.Init`` wraps the ``__init__`` of every module class defined while it is active and,
    on exit, puts back the ``__init__`` the class was created with. A decorator applied after class
    creation (Hugging Face kernels' ``use_kernelized_func``, which transformers puts on attention layers)
    then loses its ``__init__``, and the layer fails in its first forward. Imported first, the classes
    stay whole. Models that cannot be resolved yet (a folder an earlier stage writes) are skipped.
    """
    from transformers.models.auto import modeling_auto as auto

    mappings = (auto.MODEL_FOR_CAUSAL_LM_MAPPING, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
                auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)
    for cfg in cfgs:
        try:
            config = _model_config(cfg, resolve_model_path(cfg, cache_dir))
        except Exception:  # the loader reports it properly when it builds the model
            continue
        for mapping in mappings:
            if type(config) in mapping:
                mapping[type(config)]  # the lookup imports the modeling module


def _lora(cfg: ModelConfig, task_type: str, model: PreTrainedModel, modules_to_save: Optional[list] = None):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    lora = cfg.lora
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=lora.target_modules, task_type=task_type, modules_to_save=modules_to_save)
    model = get_peft_model(model, peft_cfg)
    _reinit_partitioned_lora(model, peft_cfg.init_lora_weights)
    return model


def _reinit_partitioned_lora(model: nn.Module, init_lora_weights) -> None:
    """Redo peft's adapter init (B = 0) on gathered weights when ZeRO-3 partitioned them at construction.

    Inside zero.Init the adapters are partitioned as they are built, so peft's in-place init hits
    empty shards and B would keep a random init (the adapted model would not start equal to the base).
    """
    from peft.tuners.lora import LoraLayer

    partitioned = [p for n, p in model.named_parameters() if "lora_" in n and hasattr(p, "ds_id")]
    if not partitioned:
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, init_lora_weights)


def _set_pad(model: PreTrainedModel, pad_token_id: int) -> None:
    model.config.pad_token_id = pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_token_id


def _check_context_start(cfg: ModelConfig, config: PretrainedConfig) -> None:
    if cfg.context_start_token is not None and not is_seq2seq_config(config):
        raise ValueError(f"model.context_start_token is the decoder start token of encoder-decoder models; "
                         f"'{cfg.name_or_path}' is a decoder-only '{config.model_type}' model: remove the key")


# --------------------------------------------------------------------------------------------
# loaders
def _contiguous_head_input(model: PreTrainedModel) -> None:
    """Make the LM head's input contiguous.

    With ``logits_to_keep`` HF slices the last hidden states (``hidden[:, -k:, :]``, a strided view)
    before the head. On CPU a bfloat16 linear over such a view takes a slow path: 1.20 s instead of
    0.033 s for SmolLM2's head over 8 x 32 positions, measured here. Copying [B, k, H] costs nothing.
    """
    head = model.get_output_embeddings()
    if head is None:
        return

    def pre_hook(_module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            args = (args[0].contiguous(), *args[1:])
        return args, kwargs

    pre_hook.layout_only = True  # changes no value: the fused decoder (backends/cpu/decode.py) may bypass it
    head.register_forward_pre_hook(pre_hook, with_kwargs=True)


def load_tokenizer(cfg: ModelConfig, cache_dir: Optional[str] = None):
    """Tokenizer of ``cfg`` with a pad token distinct from EOS and ``padding_side='left'``."""
    resolved = resolve_model_path(cfg, cache_dir)
    same_source = resolved.gguf_file and resolved.tokenizer_path == resolved.path
    kwargs = {"gguf_file": resolved.gguf_file} if same_source else {}
    tokenizer = AutoTokenizer.from_pretrained(resolved.tokenizer_path, trust_remote_code=cfg.trust_remote_code,
                                              revision=cfg.revision if resolved.source == "hub" else None, **kwargs)
    use_distinct_pad(tokenizer)
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def load_policy(cfg: ModelConfig, cache_dir: Optional[str] = None, *, dtype: DType = None,
                for_training: bool = True) -> PreTrainedModel:
    """AutoModelForCausalLM (or, for an encoder-decoder config, AutoModelForSeq2SeqLM: engine/seq2seq.py) for
    ``cfg``; with ``for_training``, gradient checkpointing and LoRA as configured.

    ``for_training=False`` (reference model) returns it in eval mode with gradients off.
    With LoRA the result is a peft ``PeftModel`` whose only trainable parameters are the adapters.
    """
    report = LoadReport(cfg.name_or_path)
    _check_attn(cfg)
    resolved = resolve_model_path(cfg, cache_dir)
    config = _model_config(cfg, resolved)
    seq2seq = is_seq2seq_config(config)
    known_causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "auto_map", None)
    if not seq2seq and (is_encoder(config) or not known_causal):
        raise ValueError(f"model.name_or_path '{cfg.name_or_path}' is a '{config.model_type}' model, not a causal "
                         "or encoder-decoder language model; the policy needs one (e.g. tiny-llama or tiny-t5)")
    _check_context_start(cfg, config)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model, info = auto.from_pretrained(resolved.path, output_loading_info=True, **_load_kwargs(cfg, resolved, dtype))
    report.new_keys = new_modules(info.get("missing_keys"))
    model.load_report = report  # printed in one line once the model's engine exists (console.report_model)
    _set_pad(model, load_tokenizer(cfg, cache_dir).pad_token_id)
    if seq2seq:
        set_decoder_start(model, cfg.context_start_token)
        disable_dropout(model)
    else:
        _contiguous_head_input(model)
    if not for_training:
        return cpu_backend.tune_model(model, for_training=False).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        model = _lora(cfg, "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM", model)
    return cpu_backend.tune_model(model)  # after LoRA: adapter-wrapped projections keep their own forward


def load_scalar_model(cfg: ModelConfig, cache_dir: Optional[str] = None, *, dtype: DType = None,
                      init_head_seed: Optional[int] = None) -> "ScalarModel":
    """Backbone + scalar head (critic or reward) as a ``ScalarModel``.

    A causal-LM folder gives its backbone weights and a freshly initialised head; with
    ``init_head_seed`` that head is the same on every rank and run (the caller's RNG is untouched).
    A saved ScalarModel (``hf_model.save_pretrained``) reloads its trained head.
    """
    report = LoadReport(cfg.name_or_path)
    _check_attn(cfg)
    resolved = resolve_model_path(cfg, cache_dir)
    config = _model_config(cfg, resolved)
    encoder, seq2seq = is_encoder(config), is_seq2seq_config(config)
    _check_context_start(cfg, config)
    with torch.random.fork_rng(devices=[], enabled=init_head_seed is not None):
        if init_head_seed is not None:
            torch.manual_seed(init_head_seed)
        hf_model, info = AutoModelForSequenceClassification.from_pretrained(
            resolved.path, num_labels=1, output_loading_info=True, **_load_kwargs(cfg, resolved, dtype))
    report.new_keys = new_modules(info.get("missing_keys"))  # the value / score head of a causal-LM folder
    _set_pad(hf_model, load_tokenizer(cfg, cache_dir).pad_token_id)
    if seq2seq:
        set_decoder_start(hf_model, cfg.context_start_token)
        disable_dropout(hf_model)
    if cfg.gradient_checkpointing:
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:  # SEQ_CLS keeps the head fully trainable (seq2seq heads are `classification_head`)
        hf_model = _lora(cfg, "SEQ_CLS", hf_model, ["classification_head"] if seq2seq else None)
    cpu_backend.tune_model(hf_model)
    scalar = Seq2SeqScalarModel(hf_model) if seq2seq else ScalarModel(hf_model, encoder=encoder)
    scalar.load_report = report
    return scalar


# --------------------------------------------------------------------------------------------
class ScalarModel(nn.Module):
    """A sequence-classification model (num_labels=1) read as per-token values or one score.

    ``hf_model`` is the underlying ``AutoModelForSequenceClassification`` (or its peft wrapper),
    so ``hf_model.save_pretrained`` exports a standard reward model. Causal backbones score at
    the last non-pad token, encoders at the first ([CLS]) token; both accept left or right padding.
    """

    def __init__(self, hf_model: nn.Module, encoder: bool):
        super().__init__()
        self.hf_model = hf_model
        self.encoder = encoder

    @property
    def config(self) -> PretrainedConfig:
        return self.hf_model.config

    def _base(self) -> PreTrainedModel:
        return self.hf_model.get_base_model() if hasattr(self.hf_model, "get_base_model") else self.hf_model

    def _head(self) -> nn.Module:
        base = self._base()
        for name in ("score", "classifier"):  # causal seq-cls heads are `score`, encoders' `classifier`
            if hasattr(base, name):
                return getattr(base, name)
        raise TypeError(f"{type(base).__name__} has no `score` or `classifier` head")

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token scalar of a causal backbone: [B, T] ids and mask -> [B, T] float32 (0 at padding).

        Position ids default to the count of real tokens before each position, so left padding
        does not shift positions.
        """
        if self.encoder:
            raise ValueError("per-token values need a causal LM backbone (critic); this ScalarModel is an encoder")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self._base().base_model(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, use_cache=False).last_hidden_state
        return self.values_from_hidden(hidden, attention_mask)

    def values_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head over a causal backbone's final hidden states: [B, T, H] -> [B, T] float32 (0 at padding)."""
        head = self._head()
        values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
        return values.masked_fill(attention_mask == 0, 0.0)

    def scores_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``scores`` of a causal backbone from its final hidden states: [B, T, H] -> [B] float32."""
        last = last_token_index(attention_mask)
        return self.values_from_hidden(hidden, attention_mask).gather(1, last[:, None]).squeeze(1)

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score per sequence: [B, T] ids and mask -> [B] float32.

        Causal: the value at the last non-pad token. Encoder: the classifier on [CLS]; rows are
        moved to right padding first so [CLS] is at position 0.
        """
        if self.encoder:
            input_ids, attention_mask = _to_right_padding(input_ids, attention_mask)
            return self.hf_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        last = last_token_index(attention_mask)
        return self.values(input_ids, attention_mask).gather(1, last[:, None]).squeeze(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None, per_token: bool = False) -> torch.Tensor:
        """``scores`` ([B]); with ``per_token=True`` the critic's ``values`` ([B, T]).

        Going through forward (not .values directly) lets a DeepSpeed engine wrap the call.
        """
        if per_token:
            return self.values(input_ids, attention_mask, position_ids)
        return self.scores(input_ids, attention_mask)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> [B] index of the last real token (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def _to_right_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each row so its real tokens start at position 0 ([B, T] -> [B, T])."""
    leading_pads = (attention_mask.long().cumsum(-1) == 0).sum(-1)  # [B]
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    index = (cols[None, :] + leading_pads[:, None]) % attention_mask.shape[1]
    return input_ids.gather(1, index), attention_mask.gather(1, index)


def merge_lora_state_dict(state: dict[str, torch.Tensor], lora_config) -> dict[str, torch.Tensor]:
    """A peft model's full state dict -> the plain model's, adapters merged: W' = W + scale * B @ A.

    Keys "base_model.model.X.base_layer.weight" + "X.lora_A.default.weight" [r, in] + "X.lora_B.default.weight"
    [out, r] become "X.weight" [out, in]; "modules_to_save.default" copies (a trained head) replace the
    originals. scale = alpha / r (alpha / sqrt(r) with rslora). Merged in float32, stored in W's dtype.
    """
    prefix = "base_model.model."
    scale = lora_config.lora_alpha / (math.sqrt(lora_config.r) if lora_config.use_rslora else lora_config.r)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        name = name.removeprefix(prefix)
        if ".lora_" in name or ".original_module." in name:
            continue
        if ".base_layer." in name:
            module = name.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            a = state.get(f"{prefix}{module}.lora_A.default.weight")
            if a is not None and name.endswith(".weight"):
                b = state[f"{prefix}{module}.lora_B.default.weight"]
                delta = b.float() @ a.float() * scale
                tensor = (tensor.float() + (delta.T if lora_config.fan_in_fan_out else delta)).to(tensor.dtype)
        name = name.replace(".modules_to_save.default.", ".")
        out[name] = tensor
    return out
