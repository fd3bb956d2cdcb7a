"""The RL loop: PPO (and GRPO / RLOO / REINFORCE++ through the advantage registry).

`train_rl(recipe)` reads top to bottom: build everything once, then each step runs
1. generate  2. score  3. shape  4. advantages  5. update  6. log / evaluate / checkpoint.
The math lives in engine/rl.py and kernels/; models and DeepSpeed wiring in models.py and
distributed.py; this file only wires them in order.
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_engine import kernels
from rlhf_engine import rl
from rlhf_engine.batching import EpochSampler
from rlhf_engine.batching import chunks as _micro_slices
from rlhf_engine.checkpoint import CheckpointManager
from rlhf_engine.config import Recipe, derive_batch_sizes
from rlhf_engine.data import collate_prompts, load_prompts
from rlhf_engine.distributed import (DistInfo, barrier, create_frozen_engine, create_train_engine,
                                ds_config, init_distributed, unwrap, zero_init_context)
from rlhf_engine.distributed import all_reduce_sum as _global_sum, global_mean as _global_mean, global_std as _global_std
from rlhf_engine.hybrid import HybridEngine
from rlhf_engine.models import dtype_of, load_policy, load_scalar_model, load_tokenizer
from rlhf_engine.rewards import build_reward, check_scores
from rlhf_engine.rollout import Rollout, forward_logprobs, forward_values, generate, micro_batched
from rlhf_engine.tracking import Tracker, archive_previous_run, plot_metrics, run_dir_for


class PromptSampler:
    """Seeded epoch orders of prompt indices (`batching.EpochSampler`); every rank draws the same global batch."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int):
        if num_prompts < batch_size:
            raise ValueError(f"data: {num_prompts} training prompts but train.rollout_batch_size is {batch_size}; "
                             "add prompts or lower the batch size")
        self.order, self.step = EpochSampler(num_prompts, batch_size, seed), 0

    def next_batch(self) -> list[int]:
        idx = self.order.batch(self.step)  # the ragged tail is dropped: every step sees a full batch
        self.step += 1
        return idx

    def state_dict(self) -> dict:
        epoch, k = divmod(self.step, self.order.steps_per_epoch)
        return {"epoch": epoch, "pos": k * self.order.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["epoch"] * self.order.steps_per_epoch + state["pos"] // self.order.batch_size


@dataclass
class Models:
    actor: object  # DeepSpeed engine (trained)
    reference: object  # frozen engine or module
    critic: Optional[object]  # DeepSpeed engine of a ScalarModel (per-token values), PPO only
    hybrid: HybridEngine


class Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t


def build_models(recipe: Recipe, sizes, dist: DistInfo, total_updates: int) -> Models:
    """Actor (trained), reference (frozen), critic (trained, PPO only) as DeepSpeed engines."""
    cache = recipe.cache_dir
    with zero_init_context(ds_config(recipe, sizes)):
        actor_model = load_policy(recipe.model, cache)
    actor = create_train_engine(actor_model, recipe, sizes, total_steps=total_updates)
    ref_cfg = recipe.reference or recipe.model
    with zero_init_context(ds_config(recipe, sizes, trainable=False)):
        ref_model = load_policy(ref_cfg, cache, for_training=False)
    reference = create_frozen_engine(ref_model, recipe, sizes)
    critic = None
    if rl.needs_critic(recipe.ppo.algorithm):
        critic_cfg = critic_model_config(recipe)
        with zero_init_context(ds_config(recipe, sizes)):
            scalar = load_scalar_model(critic_cfg, cache, dtype=recipe.critic.dtype, init_head_seed=recipe.seed)
        critic = create_train_engine(scalar, recipe, sizes, lr=recipe.critic.lr or recipe.optim.lr,
                                     total_steps=total_updates)
    gen = recipe.generation
    hybrid = HybridEngine(actor, layers_per_group=recipe.hybrid.layers_per_group, enabled=recipe.hybrid.enabled,
                          dtype=dtype_of(gen.dtype) if gen.dtype else None,
                          attn_implementation=gen.attn_implementation)
    return Models(actor, reference, critic, hybrid)


def critic_model_config(recipe: Recipe):
    """The critic backbone's ModelConfig from `critic.init_from`; LoRA only from `critic.lora`
    (the actor's `model.lora` does not carry over), gradient checkpointing from the critic's own
    setting if given."""
    src, update = recipe.critic.init_from, {"lora": recipe.critic.lora}
    if recipe.critic.gradient_checkpointing is not None:
        update["gradient_checkpointing"] = recipe.critic.gradient_checkpointing
    if src == "actor":
        return recipe.model.model_copy(update=update)
    if src == "reward":
        if recipe.reward is None or recipe.reward.model is None:
            raise ValueError("critic.init_from 'reward' needs reward.type 'model' with reward.model set")
        return recipe.reward.model.model_copy(update=update)
    return recipe.model.model_copy(update={"name_or_path": src, "gguf_file": None, **update})


def train_rl(recipe: Recipe, dist: Optional[DistInfo] = None, resume: Optional[str] = None) -> dict:
    """Run the RL stage of `recipe`; returns a summary (scores before/after, KL, paths).

    `resume`: "auto" (newest checkpoint of the run folder, if any) or a checkpoint path.
    """
    dist = dist or init_distributed(recipe.num_threads)
    sizes = derive_batch_sizes(recipe, dist.world_size)
    ppo, gen, tcfg = recipe.ppo, recipe.generation, recipe.train
    torch.manual_seed(recipe.seed)  # identical initialisation on every rank
    run_dir = run_dir_for(recipe)
    if dist.is_main and not resume:
        moved = archive_previous_run(run_dir)
        if moved:
            print(f"[run] an earlier run in {run_dir} was moved to {moved}", flush=True)
    barrier()
    tracker = Tracker(recipe, run_dir, is_main=dist.is_main, total_steps=tcfg.steps)

    # ---- build: tokenizer, data, models, reward, KL controller ---------------------------------
    tokenizer = load_tokenizer(recipe.model, recipe.cache_dir)
    train_ds, eval_ds, report = load_prompts(recipe.data, tokenizer, recipe.seed)
    if dist.is_main:
        print(f"[data] {recipe.data.path}: {report}", flush=True)
    updates_per_step = ppo.ppo_epochs * sizes.num_mini_batches
    models = build_models(recipe, sizes, dist, total_updates=tcfg.steps * updates_per_step)
    reward_fn = build_reward(recipe.reward, policy_tokenizer=tokenizer, cache_dir=recipe.cache_dir,
                             device=dist.device)
    if (recipe.reward.share_reference_backbone and hasattr(reward_fn, "share_backbone")
            and reward_fn.share_backbone(unwrap(models.reference))):
        if dist.is_main:
            print("[models] the reward model's backbone is the reference's (same checkpoint, equal weights): "
                  "one frozen forward scores both", flush=True)
    kl_ctl = rl.make_kl_controller(ppo)
    score_stats = rl.RunningMoments()
    sampler = PromptSampler(len(train_ds), tcfg.rollout_batch_size, recipe.seed)
    local_prompts = sizes.local_rollout_sequences // ppo.group_size
    eval_items = _eval_items(eval_ds if eval_ds is not None and len(eval_ds) else train_ds, tcfg.eval_size, dist)

    def make_rollout(items, *, with_values: bool = True, fused_rows: Optional[torch.Tensor] = None,
                     fuse_critic: bool = False) -> tuple[Rollout, dict]:
        """Steps 1-2: generate with the hybrid engine, then score (no grad).

        `fused_rows` (fused scoring): rows whose actor log-probs (and critic values if `fuse_critic`)
        come from the update's own forward instead (`_forward_with_grad`); 0 here until it fills them.
        """
        timer = Timer()
        batch = collate_prompts(items, tokenizer.pad_token_id)
        ids, pmask = batch["input_ids"].to(dist.device), batch["attention_mask"].to(dist.device)
        with timer("generate"), models.hybrid.inference() as gen_model:
            resp, rmask, has_eos = generate(gen_model, tokenizer, ids, pmask, gen,
                                            batch_size=tcfg.generation_batch_size)
        r = Rollout(ids, pmask, resp, rmask, has_eos, batch["prompts"],
                    tokenizer.batch_decode(resp, skip_special_tokens=True))
        seq, attn, R = r.sequences, r.attention_mask, resp.shape[1]
        mb = tcfg.scoring_batch_size or sizes.micro_batch_size  # no grad: no activations are kept
        all_rows = torch.arange(len(seq), device=seq.device)
        rows = all_rows if fused_rows is None else all_rows[~torch.isin(all_rows, fused_rows.to(seq.device))]
        critic_rows = rows if fuse_critic else all_rows
        with timer("score"), torch.no_grad():
            r.logprobs = _score_rows(lambda s, a: forward_logprobs(models.actor, s, a, R, gen.temperature),
                                     rows, mb, seq, attn, rmask)
            if with_values and models.critic is not None:
                r.values = _score_rows(lambda s, a: forward_values(models.critic, s, a, R),
                                       critic_rows, mb, seq, attn, rmask)
            r.ref_logprobs, r.scores = _score_reference_and_reward(models.reference, reward_fn, r, mb, gen.temperature)
        return r, {**timer.times, **{f"hybrid/{k}": v for k, v in models.hybrid.last_timings.items()}}

    def evaluate(step: int) -> dict:
        """Mean reward of sampled responses to the fixed eval prompts (seeded, RNG state restored)."""
        if not eval_items:  # train.eval_size: 0 (benchmarks)
            return {"score/mean": float("nan"), "kl/mean": float("nan"), "samples": []}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed + 7919)
            r, _ = make_rollout(eval_items, with_values=False)
        n = recipe.logging.num_samples
        out = {"score/mean": _global_mean(r.scores), "response/length": _global_mean(r.response_mask.sum(1)),
               "kl/mean": _global_mean(((r.logprobs - r.ref_logprobs) * r.response_mask).sum(1))}
        tracker.log_eval(step, out)
        tracker.log_samples(step, r.prompts[:n], r.responses[:n], r.scores[:n].tolist(), tag="eval")
        raw = [item["raw"] for item in eval_items[:3]]
        return {**out, "samples": list(zip(raw, r.responses[:3], r.scores[:3].tolist()))}

    torch.manual_seed(recipe.seed + dist.rank)  # sampling RNG: independent of how models were built
    ckpt = CheckpointManager(run_dir, recipe.checkpoint.keep_last, is_main=dist.is_main, tokenizer=tokenizer)
    engines = {"actor": models.actor, **({"critic": models.critic} if models.critic is not None else {})}
    start, before = 1, None
    resume_from = ckpt.resolve(resume) if resume else None
    if resume_from is not None:  # restores weights, optimizers, LR schedules and this rank's RNG
        state = ckpt.load(resume_from, engines)
        start, before = state["step"] + 1, state["before"]
        sampler.load_state_dict(state["sampler"])
        kl_ctl.load_state_dict(state["kl_controller"])
        score_stats.load_state_dict(state["score_stats"])
        tracker.drop_after(state["step"])
        if dist.is_main:
            print(f"[resume] from {resume_from} (step {state['step']})", flush=True)
    if before is None:
        before = evaluate(0)
        if dist.is_main and eval_items:
            print(f"[eval] step 0: score {before['score/mean']:.4f}", flush=True)

    def save(step: int) -> None:
        ckpt.save(step, engines, {"sampler": sampler.state_dict(), "kl_controller": kl_ctl.state_dict(),
                                  "score_stats": score_stats.state_dict(), "before": before})

    # fused scoring: the first mini-batch of the first epoch is updated by a policy that has not
    # moved yet, so its own forward's log-probs ARE the rollout's: those rows skip the actor's
    # scoring pass. The critic is fused too only when that mini-batch is the whole rollout: both
    # graphs then stay alive until the advantages exist (+1 graph of activations), which pays for
    # itself by a whole critic pass; with several mini-batches it would save only a fraction
    # (measured at 16 x 48, 2 mini-batches, fp32: -0.9 s of 20 s for +630 MiB peak RSS).
    # ZeRO-3 reduces a parameter's gradient once per forward/backward pair, so several forwards
    # before the first backward are only safe when that mini-batch is one micro-batch per rank there.
    fused = ppo.fuse_scoring and (recipe.deepspeed.zero_stage < 3 or sizes.gradient_accumulation_steps == 1)
    fuse_critic = fused and sizes.num_mini_batches == 1
    local_mini = sizes.local_rollout_sequences // sizes.num_mini_batches
    t_start = time.perf_counter()
    for step in range(start, tcfg.steps + 1):
        t_step = time.perf_counter()
        # ---- 1-2. generate and score -------------------------------------------------------------
        global_idx = sampler.next_batch()
        mine = global_idx[dist.rank * local_prompts:(dist.rank + 1) * local_prompts]
        items = [train_ds[i] for i in mine for _ in range(ppo.group_size)]  # groups stay contiguous
        orders = _epoch_orders(recipe.seed, step, len(items), ppo.ppo_epochs)
        first_rows = orders[0][:local_mini] if fused else None
        r, times = make_rollout(items, fused_rows=first_rows, fuse_critic=fuse_critic)
        mask = r.response_mask
        forwards = (_forward_with_grad(models, r, first_rows, sizes, gen.temperature, times, with_critic=fuse_critic)
                    if fused else None)

        # ---- 3. shape: penalties, clipping, normalisation, per-token KL --------------------------
        scores = rl.apply_missing_eos_penalty(r.scores, r.has_eos, ppo.missing_eos_penalty)
        scores = rl.clip_scores(scores, ppo.score_clip)
        if ppo.normalize_rewards:
            score_stats.update(_all_gather_cat(scores))
            scores = score_stats.normalize(scores)
        rewards, kl = rl.shape_rewards(scores, r.logprobs, r.ref_logprobs, mask, kl_ctl.value, ppo.kl_estimator)

        # ---- 4. advantages ------------------------------------------------------------------------
        advantages, returns = rl.compute_advantages(
            ppo.algorithm, rewards=rewards, values=r.values, response_mask=mask, gamma=ppo.gamma, lam=ppo.lam,
            whiten=ppo.whiten_advantages, group_size=ppo.group_size)

        # ---- 5. update: epochs x mini-batches x micro-batches -------------------------------------
        t_train = time.perf_counter()
        stats = _update(models, r, advantages, returns, sizes, recipe, orders, forwards)
        times["train"] = time.perf_counter() - t_train

        # ---- 6. KL controller, log, evaluate --------------------------------------------------------
        seq_kl = _global_mean((kl * mask).sum(1))
        beta = kl_ctl.value
        kl_ctl.update(seq_kl, sizes.rollout_sequences)
        step_s = time.perf_counter() - t_step
        n_tokens = float(_global_sum(mask.sum()))
        metrics = {
            "score/mean": _global_mean(r.scores), "score/std": _global_std(r.scores),
            "reward/mean": _global_mean((rewards * mask).sum(1)), "kl/mean": seq_kl, "kl/beta": beta,
            "response/length": _global_mean(mask.sum(1)), "response/eos_rate": _global_mean(r.has_eos.float()),
            "advantages/mean": _global_mean(kernels.masked_mean(advantages, mask, dim=-1)),
            **stats, **{f"time/{k}": v for k, v in times.items()}, "time/step": step_s,
            "tokens_per_s": n_tokens / step_s,
            "memory/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if returns is not None:
            metrics["returns/mean"] = _global_mean(kernels.masked_mean(returns, mask, dim=-1))
        if step % recipe.logging.log_every == 0 or step == tcfg.steps:
            tracker.log_metrics(step, metrics)
        if step % recipe.logging.samples_every == 0:
            n = recipe.logging.num_samples
            tracker.log_samples(step, r.prompts[:n], r.responses[:n], r.scores[:n].tolist())
        tracker.progress("rl", step, tcfg.steps,
                         f"score {metrics['score/mean']:+.3f}  kl {seq_kl:.3f}  "
                         f"{metrics['tokens_per_s']:.0f} tok/s  {step_s:.1f}s/step")
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
            evaluate(step)
        every = recipe.checkpoint.save_every
        if (every and step % every == 0) or (step == tcfg.steps and recipe.checkpoint.save_final):
            save(step)

    after = evaluate(tcfg.steps)
    barrier()
    summary = {"run_dir": str(run_dir), "steps": tcfg.steps, "train_seconds": time.perf_counter() - t_start,
               "score_before": before["score/mean"], "score_after": after["score/mean"],
               "kl_after": after["kl/mean"], "samples_before": before["samples"], "samples_after": after["samples"]}
    if dist.is_main:
        summary["plots"] = [str(p) for p in plot_metrics(run_dir)] if recipe.logging.plots else []
    tracker.close()
    return summary


def _score_rows(forward, rows: torch.Tensor, micro: int, seq: torch.Tensor, attn: torch.Tensor,
                rmask: torch.Tensor) -> torch.Tensor:
    """Per-token outputs [B, R] of `forward(seq, attn)` for `rows` in micro-batches, masked; 0 at other rows."""
    out = torch.zeros_like(rmask, dtype=torch.float32)
    if len(rows):
        out[rows] = micro_batched(forward, micro, seq[rows], attn[rows]).float() * rmask[rows]
    return out


def _epoch_orders(seed: int, step: int, n_rows: int, epochs: int) -> list[torch.Tensor]:
    """The order in which each PPO epoch visits this rank's rollout rows (its mini-batches are
    consecutive slices of it): one seeded permutation per epoch, drawn before scoring so that fused
    scoring knows the first mini-batch."""
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randperm(n_rows, generator=generator) for _ in range(epochs)]


