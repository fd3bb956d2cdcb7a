"""Reward functions: one interface for a learned reward model, a Python callable, and built-in judges.

``reward(prompts, responses, references=None, meta=None) -> scores [B]`` (float32, on CPU, already
multiplied by ``reward.scale``); ``references`` is one list of strings per sample (the dataset row's
reference texts) and ``meta`` one value per sample, read by the rewards that use them. Every call is checked: a reward that raises, returns the wrong number of
scores, or returns NaN/inf stops the run with ``RewardError`` naming the reward and the sample.
The learned model also scores token ids directly: ``reward.score_tokens(input_ids, attention_mask)``.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rlhf_engine.config import RecipeError, RewardConfig

SAMPLE_CHARS = 200  # how much of a prompt / response an error message shows


class RewardError(RuntimeError):
    """A reward failed on real data; the message names the reward and the offending sample."""


def _clip_text(text: str, limit: int = SAMPLE_CHARS) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _sample(i: int, prompts: list[str], responses: list[str]) -> str:
    prompt = prompts[i] if i < len(prompts) else "?"
    response = responses[i] if i < len(responses) else "?"
    return f"sample {i}: prompt={_clip_text(prompt)} response={_clip_text(response)}"


def check_scores(scores: Any, reward_name: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Scores (list, array or tensor) -> float32 CPU tensor [B]; RewardError if the count is wrong or any is NaN/inf."""
    try:
        out = torch.as_tensor(scores.detach() if isinstance(scores, torch.Tensor) else scores,
                              dtype=torch.float32).cpu()
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward '{reward_name}' returned {type(scores).__name__}, expected a list or "
                          f"1-D tensor of {len(responses)} floats ({e})") from e
    if out.dim() != 1 or out.numel() != len(responses):
        raise RewardError(f"reward '{reward_name}' returned {tuple(out.shape)} scores for {len(responses)} "
                          f"responses; it must return one float per response")
    bad = torch.nonzero(~torch.isfinite(out)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise RewardError(f"reward '{reward_name}' returned {out[i].item()} for {_sample(i, prompts, responses)}"
                          f" ({bad.numel()} non-finite score(s) in the batch); fix the reward so it returns finite"
                          " numbers")
    return out


class RewardFunction:
    """Base: subclasses implement ``_score(prompts, responses)``; ``__call__`` checks and scales."""

    name: str = "reward"
    # on an exception, re-run one sample at a time to name the one that fails (cheap rewards only)
    locate_failures: bool = True
    # subclasses whose _score reads references= / meta= set this
    wants_context: bool = False

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def _score(self, prompts: list[str], responses: list[str]) -> Any:
        raise NotImplementedError

    def __call__(self, prompts: list[str], responses: list[str], references: Optional[list] = None,
                 meta: Optional[list] = None) -> torch.Tensor:
        """Scores [B] float32 on CPU for prompt/response pairs (and their references / meta), times ``scale``."""
        if len(prompts) != len(responses):
            raise ValueError(f"reward '{self.name}': {len(prompts)} prompts but {len(responses)} responses")
        ctx = {}
        if self.wants_context:
            ctx = {"references": list(references) if references is not None else [[] for _ in responses],
                   "meta": list(meta) if meta is not None else [None] * len(responses)}
        try:
            raw = self._score(prompts, responses, **ctx)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward '{self.name}' raised {type(e).__name__}: {e}; "
                              f"{self._failing_sample(prompts, responses, ctx)}") from e
        return check_scores(raw, self.name, prompts, responses) * self.scale

    def _failing_sample(self, prompts: list[str], responses: list[str], ctx: Optional[dict] = None) -> str:
        """Which sample raises when scored alone (the run stops anyway, so the retries are affordable)."""
        if self.locate_failures and len(responses) > 1:
            for i in range(len(responses)):
                try:
                    self._score(prompts[i:i + 1], responses[i:i + 1], **{k: v[i:i + 1] for k, v in (ctx or {}).items()})
                except Exception:
                    return "failing " + _sample(i, prompts, responses)
        return f"batch of {len(responses)}, first " + _sample(0, prompts, responses)


