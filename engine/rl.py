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

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


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
@register_advantage_estimator("a2c", needs_critic=True)
@register_advantage_estimator("trpo", needs_critic=True)
@register_advantage_estimator("nlpo", needs_critic=True)
def ppo_advantages(*, rewards, values, response_mask, gamma=1.0, lam=0.95, whiten=True, **_):
    """GAE over shaped per-token rewards and critic values; returns = advantages + values (pre-whitening).

    Shared by every critic-based algorithm (ppo, a2c, trpo, nlpo): they differ in the policy update only.
    """
    if values is None:
        raise ValueError("critic-based advantage estimators (ppo, a2c, trpo, nlpo) need critic values; got values=None")
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


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(*, rewards, response_mask, group_size, **_):
    """Dr.GRPO (Liu et al. 2025): A_i = R_i - mean_g R, no division by the group std (it over-weights
    groups that are nearly solved or nearly failed). Pair with ``loss_agg: seq-mean-token-sum-norm``.
    """
    mask = response_mask.to(torch.float32)
    grouped = _groups(_sequence_returns(rewards, mask), group_size)
    return (grouped - grouped.mean(-1, keepdim=True)).reshape(-1, 1) * mask, None


@register_advantage_estimator("reinforce++-baseline")
def reinforce_pp_baseline_advantages(*, rewards, response_mask, group_size, gamma=1.0, **_):
    """REINFORCE++-baseline (OpenRLHF): the group mean of the sequence returns R_i is subtracted on each
    response's last token, then returns-to-go of the shaped rewards, whitened over the batch.
    """
    mask = response_mask.to(torch.float32)
    grouped = _groups(_sequence_returns(rewards, mask), group_size)
    baseline = grouped.mean(-1, keepdim=True).expand_as(grouped).reshape(-1)
    last = last_token_index(mask)
    centred = _zero_pad(rewards, mask).scatter_add(-1, last[:, None], -baseline.to(rewards.dtype)[:, None])
    returns_to_go, _ = kernels.gae(centred, torch.zeros_like(centred), mask, gamma, 1.0)
    return kernels.masked_whiten(returns_to_go, mask), None


# --------------------------------------------------------------------------------------------
# sequence-level score terms and batch filters (DAPO)
def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment [B] for response lengths [B] (tokens), added to the scores.

    0 up to max_len - buffer tokens, then falling linearly to -factor at max_len:
    factor * ((max_len - buffer) - L) / buffer; -factor beyond max_len.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer} (ppo.overlong_buffer)")
    over = (lengths.to(torch.float32) - (max_len - buffer)).clamp(min=0.0)
    return -factor * (over / buffer).clamp(max=1.0)


