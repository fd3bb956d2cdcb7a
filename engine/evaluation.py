"""Evaluation of an RL run's responses: metrics (engine/metrics.py) corpus-level and per sample,
eval.jsonl lines, and predictions/<split>-step-<N>.jsonl.

Every rank generates its share of the evaluation prompts; the texts are gathered on the main rank,
which computes the metrics and writes the files (metrics see the whole split at once, as corpus
BLEU must).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from rlhf_engine.config import Recipe
from rlhf_engine.metrics import Metric, compute_metrics, get_metric


def gather_lists(values: list) -> list:
    """Concatenate a per-rank Python list over all ranks, in rank order (every rank gets it)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]


def build_metrics(recipe: Recipe) -> dict[str, Metric]:
    """{label: metric} of `eval.metrics`; the label is the name, with a counter for repeats."""
    out: dict[str, Metric] = {}
    for cfg in recipe.eval.metric_configs():
        kwargs = dict(cfg.kwargs)
        if cfg.name in ("meteor", "bertscore") and recipe.cache_dir is not None:
            kwargs.setdefault("cache_dir", recipe.cache_dir)
        label = cfg.name if cfg.name not in out else f"{cfg.name}_{len(out)}"
        try:
            out[label] = get_metric(cfg.name, **kwargs)
        except ValueError as e:
            raise ValueError(f"eval.metrics: {e}") from None
    return out


def _response_logprobs(ref_logprobs: Optional[torch.Tensor], mask: torch.Tensor) -> list[list[float]]:
    if ref_logprobs is None:
        return [[] for _ in range(mask.shape[0])]
    return [lp[m.bool()].tolist() for lp, m in zip(ref_logprobs.float().cpu(), mask.cpu())]


class Evaluator:
    """Scores evaluation rollouts with the recipe's metrics; only the main rank computes and writes."""

    def __init__(self, recipe: Recipe, run_dir: Path, is_main: bool):
        self.recipe, self.run_dir, self.is_main = recipe, Path(run_dir), is_main
        self.metrics = build_metrics(recipe) if is_main else {}
        self.needs_ref_logprobs = any(c.name == "perplexity" for c in recipe.eval.metric_configs())

    def __call__(self, step: int, split: str, raw_prompts: list[str], rollout, reward_parts: Optional[dict] = None,
                 ref_logprobs: Optional[torch.Tensor] = None) -> dict[str, float]:
        """Corpus metrics {"<metric>/<key>": float} of this evaluation rollout (empty on other ranks).

        `ref_logprobs` [B, R]: the reference model's log-probs of the response tokens at temperature 1
        (perplexity); `reward_parts` {name: [B]}: each reward's value, saved with the predictions.
        """
        r = rollout
        local = {"prompt": raw_prompts, "response": r.responses,
                 "references": r.references or [[] for _ in r.responses],
                 "meta": r.meta or [None for _ in r.responses], "score": r.scores.float().cpu().tolist(),
                 "ref_logprobs": _response_logprobs(ref_logprobs, r.response_mask)}
        for name, values in (reward_parts or {}).items():
            local[f"reward/{name}"] = values.float().cpu().tolist()
        rows = {k: gather_lists(v) for k, v in local.items()}
        if not self.is_main:
            return {}
        context = {"ref_logprobs": rows["ref_logprobs"]} if self.needs_ref_logprobs else {}
        corpus, per = compute_metrics(self.metrics, rows["prompt"], rows["response"], rows["references"],
                                      rows["meta"], **context)
        if self.recipe.eval.save_predictions:
            self._write(step, split, rows, per)
        return corpus

    def _write(self, step: int, split: str, rows: dict, per: dict) -> None:
        folder = self.run_dir / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{split}-step-{step}.jsonl"
        keys = [k for k in rows if k != "ref_logprobs"]
        with open(path, "w", encoding="utf-8") as f:
            for i in range(len(rows["response"])):
                record = {k: rows[k][i] for k in keys}
                record.update({k: v[i] for k, v in per.items()})
                f.write(json.dumps(record, default=str) + "\n")
