"""Several rewards as one: a weighted sum, each part logged on its own, some given per token (dense).

``RewardSet.score(...) -> RewardResult``:
    scores  [B]     float32, sum_i weight_i * reward_i(response), dense rewards included (their sum over tokens)
    dense   [B, R]  float32, sum over dense rewards of weight_i * (f_i(response[:t+1]) - f_i(response[:t])),
                    f_i('') = 0, so each row sums to the dense rewards' share of ``scores``; None without any
    parts   {name: [B]}  each reward's own sentence-level value (times its scale, before its weight)
    extra   {name/key: float}  means of what reward servers return as ``extra_logs``
A dense reward decodes every prefix of a response and scores it: R calls' worth of text per sample,
affordable for metric and rule-based rewards, refused for reward models and servers (config.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from rlhf_engine.config import Recipe, RewardConfig
from rlhf_engine.metrics import get_metric
from rlhf_engine.rewards import RewardFunction, build_reward, check_scores


class MetricReward(RewardFunction):
    """A metric of the registry (engine/metrics.py) as a sentence-level reward: its per-sample ``key``
    (default the metric's main value, e.g. rougeL for rouge) against the sample's references."""

    wants_context = True

    def __init__(self, metric: str, key: Optional[str] = None, kwargs: Optional[dict] = None, scale: float = 1.0,
                 cache_dir: Optional[str] = None):
        super().__init__(scale)
        kwargs = dict(kwargs or {})
        if metric in ("meteor", "bertscore") and cache_dir is not None:
            kwargs.setdefault("cache_dir", cache_dir)
        self.metric = get_metric(metric, **kwargs)
        self.key = key or self.metric.main
        self.name = f"metric {metric}"
        if self.key not in self.metric.sample_keys():
            raise ValueError(f"reward.metric_key {self.key!r} is not a per-sample value of metric '{metric}'; "
                             f"it has: {list(self.metric.sample_keys())}")

    def _score(self, prompts, responses, references=None, meta=None):
        return self.metric.compute(list(prompts), list(responses), references, meta).per_sample[self.key]


@dataclass
class RewardResult:
    scores: torch.Tensor  # [B]
    dense: Optional[torch.Tensor] = None  # [B, R]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B]
    extra: dict[str, float] = field(default_factory=dict)


def dense_rewards(fn: RewardFunction, prompts: list[str], response_ids: torch.Tensor, response_mask: torch.Tensor,
                  tokenizer, references: Optional[list] = None, meta: Optional[list] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, R] r_t = f(y[:t+1]) - f(y[:t]) (f('') = 0) and sentence scores f(y) [B].

    Every prefix of every response is decoded (special tokens skipped) and scored in one call.
    """
    B, R = response_ids.shape
    lengths = response_mask.sum(1).long().tolist()
    flat_p, flat_y, flat_ref, flat_meta, owner = [], [], [], [], []
    for b in range(B):
        ids = response_ids[b].tolist()
        for t in range(lengths[b]):
            flat_p.append(prompts[b])
            flat_y.append(tokenizer.decode(ids[:t + 1], skip_special_tokens=True))
            flat_ref.append(references[b] if references is not None else [])
            flat_meta.append(meta[b] if meta is not None else None)
            owner.append(b)
    values = fn(flat_p, flat_y, flat_ref, flat_meta) if flat_y else torch.zeros(0)
    out = torch.zeros(B, R, dtype=torch.float32)
    final = torch.zeros(B, dtype=torch.float32)
    i = 0
    for b in range(B):
        n = lengths[b]
        if n:
            v = values[i:i + n]
            out[b, :n] = torch.diff(v, prepend=v.new_zeros(1))
            final[b] = v[-1]
        i += n
    return out, final


class RewardSet:
    """Weighted rewards ``[(name, weight, dense, reward)]`` scored together (see the module doc)."""

    name = "reward"

    def __init__(self, members: list[tuple[str, float, bool, RewardFunction]], tokenizer=None):
        if any(dense for _, _, dense, _ in members) and tokenizer is None:
            raise ValueError("dense rewards need the policy tokenizer (to decode response prefixes)")
        self.members, self.tokenizer = members, tokenizer

    def score(self, prompts: list[str], responses: list[str], references: Optional[list] = None,
              meta: Optional[list] = None, *, sequences: Optional[torch.Tensor] = None,
              attention_mask: Optional[torch.Tensor] = None, response_ids: Optional[torch.Tensor] = None,
              response_mask: Optional[torch.Tensor] = None) -> RewardResult:
        """Score a batch; ``sequences``/``attention_mask`` [B, L] let a reward model read token ids,
        ``response_ids``/``response_mask`` [B, R] are needed by dense rewards."""
        B = len(responses)
        total = torch.zeros(B, dtype=torch.float32)
        dense_total, parts, extra = None, {}, {}
        for name, weight, dense, fn in self.members:
            if dense:
                per_token, value = dense_rewards(fn, prompts, response_ids.cpu(), response_mask.cpu(), self.tokenizer,
                                                 references, meta)
                dense_total = per_token * weight if dense_total is None else dense_total + per_token * weight
            elif hasattr(fn, "score_tokens") and sequences is not None:
                value = fn.score_tokens(sequences, attention_mask, prompts=prompts, responses=responses)
            else:
                value = fn(prompts, responses, references, meta)
            value = check_scores(value, fn.name, prompts, responses)
            parts[name] = value
            total += weight * value
            for key, v in (getattr(fn, "last_extra_logs", None) or {}).items():
                extra[f"{name}/{key}"] = v
        return RewardResult(total, dense_total, parts, extra)

    def sentence_parts(self, prompts, responses, references=None, meta=None) -> tuple[torch.Tensor, dict]:
        """(total [B], {name: [B]}) from texts alone; a dense reward counts with its sentence score f(response)."""
        total, parts = torch.zeros(len(responses), dtype=torch.float32), {}
        for name, weight, _, fn in self.members:
            parts[name] = check_scores(fn(prompts, responses, references, meta), fn.name, prompts, responses)
            total += weight * parts[name]
        return total, parts

    def __call__(self, prompts, responses, references=None, meta=None) -> torch.Tensor:
        """Total sentence-level scores [B] of texts."""
        return self.sentence_parts(prompts, responses, references, meta)[0]


def build_reward_set(rewards: list[RewardConfig], *, policy_tokenizer=None, cache_dir=None, device=None,
                     frozen=None) -> RewardSet:
    """A RewardSet of the recipe's reward list (or single reward); ``frozen``: see rewards.load_model_reward."""
    members = [(cfg.label, cfg.weight, cfg.dense,
                build_reward(cfg, policy_tokenizer=policy_tokenizer, cache_dir=cache_dir, device=device,
                             frozen=frozen))
               for cfg in rewards]
    return RewardSet(members, tokenizer=policy_tokenizer)


def build_recipe_reward(recipe: Recipe, *, policy_tokenizer=None, device=None, frozen=None):
    """The RL run's reward: a single ``type: model`` reward stays a plain ModelReward (token ids in, a
    backbone shared with the reference); anything else becomes a RewardSet (parts logged, dense rewards)."""
    cfgs = recipe.reward_configs()
    if len(cfgs) == 1 and cfgs[0].type == "model":
        return build_reward(cfgs[0], policy_tokenizer=policy_tokenizer, cache_dir=recipe.cache_dir, device=device,
                            frozen=frozen)
    return build_reward_set(cfgs, policy_tokenizer=policy_tokenizer, cache_dir=recipe.cache_dir, device=device,
                            frozen=frozen)