def _forward_with_grad(models: Models, r: Rollout, rows: torch.Tensor, sizes, temperature: float,
                       times: dict, with_critic: bool) -> list:
    """Fused scoring: the first update's actor (and, `with_critic`, critic) forwards with grad over
    `rows`, one per micro-batch.

    Fills r.logprobs (and r.values) at those rows from them (detached) and returns
    [(micro_rows, logprobs, entropy, values or None)] for `_update`; the autograd graphs stay alive
    until their backward (memory: activations of one mini-batch, as for one big micro-batch).
    """
    t = time.perf_counter()
    seq, attn, mask, R = r.sequences, r.attention_mask, r.response_mask, r.response_ids.shape[1]
    out = []
    for micro in _micro_slices(rows, sizes.micro_batch_size):
        logp, entropy = forward_logprobs(models.actor, seq[micro], attn[micro], R, temperature, return_entropy=True)
        values = None
        if with_critic and models.critic is not None:
            values = forward_values(models.critic, seq[micro], attn[micro], R)
        out.append((micro, logp, entropy, values))
        r.logprobs[micro] = logp.detach().float() * mask[micro]
        if values is not None:
            r.values[micro] = values.detach().float() * mask[micro]
    times["train_forward"] = time.perf_counter() - t
    return out


def _update(models: Models, r: Rollout, advantages, returns, sizes, recipe: Recipe, orders: list,
            forwards: Optional[list] = None) -> dict:
    """PPO epochs x mini-batches; each micro-batch loss is weighted so that accumulation is exact.

    `orders`: each epoch's row order (`_epoch_orders`); mini-batches are its consecutive slices.
    `forwards` (fused scoring) supplies the first mini-batch's forward outputs, already computed
    by `_forward_with_grad`.

    DeepSpeed divides every micro-batch loss by the accumulation steps; weighting each micro-batch
    by (its tokens / the local mini-batch's tokens) x accumulation steps makes the accumulated
    gradient equal to one pass over the whole mini-batch, however it is split.
    """
    ppo, gen = recipe.ppo, recipe.generation
    actor, critic = models.actor, models.critic
    mask, R = r.response_mask, r.response_ids.shape[1]
    seq, attn = r.sequences, r.attention_mask
    local_B = mask.shape[0]
    local_mini = local_B // sizes.num_mini_batches
    gas = sizes.gradient_accumulation_steps
    agg = {}
    for epoch, perm in enumerate(orders):
        for m in range(sizes.num_mini_batches):
            rows = perm[m * local_mini:(m + 1) * local_mini]
            mini_tokens = mask[rows].sum().clamp(min=1.0)
            for i, micro in enumerate(_micro_slices(rows, sizes.micro_batch_size)):
                weight = mask[micro].sum() / mini_tokens * gas
                if forwards is not None and epoch == 0 and m == 0:
                    fused_rows, logp, entropy, values = forwards[i]
                    assert torch.equal(fused_rows, micro), "fused forward and update disagree on the rows"
                else:
                    logp, entropy = forward_logprobs(actor, seq[micro], attn[micro], R, gen.temperature,
                                                     return_entropy=True)
                    values = None
                pg_loss, pg_stats = rl.policy_loss(logp, r.logprobs[micro], advantages[micro], mask[micro],
                                                   ppo.cliprange)
                loss = pg_loss
                if ppo.entropy_coef > 0:
                    loss = loss + rl.entropy_bonus(entropy, mask[micro], ppo.entropy_coef)
                actor.backward(loss * weight)
                actor.step()
                _accumulate(agg, {"loss/policy": pg_loss.detach(), "policy/clipfrac": pg_stats["clipfrac"],
                                  "policy/approx_kl": pg_stats["approx_kl"],
                                  "entropy": kernels.masked_mean(entropy.detach(), mask[micro])})
                if critic is not None:
                    if values is None:  # not from the fused forward
                        values = forward_values(critic, seq[micro], attn[micro], R)
                    v_loss, v_stats = rl.value_loss(values, r.values[micro], returns[micro], mask[micro],
                                                    ppo.cliprange_value)
                    critic.backward(ppo.vf_coef * v_loss * weight)
                    critic.step()
                    _accumulate(agg, {"loss/value": v_loss.detach(), "value/clipfrac": v_stats["vf_clipfrac"]})
    out = {k: _global_mean(torch.stack(v)) for k, v in agg.items()}
    out["lr"] = actor.get_lr()[0] if hasattr(actor, "get_lr") else recipe.optim.lr
    return out