def _no_kwargs(name: str, kwargs: dict, allowed: tuple = ()) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise RecipeError(f"reward.kwargs {unknown} are not used by reward.type '{name}'; "
                         f"allowed: {list(allowed) or 'none'}")


# --------------------------------------------------------------------------------------------
class SentimentReward(RewardFunction):
    """VADER compound sentiment of the response alone, in [-1, 1] (rule-based, no model download)."""

    name = "sentiment"

    def __init__(self, scale: float = 1.0):
        super().__init__(scale)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def _score(self, prompts, responses):
        return [self.analyzer.polarity_scores(r)["compound"] for r in responses]


class LengthReward(RewardFunction):
    """Response length in ``unit`` ("words" split on whitespace, "chars", or "tokens" of the policy tokenizer).

    With ``target``: -|len - target| / target (0 at the target, -1 for an empty response).
    Without: the plain length (use ``reward.scale`` to bring it to a sensible range).
    """

    name = "length"

    def __init__(self, target: Optional[float] = None, unit: str = "words", *, tokenizer=None, scale: float = 1.0):
        super().__init__(scale)
        if unit not in ("words", "chars", "tokens"):
            raise ValueError(f"reward.kwargs.unit: expected 'words', 'chars' or 'tokens', got {unit!r}")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("reward.kwargs.unit 'tokens' needs the policy tokenizer (build_reward(policy_tokenizer=...))")
        if target is not None and target <= 0:
            raise ValueError(f"reward.kwargs.target must be > 0, got {target}")
        self.target, self.unit, self.tokenizer = target, unit, tokenizer

    def length(self, text: str) -> int:
        if self.unit == "words":
            return len(text.split())
        if self.unit == "chars":
            return len(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _score(self, prompts, responses):
        lengths = [float(self.length(r)) for r in responses]
        if self.target is None:
            return lengths
        return [-abs(n - self.target) / self.target for n in lengths]


def load_function(spec: str) -> Callable:
    """'package.module:function' (importable from the working dir / PYTHONPATH) or 'path/to/file.py:function'."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise RecipeError(f"reward.function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                # after site-packages: a module next to the run, never shadowing an installed package (a
                # checkout's kernels/ folder would shadow Hugging Face's `kernels`)
                sys.path.append(str(Path.cwd()))
            module = importlib.import_module(module_name)
    except Exception as e:
        raise RecipeError(f"reward.function {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); "
                         "give a module importable from the working directory or PYTHONPATH, or a file "
                         "path like path/to/file.py:function") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise RecipeError(f"reward.function {spec!r}: {module_name!r} has no function {attr!r}; "
                         f"callables there: {', '.join(names) or 'none'}")
    return fn


class CallableReward(RewardFunction):
    """A user function ``fn(prompts, responses, **kwargs) -> list/tensor of floats`` (one per response).

    A function with a ``references`` and/or ``meta`` parameter also receives them (one entry per response).
    """

    wants_context = True

    def __init__(self, function: str, kwargs: Optional[dict] = None, scale: float = 1.0):
        super().__init__(scale)
        self.fn = load_function(function)
        self.name = f"callable {function}"
        self.kwargs = dict(kwargs or {})
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # builtins without a signature: texts only
            params = {}
        self.context_args = [k for k in ("references", "meta") if k in params]

    def _score(self, prompts, responses, references=None, meta=None):
        ctx = {"references": references, "meta": meta}
        return self.fn(list(prompts), list(responses), **{k: ctx[k] for k in self.context_args}, **self.kwargs)


# --------------------------------------------------------------------------------------------
def _same_vocab(a, b) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


class ModelReward(RewardFunction):
    """A learned scalar reward model (``engine.models.ScalarModel``: ``.scores(ids, mask) -> [B]``).

    Text in (``__call__``): prompt + response is tokenized with the RM tokenizer the way the reward
    stage encodes pairs (engine/data.py): special tokens added unless the text already starts with
    BOS, and closed by EOS. Token ids in (``score_tokens``): the policy's ids are scored as they are
    when the RM shares the policy's vocabulary; otherwise the texts (given, or decoded without
    special tokens) are re-tokenized as above. ``.model`` may be swapped for a DeepSpeed-wrapped
    copy by the trainer: only ``.scores`` is called.
    """

    locate_failures = False  # a model failure is rarely sample-specific; don't re-run it per sample

    def __init__(self, model, tokenizer, *, policy_tokenizer=None, name: str = "model", scale: float = 1.0,
                 device=None, batch_size: int = 16):
        super().__init__(scale)
        self.model, self.tokenizer, self.policy_tokenizer = model, tokenizer, policy_tokenizer
        self.name, self.device, self.batch_size = name, device, batch_size
        self.same_tokenizer = policy_tokenizer is not None and _same_vocab(policy_tokenizer, tokenizer)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # pads are masked; any id will do

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, input_ids.shape[0], self.batch_size):
            ids = input_ids[start:start + self.batch_size]
            mask = attention_mask[start:start + self.batch_size]
            if self.device is not None:
                ids, mask = ids.to(self.device), mask.to(self.device)
            # through forward (ScalarModel.forward = scores), so a DeepSpeed engine wraps the call
            out.append(self.model(ids, mask).float().cpu())
        return torch.cat(out)

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok, rows = self.tokenizer, []
        for text in texts:
            ids = tok(text, add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token)))["input_ids"]
            if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
                ids = ids + [tok.eos_token_id]  # reward-stage pairs end with EOS; the RM reads there
            rows.append(ids)
        enc = tok.pad({"input_ids": rows}, return_tensors="pt")  # the tokenizer's padding side; RM handles both
        return enc["input_ids"], enc["attention_mask"]

    def _score(self, prompts, responses):
        return self._forward(*self._tokenize([p + r for p, r in zip(prompts, responses)]))

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        tok = self.policy_tokenizer or self.tokenizer
        return [tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                for ids, m in zip(input_ids, attention_mask)]

    def _texts(self, input_ids, attention_mask, prompts, responses) -> tuple[list[str], list[str]]:
        if prompts is not None and responses is not None:
            return list(prompts), list(responses)
        return [""] * len(input_ids), self._decode(input_ids, attention_mask)  # decoded prompt+response

    def score_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     prompts: Optional[list[str]] = None, responses: Optional[list[str]] = None) -> torch.Tensor:
        """Scores [B] (float32, CPU, scaled) of policy token ids [B, L] (prompt + response), attention_mask [B, L].

        ``prompts`` / ``responses`` are the texts behind the ids: re-tokenized when the RM's vocabulary
        differs, and used to name a failing sample (without them the ids are decoded).
        """
        if not self.same_tokenizer:
            return self(*self._texts(input_ids, attention_mask, prompts, responses))
        try:
            raw = self._forward(input_ids, attention_mask)
        except Exception as e:
            p, r = self._texts(input_ids[:1], attention_mask[:1], prompts, responses)
            raise RewardError(f"reward '{self.name}' raised {type(e).__name__}: {e}; batch of {len(input_ids)}, "
                              f"first {_sample(0, p, r)}") from e
        if not bool(torch.isfinite(raw).all()):  # texts only to name the bad sample
            check_scores(raw, self.name, *self._texts(input_ids, attention_mask, prompts, responses))
        return raw * self.scale


    # ---- a backbone shared with the reference policy -------------------------------------------
    def share_backbone(self, reference) -> bool:
        """Reuse the reference policy's backbone if it holds exactly this reward model's backbone.

        True when both come from the same checkpoint folder with the same attention implementation,
        the reward reads the policy's token ids, neither is partitioned (ZeRO-3) or an adapter model,
        and every backbone tensor is equal (names, dtypes, values). Then this model's own copy is
        dropped (its ``.model`` now runs the reference's backbone) and ``score_hidden`` turns the
        reference forward's final hidden states into scores: one frozen forward and one copy of the
        weights instead of two (TRL's workload builds reward and reference from the same weights).
        """
        scalar = self.model
        backbone = getattr(scalar, "hf_model", None)
        ref_backbone = getattr(reference, "base_model", None)
        if (not self.same_tokenizer or getattr(scalar, "encoder", True) or backbone is None or ref_backbone is None
                or type(backbone.base_model) is not type(ref_backbone)
                or not isinstance(getattr(backbone, "base_model_prefix", None), str)):
            return False
        mine, theirs = backbone.base_model, ref_backbone
        if (mine.config._name_or_path != theirs.config._name_or_path
                or mine.config._attn_implementation != theirs.config._attn_implementation):
            return False
        a, b = mine.state_dict(), theirs.state_dict()
        if a.keys() != b.keys() or any(hasattr(t, "ds_id") for t in (*a.values(), *b.values())):
            return False
        if not all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a):
            return False
        setattr(backbone, backbone.base_model_prefix, theirs)
        self.shared_backbone = True
        return True

    shared_backbone = False

    @torch.no_grad()
    def score_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     prompts: Optional[list[str]] = None, responses: Optional[list[str]] = None) -> torch.Tensor:
        """Scores [B] (float32, CPU, scaled, checked) from the shared backbone's final hidden states [B, L, H]
        of the policy token ids ``input_ids`` [B, L] (used only to name a bad sample)."""
        raw = self.model.scores_from_hidden(hidden, attention_mask).float().cpu()
        if not bool(torch.isfinite(raw).all()):
            check_scores(raw, self.name, *self._texts(input_ids, attention_mask, prompts, responses))
        return raw * self.scale


def load_model_reward(reward_cfg: RewardConfig, *, policy_tokenizer=None, cache_dir=None, device=None,
                      frozen=None) -> ModelReward:
    """Load the reward model of ``reward.model`` (via engine.models) and its tokenizer.

    ``frozen=(recipe, sizes)`` builds it as a frozen DeepSpeed model under the reference's rules
    (``distributed.build_frozen``: ZeRO-3 partitioned at construction when the recipe's frozen stage is 3,
    optional parameter offload); without it the whole model is moved to ``device``.
    """
    from rlhf_engine import models  # heavy (transformers); only the model reward needs it
    from rlhf_engine.console import report_model

    kwargs = dict(reward_cfg.kwargs)
    _no_kwargs("model", kwargs, ("batch_size",))
    # fixed head seed: a backbone without a trained head still scores the same on every rank
    load = lambda: models.load_scalar_model(reward_cfg.model, cache_dir=cache_dir, init_head_seed=0)  # noqa: E731
    if frozen is not None:
        from rlhf_engine.distributed import build_frozen

        model = build_frozen(load, *frozen)
    else:
        model = load()
        model.eval().requires_grad_(False)
        if device is not None:
            model.to(device)
        report_model(model, zero_stage=0, trained=False)  # a full replica on every rank
    tokenizer = models.load_tokenizer(reward_cfg.model, cache_dir=cache_dir)
    return ModelReward(model, tokenizer, policy_tokenizer=policy_tokenizer, name=f"model {reward_cfg.model.name_or_path}",
                       scale=reward_cfg.scale, device=device, **kwargs)


def build_reward(reward_cfg: RewardConfig, *, policy_tokenizer=None, cache_dir=None, device=None,
                 frozen=None) -> RewardFunction:
    """The reward a recipe's ``reward`` section describes; ``reward.scale`` multiplies every score."""
    kind, kwargs, scale = reward_cfg.type, dict(reward_cfg.kwargs), reward_cfg.scale
    if kind == "sentiment":
        _no_kwargs(kind, kwargs)
        return SentimentReward(scale=scale)
    if kind == "length":
        _no_kwargs(kind, kwargs, ("target", "unit"))
        return LengthReward(**kwargs, tokenizer=policy_tokenizer, scale=scale)
    if kind == "callable":
        return CallableReward(reward_cfg.function, kwargs, scale=scale)
    if kind == "model":
        return load_model_reward(reward_cfg, policy_tokenizer=policy_tokenizer, cache_dir=cache_dir, device=device,
                                 frozen=frozen)
    if kind == "metric":
        from rlhf_engine.reward_set import MetricReward

        return MetricReward(reward_cfg.metric, reward_cfg.metric_key, kwargs, scale=scale, cache_dir=cache_dir)
    if kind == "remote":
        from rlhf_engine.remote_reward import RemoteReward

        _no_kwargs(kind, kwargs)
        return RemoteReward(reward_cfg.url, reward_cfg.remote, scale=scale)
    raise ValueError(f"reward.type: unknown {kind!r}; expected model, callable, sentiment, length, metric or remote")
