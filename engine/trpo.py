"""TRPO's actor update (Schulman et al. 2015): one natural-gradient step per rollout inside a KL trust region.

The step needs the full policy gradient and Fisher-vector products (a double backward), so it runs
on the plain module at ZeRO stage 0 in fp32 (every rank holds every weight and gradient) and
averages the vectors over ranks itself; DeepSpeed's optimizer is not used for the actor. The math (surrogate,
conjugate gradient, step scaling, line search) is in engine/rl.py; this file only feeds it.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist

from rlhf_engine import kernels, rl, seq2seq
from rlhf_engine.distributed import unwrap
from rlhf_engine.batching import position_ids_from_mask


def check_trpo_supported(recipe) -> None:
    """Clear error where the full gradient is not available on every rank."""
    ds = recipe.deepspeed
    if ds.zero_stage != 0 or ds.precision != "fp32" or ds.offload_optimizer:
        raise ValueError(f"ppo.algorithm trpo needs deepspeed.zero_stage: 0 and precision: fp32 (the "
                         f"conjugate-gradient step uses every rank's full fp32 gradient and finite-difference "
                         f"Fisher-vector products); got zero_stage {ds.zero_stage}, precision {ds.precision}. Use ppo or a2c "
                         "for sharded or half-precision training")


def _average(vec: torch.Tensor) -> torch.Tensor:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(vec)
        vec /= tdist.get_world_size()
    return vec


def _flat(tensors, params) -> torch.Tensor:
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, params)])


def trpo_update(actor, r, advantages: torch.Tensor, ppo, temperature: float, micro: int) -> dict:
    """One TRPO step of the actor over this rank's whole rollout `r` (old log-probs r.logprobs).

    Direction s = F^-1 g by conjugate gradient (F: Hessian of the aggregated per-token KL(old || new)
    over full next-token distributions, plus damping), scaled to KL = ppo.trpo_max_kl, then backtracked
    until the surrogate falls and the sampled KL (k3) stays within 1.5 x max_kl.
    """
    module = unwrap(actor)
    if seq2seq.is_seq2seq(module):
        raise ValueError("ppo.algorithm trpo supports causal LM policies only; use ppo or a2c for "
                         "encoder-decoder models")
    params = [p for p in module.parameters() if p.requires_grad]
    seq, attn, mask, R = r.sequences, r.attention_mask, r.response_mask, r.response_ids.shape[1]
    slices = [torch.arange(len(seq))[i:i + micro] for i in range(0, len(seq), micro)]
    weights = [rl.micro_batch_weight(mask[rows], mask, ppo.loss_agg) for rows in slices]

    def logits_of(rows):
        out = module(input_ids=seq[rows], attention_mask=attn[rows], logits_to_keep=R + 1,
                     position_ids=position_ids_from_mask(attn[rows]), use_cache=False)
        return out.logits[:, -R - 1:-1].float() / temperature

    def token_logprobs(logits, rows):
        return kernels.logprobs_from_logits(logits, seq[rows][:, -R:])

    def surrogate(rows, with_grad: bool):
        with torch.set_grad_enabled(with_grad):
            logp = token_logprobs(logits_of(rows), rows)
            return rl.surrogate_loss(logp, r.logprobs[rows], advantages[rows], mask[rows], ppo.loss_agg), logp

    grad = torch.zeros(sum(p.numel() for p in params))
    loss_before = 0.0
    for rows, w in zip(slices, weights):
        loss, _ = surrogate(rows, True)
        grad += _flat(torch.autograd.grad(loss * w, params, allow_unused=True), params)
        loss_before += float(loss.detach()) * w
    grad = _average(grad)
    loss_before = float(_average(torch.tensor([loss_before]))[0])

    base = [p.detach().clone() for p in params]

    def load(delta: torch.Tensor) -> None:
        """Parameters <- the old ones + delta (flat)."""
        offset = 0
        with torch.no_grad():
            for p, p0 in zip(params, base):
                p.copy_(p0 + delta[offset:offset + p.numel()].view_as(p).to(p.dtype))
                offset += p.numel()

    def fvp(v: torch.Tensor) -> torch.Tensor:
        """F v = J^T (diag(p) - p p^T) J v, J = d logits / d theta: J v by a central difference of two
        no-grad forwards, J^T by one backward (no double backward, which fused kernels lack)."""
        out = torch.zeros_like(v)
        eps = 1e-3 / float(v.abs().max().clamp(min=1e-12))
        for rows, w in zip(slices, weights):
            with torch.no_grad():
                load(eps * v)
                plus = logits_of(rows)
                load(-eps * v)
                jv = (plus - logits_of(rows)) / (2 * eps)
                load(torch.zeros_like(v))
            logits = logits_of(rows)
            probs = logits.detach().softmax(-1)
            curvature = probs * jv - probs * (probs * jv).sum(-1, keepdim=True)  # KL's Hessian in the logits
            term = rl.aggregate((logits * curvature).sum(-1), mask[rows], ppo.loss_agg) * w
            out += _flat(torch.autograd.grad(term, params, allow_unused=True), params)
        return _average(out) + ppo.trpo_damping * v

    direction = rl.conjugate_gradient(fvp, -grad, iters=ppo.trpo_cg_iters)
    full_step = rl.trpo_full_step(direction, fvp(direction), ppo.trpo_max_kl)

    def set_params(frac: float) -> None:
        load(frac * full_step)

    def evaluate(frac: float) -> tuple[float, float]:
        set_params(frac)
        loss, kl = 0.0, 0.0
        for rows, w in zip(slices, weights):
            l, logp = surrogate(rows, False)
            loss += float(l) * w
            kl += float(rl.approx_kl(logp, r.logprobs[rows], mask[rows])) * w
        loss, kl = _average(torch.tensor([loss, kl])).tolist()
        return loss, kl

    frac = rl.backtracking_line_search(evaluate, loss_before, ppo.trpo_max_kl, backtracks=ppo.trpo_backtracks)
    set_params(frac)
    return {"loss/policy": loss_before, "trpo/step_fraction": frac, "trpo/grad_norm": float(grad.norm()),
            "trpo/step_norm": float(full_step.norm() * frac)}
