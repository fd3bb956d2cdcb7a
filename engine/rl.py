"""Pure RL math: shaped rewards, advantage estimators, losses, KL controllers.

No models and no process groups here: every function takes tensors and returns tensors, so the
trainer reads as a sequence of calls and the tests can check each step by hand. KL, GAE, whitening
and masked means all go through ``kernels`` (Triton on CUDA, chunked torch on CPU).

Shapes: ``B`` = sequences (prompts x group_size on this rank), ``T`` = response tokens (padded).
``response_mask[b, t] = 1`` for real response tokens (EOS included), 0 for padding after them.
Every returned per-token tensor is 0 where the mask is 0.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch

from rlhf_engine import kernels

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


# --------------------------------------------------------------------------------------------
# scores and shaped rewards
def clip_scores(scores: torch.Tensor, clip: Optional[float]) -> torch.Tensor:
    """Clamp sequence scores [B] to [-clip, clip]; ``clip=None`` returns them unchanged."""
    return scores if clip is None else scores.clamp(-clip, clip)


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: Optional[float]) -> torch.Tensor:
    """Add ``penalty`` (usually negative) to scores [B] of responses that never emitted EOS (has_eos [B] bool)."""
    if penalty is None:
        return scores
    return scores + penalty * (~has_eos.bool()).to(scores.dtype)


class RunningMoments:
    """Running mean / std of every score seen so far (for ``ppo.normalize_rewards``).

    Distributed-agnostic: pass ``update`` the scores of *all* ranks (the trainer gathers them),
    so every rank keeps identical moments. Kept in float64 Python numbers so checkpoints are exact.
    """

    def __init__(self, eps: float = 1e-8):
        self.mean, self.m2, self.count, self.eps = 0.0, 0.0, 0, eps

    @property
    def std(self) -> float:
        """Sample std of everything seen (1.0 before two values exist, so dividing is a no-op)."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, scores: torch.Tensor) -> tuple[float, float]:
        """Fold scores (any shape) into the moments (Chan's parallel update); return the batch mean and std."""
        x = scores.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return 0.0, 0.0
        b_mean = x.mean().item()
        b_m2 = ((x - b_mean) ** 2).sum().item()
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta ** 2 * self.count * n / total
        self.count = total
        return b_mean, math.sqrt(b_m2 / (n - 1)) if n > 1 else 0.0

    def normalize(self, scores: torch.Tensor, shift_mean: bool = False) -> torch.Tensor:
        """Scores [B] divided by the running std (and minus the running mean if ``shift_mean``)."""
        shifted = scores - self.mean if shift_mean else scores
        return shifted / (self.std + self.eps)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.m2, self.count = float(state["mean"]), float(state["m2"]), int(state["count"])


def _zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with 0 where mask is 0 (where, not multiply: padding may hold inf/nan from garbage inputs)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last mask=1 position of each row; raises if a row has no response token."""
    lengths = response_mask.sum(-1)
    if bool((lengths == 0).any()):
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"response_mask rows {rows} have no response token, so their score has no token to "
                         "sit on; every response needs at least one token (check generation / EOS masking)")
    positions = torch.arange(response_mask.shape[-1], device=response_mask.device)
    return (positions * response_mask.bool()).argmax(-1)


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  response_mask: torch.Tensor, kl_coef: float, estimator: str = "k1",
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL_t everywhere, plus the sequence score on the last response token.

    scores [B]; logprobs, ref_logprobs, response_mask [B, T]. Returns (rewards [B, T], kl [B, T]),
    both float32 and 0 on padding. ``kl`` is the unscaled per-token estimate (for logging and the
    adaptive controller: its row sum is the sequence KL).
    """
    kl = _zero_pad(kernels.kl_penalty(logprobs, ref_logprobs, estimator), response_mask)
    rewards = -kl_coef * kl
    last = last_token_index(response_mask)
    rewards = rewards.scatter_add(-1, last[:, None], scores.to(rewards.dtype)[:, None])
    return rewards, kl