def _accumulate(agg: dict, values: dict) -> None:
    for k, v in values.items():
        agg.setdefault(k, []).append(v.float().reshape(()))


def _score_reference_and_reward(reference, reward_fn, r: Rollout, micro: int, temperature: float):
    """Reference log-probs [B, R] (0 past the response mask) and sequence scores [B] of a rollout (no grad).

    A reward model that shares the reference's backbone (``ModelReward.share_backbone``) scores
    from the reference forward's final hidden states: one frozen forward per micro-batch.
    """
    seq, attn, mask, R = r.sequences, r.attention_mask, r.response_mask, r.response_ids.shape[1]
    if not getattr(reward_fn, "shared_backbone", False):
        ref_lp = micro_batched(lambda s, a: forward_logprobs(reference, s, a, R, temperature), micro, seq, attn)
        return ref_lp * mask, _score(reward_fn, r, seq, attn)
    ref_lp, scores = [], []
    for rows in _micro_slices(torch.arange(len(seq)), micro):
        hidden = []
        ref_lp.append(forward_logprobs(reference, seq[rows], attn[rows], R, temperature, hidden_out=hidden))
        scores.append(reward_fn.score_hidden(hidden[0], seq[rows], attn[rows],
                                             prompts=[r.prompts[i] for i in rows.tolist()],
                                             responses=[r.responses[i] for i in rows.tolist()]))
    return torch.cat(ref_lp) * mask, torch.cat(scores).to(seq.device).float()


def _score(reward_fn, r: Rollout, seq, attn) -> torch.Tensor:
    """Sequence scores [B] from the reward function, checked for NaN / errors."""
    if hasattr(reward_fn, "score_tokens"):
        scores = reward_fn.score_tokens(seq, attn, prompts=r.prompts, responses=r.responses)
    else:
        scores = reward_fn(r.prompts, r.responses)
    return check_scores(scores, reward_fn.name, r.prompts, r.responses).to(seq.device).float()


def _eval_items(ds, size: int, dist: DistInfo) -> list:
    """This rank's share of the fixed evaluation prompts (strided, so sizes differ by at most one)."""
    n = min(size, len(ds)) if size else 0
    n -= n % dist.world_size  # equal shares keep the ranks' collective calls in step
    return [ds[i] for i in range(dist.rank, n, dist.world_size)]


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)