def groups_with_signal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: bool [B / group_size], True for groups whose scores [B] are not
    all equal (a group of equal scores has zero group-relative advantage: no gradient)."""
    grouped = _groups(scores, group_size)
    return (grouped.max(-1).values - grouped.min(-1).values) > 0


# --------------------------------------------------------------------------------------------
# losses
def aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """Scalar of per-token x [B, T] over mask=1 tokens.

    "token-mean": every token of the batch weighs the same (long responses count more; the default; DAPO).
    "seq-mean-token-mean": mean over each response's tokens, then over responses (each response
    weighs the same; GRPO's paper, GSPO).
    "seq-mean-token-sum": sum over each response's tokens, mean over responses.
    "seq-mean-token-sum-norm": that sum divided by the constant T (the generation budget), mean over
    responses (Dr.GRPO: no length bias, and a constant scale).
    All are over this call's rows: the trainer weights micro-batches with ``micro_batch_weight``.
    """
    mask = mask.to(torch.float32)
    if loss_agg == "token-mean":
        return kernels.masked_mean(x, mask)
    if loss_agg == "seq-mean-token-mean":
        return kernels.masked_mean(x, mask, dim=-1).mean()
    if loss_agg == "seq-mean-token-sum":
        return _zero_pad(x, mask).sum(-1).mean()
    if loss_agg == "seq-mean-token-sum-norm":
        return _zero_pad(x, mask).sum(-1).mean() / x.shape[-1]
    raise ValueError(f"unknown loss_agg '{loss_agg}'; expected one of {', '.join(LOSS_AGGREGATIONS)}")


def micro_batch_weight(micro_mask: torch.Tensor, mini_mask: torch.Tensor, loss_agg: str = "token-mean") -> float:
    """Share of a mini-batch's loss that one micro-batch carries, so that summing weighted micro-batch
    losses (each aggregated over its own rows) equals one ``aggregate`` over the whole mini-batch:
    its tokens / the mini-batch's tokens for "token-mean", its rows / the mini-batch's rows otherwise."""
    if loss_agg == "token-mean":
        return float(micro_mask.sum() / mini_mask.sum().clamp(min=1.0))
    return micro_mask.shape[0] / mini_mask.shape[0]


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float, loss_agg: str = "token-mean", *,
                cliprange_high: Optional[float] = None, ratio_level: str = "token",
                weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: agg(w * max(-A*rho, -A*clip(rho, 1-eps_low, 1+eps_high))).

    logprobs (with grad), old_logprobs, advantages, mask [B, T]. ``cliprange`` = eps_low,
    ``cliprange_high`` = eps_high (DAPO's clip-higher; default eps_low). ``ratio_level``:
    "token": rho_t = exp(logp_t - old_logp_t) (PPO); "sequence" (GSPO, Zheng et al. 2025): every token
    of response i uses s_i = exp(mean_t(logp - old_logp)), in the token form sg[s_i] * pi_t / sg[pi_t]
    (same value; with seq-mean-token-mean its gradient is GSPO's). ``weights`` [B, T] (detached):
    per-token off-policy correction (``rollout_correction``), 1 when None.
    Returns (loss, stats) with detached scalars: clipfrac (share of tokens where the clipped term
    wins), approx_kl (k3, old vs new), ratio (mean rho).
    """
    log_ratio = _zero_pad(logprobs - old_logprobs, mask)
    if ratio_level == "sequence":
        seq_log_ratio = kernels.masked_mean(log_ratio, mask.to(torch.float32), dim=-1)
        log_ratio = seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()
    elif ratio_level != "token":
        raise ValueError(f"ratio_level must be 'token' or 'sequence' (ppo.ratio_level), got {ratio_level!r}")
    ratio = torch.exp(log_ratio)
    high = cliprange if cliprange_high is None else cliprange_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate(per_token, mask, loss_agg)
    with torch.no_grad():
        m = mask.to(torch.float32)
        stats = {"clipfrac": kernels.masked_mean((clipped > unclipped).float(), m),
                 "approx_kl": approx_kl(logprobs, old_logprobs, mask),
                 "ratio": kernels.masked_mean(ratio, m)}
    return loss, stats