# --------------------------------------------------------------------------------------------
# advantage estimators: name -> fn(**kw) -> (advantages [B, T], returns [B, T] | None)
ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def register_advantage_estimator(name: str, *, needs_critic: bool = False) -> Callable:
    """Decorator adding an estimator to the registry; add the same name to PPOConfig.algorithm.

    The function is called with keywords: rewards [B, T] (shaped), response_mask [B, T], values [B, T]
    (or None), gamma, lam, group_size, whiten; it must accept **unused keywords and return
    (advantages [B, T], returns [B, T] or None), zero where the mask is 0.
    """
    def add(fn: Callable) -> Callable:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator '{name}' is registered twice")
        fn.needs_critic = needs_critic
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return add


def _estimator(name: str) -> Callable:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator '{name}' (ppo.algorithm); valid ones: "
                         f"{', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    return ADVANTAGE_ESTIMATORS[name]


def needs_critic(name: str) -> bool:
    """True if the estimator uses critic values (the trainer builds a critic only then)."""
    return _estimator(name).needs_critic


def compute_advantages(name: str, **kw) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the registered estimator ``name`` with keywords (see ``register_advantage_estimator``)."""
    return _estimator(name)(**kw)


def _sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of shaped rewards per row [B] = score - beta * sum_t KL_t (KL enters critic-free estimators here)."""
    return _zero_pad(rewards, mask).sum(-1)


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [B / group_size, group_size]: consecutive rows are the samples of one prompt."""
    if group_size < 2 or x.shape[0] % group_size:
        raise ValueError(f"group baselines need group_size >= 2 dividing the batch; got batch {x.shape[0]}, "
                         f"group_size {group_size} (ppo.group_size)")
    return x.view(-1, group_size)


@register_advantage_estimator("ppo", needs_critic=True)
def ppo_advantages(*, rewards, values, response_mask, gamma=1.0, lam=0.95, whiten=True, **_):
    """GAE over shaped per-token rewards and critic values; returns = advantages + values (pre-whitening)."""
    if values is None:
        raise ValueError("advantage estimator 'ppo' needs critic values; got values=None")
    # kernels.gae stops at the mask (nothing flows past a response's end) and zeroes padding
    advantages, returns = kernels.gae(rewards, values, response_mask, gamma, lam)
    if whiten:
        advantages = kernels.masked_whiten(advantages, response_mask)
    return advantages, returns


@register_advantage_estimator("grpo")
def grpo_advantages(*, rewards, response_mask, group_size, eps=1e-6, **_):
    """A_i = (R_i - mean_g R) / (std_g R + eps) per group (sample std), broadcast over the response tokens.

    R_i = score_i - beta * sum_t KL_t (KL folded into the reward, not a separate loss term).
    Already normalised per group, so ``whiten`` is ignored.
    """
    mask = response_mask.to(torch.float32)
    grouped = _groups(_sequence_returns(rewards, mask), group_size)
    normed = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + eps)
    return normed.reshape(-1, 1) * mask, None


@register_advantage_estimator("rloo")
def rloo_advantages(*, rewards, response_mask, group_size, whiten=False, **_):
    """A_i = R_i - mean_{j != i} R_j within each group, broadcast over tokens; optional batch whitening."""
    mask = response_mask.to(torch.float32)
    grouped = _groups(_sequence_returns(rewards, mask), group_size)
    leave_one_out = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - leave_one_out).reshape(-1, 1) * mask
    if whiten:
        advantages = kernels.masked_whiten(advantages, mask)
    return advantages, None


@register_advantage_estimator("reinforce++")
def reinforce_pp_advantages(*, rewards, response_mask, gamma=1.0, **_):
    """Returns-to-go G_t = r_t + gamma * G_{t+1} of the shaped rewards, whitened over the batch (its baseline).

    G comes from kernels.gae with zero values and lam=1 (then delta_t = r_t and A_t = G_t).
    """
    returns_to_go, _ = kernels.gae(rewards, torch.zeros_like(rewards), response_mask, gamma, 1.0)
    return kernels.masked_whiten(returns_to_go, response_mask), None


# --------------------------------------------------------------------------------------------
# losses
def aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """Scalar mean of per-token x [B, T] over mask=1 tokens.

    "token-mean": every token of the batch weighs the same (long responses count more; the default).
    "seq-mean-token-mean": mean over each response's tokens, then over responses (each response
    weighs the same). Both are means over this call's tokens: with gradient accumulation the
    trainer's micro-batches each get their own mean.
    """
    mask = mask.to(torch.float32)
    if loss_agg == "token-mean":
        return kernels.masked_mean(x, mask)
    if loss_agg == "seq-mean-token-mean":
        return kernels.masked_mean(x, mask, dim=-1).mean()
    raise ValueError(f"unknown loss_agg '{loss_agg}'; expected one of {', '.join(LOSS_AGGREGATIONS)}")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float, loss_agg: str = "token-mean",
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: agg(max(-A*rho, -A*clip(rho, 1-eps, 1+eps))), rho = exp(logp - old_logp).

    logprobs (with grad), old_logprobs, advantages, mask [B, T]. Returns (loss scalar, stats) with
    detached scalars: clipfrac (share of tokens where the clipped term wins), approx_kl (k3, old vs new),
    ratio (mean rho).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, loss_agg)
    with torch.no_grad():
        m = mask.to(torch.float32)
        stats = {"clipfrac": kernels.masked_mean((clipped > unclipped).float(), m),
                 "approx_kl": approx_kl(logprobs, old_logprobs, mask),
                 "ratio": kernels.masked_mean(ratio, m)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, loss_agg: str = "token-mean",
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: agg(0.5 * max((V-R)^2, (clip(V, V_old-eps, V_old+eps) - R)^2)).

    values (with grad), old_values, returns, mask [B, T]. Stats: vf_clipfrac (share of tokens where
    the clipped error is the larger one).
    """
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(err, err_clipped), mask, loss_agg)
    with torch.no_grad():
        stats = {"vf_clipfrac": kernels.masked_mean((err_clipped > err).float(), mask.to(torch.float32))}
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, entropy_coef: float,
                  loss_agg: str = "token-mean") -> torch.Tensor:
    """Loss term to ADD to the policy loss: -entropy_coef * agg(entropy [B, T]) (more entropy, lower loss)."""
    return -entropy_coef * aggregate(entropy, mask, loss_agg)


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(old || new) per token, masked mean (samples were drawn from the old policy)."""
    kl = kernels.kl_penalty(old_logprobs.detach(), logprobs.detach(), "k3")
    return kernels.masked_mean(kl, mask.to(torch.float32))


# --------------------------------------------------------------------------------------------
# KL controllers: `.value` is beta; `.update(current_kl, n_steps)` once per RL step
class FixedKLController:
    """Constant beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: e = clip(KL/target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon).

    current_kl is the mean *sequence* KL of the batch (row sums of the per-token KL, averaged);
    n_steps is the number of sequences it was measured on; horizon is in sequences too.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        # beta is the learned state; target/horizon come from the (possibly edited) recipe
        self.value = float(state["value"])


def make_kl_controller(ppo_cfg) -> FixedKLController | AdaptiveKLController:
    """Controller from a PPOConfig (kl_controller, kl_coef, target_kl, kl_horizon)."""
    if ppo_cfg.kl_controller == "fixed":
        return FixedKLController(ppo_cfg.kl_coef)
    if ppo_cfg.kl_controller == "adaptive":
        return AdaptiveKLController(ppo_cfg.kl_coef, ppo_cfg.target_kl, ppo_cfg.kl_horizon)
    raise ValueError(f"ppo.kl_controller: expected 'fixed' or 'adaptive', got {ppo_cfg.kl_controller!r}")


# --------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """In place: ema <- decay * ema + (1 - decay) * param, pairwise (same order and shapes)."""
    ema_list, param_list = list(ema_params), list(params)
    if len(ema_list) != len(param_list):
        raise ValueError(f"ema_update: {len(ema_list)} EMA tensors but {len(param_list)} parameters")
    for ema, p in zip(ema_list, param_list):
        ema.lerp_(p.detach().to(ema.dtype), 1.0 - decay)
