"""NLPO's mask model (Ramamurthy et al. 2023, RL4LMs' "learned_top_p" mask).

NLPO is PPO whose policy samples only inside the top-p tokens of a *mask model*: a frozen copy of
the actor, re-synced every ``ppo.nlpo_mask_update_every`` steps, so the action space shrinks to
what a slightly older policy finds plausible. The mask (``rl.top_p_token_mask``) is taken at each
generation step and stored in the rollout (``Rollout.allowed``); every actor log-prob of that
rollout (old, new, generation) is then under the masked, renormalised distribution. The reference
and its KL penalty stay unmasked.
"""
from __future__ import annotations

import deepspeed
import torch

from rlhf_engine import seq2seq
from rlhf_engine.distributed import create_frozen_engine, unwrap
from rlhf_engine.models import load_policy


def build_mask_model(recipe, sizes):
    """A full (unsharded) frozen copy of the actor's architecture on every rank: decoded step by step
    beside the actor, so it must not need collectives. Weights come from `sync_mask_model`."""
    if recipe.model.lora is not None:
        raise ValueError("ppo.algorithm nlpo does not support model.lora yet (the mask model copies the actor's "
                         "full weights); train all weights or use ppo")
    model = load_policy(recipe.model, recipe.cache_dir, for_training=False)
    if seq2seq.is_seq2seq(model):
        raise ValueError("ppo.algorithm nlpo supports causal LM policies only (the masked log-probs follow the "
                         "causal forward); use ppo for encoder-decoder models")
    return create_frozen_engine(model, recipe, sizes, zero_stage=0)


@torch.no_grad()
def sync_mask_model(mask_model, actor) -> None:
    """Copy the actor's current weights into the mask model (ZeRO-3 actor: gathered one parameter at a
    time; every rank calls this together)."""
    source = dict(unwrap(actor).named_parameters())
    for name, target in unwrap(mask_model).named_parameters():
        param = source[name]
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param]):
                target.copy_(param.data.to(target.dtype))
        else:
            target.copy_(param.data.to(target.dtype))