def a2c_policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    loss_agg: str = "token-mean", weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A2C's (vanilla) policy gradient loss agg(-A * logp) [B, T] -> scalar: one step per rollout, no
    ratio and no clip (RL4LMs' A2C, Mnih et al. 2016); ``weights`` as in ``policy_loss``."""
    per_token = -advantages * logprobs
    return aggregate(per_token if weights is None else per_token * weights, mask, loss_agg)


def surrogate_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """TRPO's unclipped surrogate agg(-A * exp(logp - old_logp)) [B, T] -> scalar (minimised under a KL
    trust region instead of a clip)."""
    return aggregate(-advantages * torch.exp(_zero_pad(logprobs - old_logprobs, mask)), mask, loss_agg)


def conjugate_gradient(fvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> torch.Tensor:
    """Approximately solve F x = b for symmetric positive definite F given only x -> F x (``fvp``);
    b, x are flat [N] vectors. Standard CG (Hestenes & Stiefel), at most ``iters`` products."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= residual_tol:
            break
        fp = fvp(p)
        alpha = rr / (p @ fp)
        x += alpha * p
        r -= alpha * fp
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def trpo_full_step(direction: torch.Tensor, f_direction: torch.Tensor, max_kl: float) -> torch.Tensor:
    """Scale a search direction s = F^-1 g [N] to the trust region's edge: s * sqrt(2 max_kl / s^T F s),
    so the quadratic KL model 0.5 step^T F step equals max_kl (Schulman et al. 2015)."""
    shs = (direction @ f_direction).clamp(min=1e-12)
    return direction * torch.sqrt(2.0 * max_kl / shs)


def backtracking_line_search(evaluate: Callable[[float], tuple[float, float]], loss_before: float,
                             max_kl: float, backtracks: int = 10, shrink: float = 0.5) -> float:
    """Largest fraction f in 1, shrink, shrink^2, ... of the full step whose (loss, kl) = evaluate(f)
    lowers the loss and keeps kl <= 1.5 max_kl (TRPO's acceptance test); 0.0 if none does."""
    frac = 1.0
    for _ in range(backtracks):
        loss, kl = evaluate(frac)
        if loss < loss_before and kl <= 1.5 * max_kl:
            return frac
        frac *= shrink
    return 0.0


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
# NLPO (Ramamurthy et al. 2023, RL4LMs): the policy samples only inside a mask model's top-p tokens
MASKED_LOGIT = -1e9  # finite, so masked tokens get probability 0 without inf - inf = nan in entropies


def top_p_token_mask(logits: torch.Tensor, top_p: float, always: Iterable[int] = ()) -> torch.Tensor:
    """NLPO's action mask from the mask model's next-token logits [..., V] -> bool [..., V].

    Keeps the most likely tokens until their probability exceeds top_p (the token that crosses it
    included, so the most likely token always stays), plus the ``always`` ids (EOS: a reply can end).
    """
    sorted_logits, order = torch.sort(logits.float(), dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = torch.zeros_like(cum, dtype=torch.bool)
    drop[..., 1:] = cum[..., :-1] > top_p  # a token goes once the ones before it already exceed top_p
    keep = ~drop.scatter(-1, order, drop)
    for token in always:
        keep[..., token] = True
    return keep


def mask_logits(logits: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """logits [..., V] with tokens outside ``allowed`` (bool [..., V]) set to MASKED_LOGIT; None: unchanged."""
    return logits if allowed is None else logits.masked_fill(~allowed, MASKED_LOGIT)


# --------------------------------------------------------------------------------------------
# train-inference mismatch and off-policy correction (generation log-probs vs training log-probs)
CORRECTIONS = ("none", "tis", "mis-token", "mis-sequence")


def mismatch_sums(logprobs: torch.Tensor, gen_logprobs: torch.Tensor, mask: torch.Tensor,
                  threshold: float) -> torch.Tensor:
    """Local sums [4] for the train-inference mismatch of one rank (add them over ranks, max for [1]):
    (sum exp|d|, max |d|, tokens with |d| > threshold, tokens), d = logp_train - logp_inference per
    token [B, T] over mask=1. mean exp|d| = [0] / [3] (NeMo-RL's check: <= 1.05 passes)."""
    m = mask.to(torch.bool)
    d = (logprobs.float() - gen_logprobs.float()).abs()[m]
    if d.numel() == 0:
        return torch.zeros(4)
    return torch.stack([d.exp().sum(), d.max(), (d > threshold).float().sum(),
                        torch.tensor(float(d.numel()))]).detach().cpu().double()


def rollout_correction(old_logprobs: torch.Tensor, gen_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str, cap: float) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """Per-token weights [B, T] (detached, 0 on padding) that correct the policy loss for sampling
    with the inference engine: w = exp(old_logp - gen_logp) = pi_train / pi_inference per token.

    "none": (None, {}). "tis" (truncated IS, Yao et al. 2025): min(w, cap). "mis-token" (masked IS):
    1 where 1/cap <= w <= cap, else 0 (the token drops out). "mis-sequence": a whole response drops
    out unless its geometric-mean weight exp(mean_t log w) lies in [1/cap, cap].
    Stats: is/weight_mean (mean raw w), is/corrected_frac (share of tokens truncated or masked).
    """
    if mode == "none":
        return None, {}
    m = mask.to(torch.float32)
    log_w = _zero_pad(old_logprobs.float() - gen_logprobs.float(), m).detach()
    w = log_w.exp()
    bound = math.log(cap)
    if mode == "tis":
        weights, corrected = w.clamp(max=cap), (w > cap).float()
    elif mode == "mis-token":
        keep = (log_w.abs() <= bound).float()
        weights, corrected = keep, 1.0 - keep
    elif mode == "mis-sequence":
        seq_keep = (kernels.masked_mean(log_w, m, dim=-1).abs() <= bound).float()[:, None]
        weights, corrected = seq_keep.expand_as(w), (1.0 - seq_keep).expand_as(w)
    else:
        raise ValueError(f"unknown rollout correction {mode!r} (ppo.rollout_correction); expected one of "
                         f"{', '.join(CORRECTIONS)}")
    stats = {"is/weight_mean": kernels.masked_mean(w, m), "is/corrected_frac": kernels.masked_mean(corrected, m)}
    return weights * m, stats


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
