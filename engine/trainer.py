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
from rlhf_engine.checkpoint import CheckpointManager, prepare_run_dir
from rlhf_engine.config import Recipe, derive_batch_sizes
from rlhf_engine.data import collate_prompts, load_prompts
from rlhf_engine.distributed import (DistInfo, barrier, create_frozen_engine, create_train_engine,
                                ds_config, init_distributed, unwrap, zero_init_context)
from rlhf_engine.distributed import all_reduce_sum as _global_sum, global_mean as _global_mean, global_std as _global_std
from rlhf_engine.ema import EmaActor, evaluate_ema
from rlhf_engine.hybrid import HybridEngine
from rlhf_engine.models import dtype_of, load_policy, load_scalar_model, load_tokenizer
from rlhf_engine.evaluation import Evaluator
from rlhf_engine.ptx import PtxMixer
from rlhf_engine.reward_set import RewardSet, build_recipe_reward
from rlhf_engine.rewards import check_scores
from rlhf_engine.rollout import Rollout, concat_rollouts, forward_logprobs, forward_values, generate, micro_batched
from rlhf_engine.tracking import Tracker, plot_metrics, run_dir_for


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
    mask: Optional[object] = None  # NLPO's mask model (engine/nlpo.py)


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
    mask = None
    if recipe.ppo.algorithm == "nlpo":
        from rlhf_engine.nlpo import build_mask_model
        mask = build_mask_model(recipe, sizes)
    return Models(actor, reference, critic, hybrid, mask)


def critic_model_config(recipe: Recipe):
    """The critic backbone's ModelConfig from `critic.init_from`; LoRA only from `critic.lora`
    (the actor's `model.lora` does not carry over), gradient checkpointing from the critic's own
    setting, else the actor's, whatever model the backbone comes from."""
    checkpointing = recipe.critic.gradient_checkpointing
    src, update = recipe.critic.init_from, {
        "lora": recipe.critic.lora,
        "gradient_checkpointing": recipe.model.gradient_checkpointing if checkpointing is None else checkpointing}
    if src == "actor":
        return recipe.model.model_copy(update=update)
    if src == "reward":
        model_rewards = [r for r in recipe.reward_configs() if r.type == "model"]
        if len(model_rewards) != 1:
            raise ValueError("critic.init_from 'reward' needs exactly one reward of type 'model' with reward.model set")
        return model_rewards[0].model.model_copy(update=update)
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

    # ---- build: tokenizer, data, models, reward, KL controller ---------------------------------
    tokenizer = load_tokenizer(recipe.model, recipe.cache_dir)
    train_ds, eval_ds, report = load_prompts(recipe.data, tokenizer, recipe.seed)
    if dist.is_main:
        print(f"[data] {recipe.data.path}: {report}", flush=True)
    tcfg = _steps_capped_by_epochs(tcfg, len(train_ds), dist.is_main)
    ptx = PtxMixer(recipe, tokenizer, dist, sizes) if ppo.ptx_coef > 0 else None
    updates_per_step = ppo.ppo_epochs * sizes.num_mini_batches
    models = build_models(recipe, sizes, dist, total_updates=tcfg.steps * updates_per_step)
    reward_fn = build_recipe_reward(recipe, policy_tokenizer=tokenizer, device=dist.device,
                                    frozen=(recipe, sizes))
    if (getattr(recipe.reward, "share_reference_backbone", False) and hasattr(reward_fn, "share_backbone")
            and reward_fn.share_backbone(unwrap(models.reference))):
        if dist.is_main:
            print("[models] the reward model's backbone is the reference's (same checkpoint, equal weights): "
                  "one frozen forward scores both", flush=True)
    if ppo.algorithm == "trpo":
        from rlhf_engine.trpo import check_trpo_supported
        check_trpo_supported(recipe)
    ema = EmaActor(models.actor, ppo.ema_decay) if ppo.ema_decay else None
    resume_from = prepare_run_dir(run_dir, resume, is_main=dist.is_main)  # inputs are checked: now touch the run
    tracker = Tracker(recipe, run_dir, is_main=dist.is_main, total_steps=tcfg.steps)
    kl_ctl = rl.make_kl_controller(ppo)
    score_stats = rl.RunningMoments()
    sampler = PromptSampler(len(train_ds), tcfg.rollout_batch_size, recipe.seed)
    local_prompts = sizes.local_rollout_sequences // ppo.group_size
    eval_items = _eval_items(eval_ds if eval_ds is not None and len(eval_ds) else train_ds, tcfg.eval_size, dist)
    evaluator = Evaluator(recipe, run_dir, dist.is_main)
    test_items = []
    if recipe.eval.test_data is not None:
        test_ds = load_prompts(recipe.eval.test_data, tokenizer, recipe.seed)[0]
        test_items = _eval_items(test_ds, len(test_ds), dist)

    def make_rollout(items, *, with_values: bool = True, fused_rows: Optional[torch.Tensor] = None,
                     fuse_critic: bool = False, sampling=None) -> tuple[Rollout, dict]:
        """Steps 1-2: generate with the hybrid engine, then score (no grad).

        `fused_rows` (fused scoring): rows whose actor log-probs (and critic values if `fuse_critic`)
        come from the update's own forward instead (`_forward_with_grad`); 0 here until it fills them.
        """
        timer = Timer()
        batch = collate_prompts(items, tokenizer.pad_token_id)
        ids, pmask = batch["input_ids"].to(dist.device), batch["attention_mask"].to(dist.device)
        allowed = [] if models.mask is not None else None  # NLPO: the mask model's top-p sets
        with timer("generate"), models.hybrid.inference() as gen_model:
            resp, rmask, has_eos, gen_lp = generate(gen_model, tokenizer, ids, pmask, sampling or gen,
                                                    return_logprobs=True, batch_size=tcfg.generation_batch_size,
                                                    mask_model=models.mask, mask_top_p=ppo.nlpo_top_p,
                                                    allowed_out=allowed)
        r = Rollout(ids, pmask, resp, rmask, has_eos, batch["prompts"],
                    tokenizer.batch_decode(resp, skip_special_tokens=True),
                    references=batch["references"], meta=batch["meta"], gen_logprobs=gen_lp,
                    allowed=torch.cat(allowed) if allowed else None)
        seq, attn, R = r.sequences, r.attention_mask, resp.shape[1]
        mb = tcfg.scoring_batch_size or sizes.micro_batch_size  # no grad: no activations are kept
        all_rows = torch.arange(len(seq), device=seq.device)
        rows = all_rows if fused_rows is None else all_rows[~torch.isin(all_rows, fused_rows.to(seq.device))]
        critic_rows = rows if fuse_critic else all_rows
        if ppo.old_logprobs == "generation":  # the ratio's old policy is the one that sampled: no actor pass
            rows = all_rows[:0]
        with timer("score"), torch.no_grad():
            r.logprobs = _score_rows(lambda s, a, *al: forward_logprobs(models.actor, s, a, R, gen.temperature,
                                                                        allowed=al[0] if al else None),
                                     rows, mb, seq, attn, rmask, r.allowed)
            if ppo.old_logprobs == "generation":
                r.logprobs = gen_lp.float() * rmask
            if with_values and models.critic is not None:
                r.values = _score_rows(lambda s, a: forward_values(models.critic, s, a, R),
                                       critic_rows, mb, seq, attn, rmask)
            r.ref_logprobs, r.scores = _score_reference_and_reward(models.reference, reward_fn, r, mb, gen.temperature)
        return r, {**timer.times, **{f"hybrid/{k}": v for k, v in models.hybrid.last_timings.items()}}

    def evaluate(step: int, items=None, split: str = "eval") -> dict:
        """Mean reward and `eval.metrics` of responses to fixed prompts (seeded, RNG state restored),
        sampled with `eval.generation` (default: the rollout's)."""
        items = eval_items if items is None else items
        if not items:  # train.eval_size: 0 (benchmarks)
            return {"score/mean": float("nan"), "kl/mean": float("nan"), "samples": []}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed + 7919)
            r, _ = make_rollout(items, with_values=False, sampling=recipe.eval.generation)
        n = recipe.logging.num_samples
        out = {"score/mean": _global_mean(r.scores), "response/length": _global_mean(r.response_mask.sum(1)),
               "kl/mean": _global_mean(((r.logprobs - r.ref_logprobs) * r.response_mask).sum(1)),
               **{f"reward/{k}": _global_mean(v) for k, v in (r.reward_parts or {}).items()}}
        ref_lp = r.ref_logprobs
        if evaluator.needs_ref_logprobs and gen.temperature != 1.0:  # perplexity is at temperature 1
            with torch.no_grad():
                ref_lp = micro_batched(lambda s, a: forward_logprobs(models.reference, s, a, r.response_ids.shape[1]),
                                       tcfg.scoring_batch_size or sizes.micro_batch_size, r.sequences, r.attention_mask)
        out.update(evaluator(step, split, [item["raw"] for item in items], r, r.reward_parts, ref_lp))
        if split == "eval":
            out.update(ptx.evaluate(models.actor) if ptx is not None else {})
            if ema is not None:
                out.update(evaluate_ema(ema, lambda: make_rollout(items, with_values=False,
                                                                  sampling=recipe.eval.generation)[0], recipe.seed))
        tracker.log_eval(step, out if split == "eval" else {"split": split, **out})
        tracker.log_samples(step, r.prompts[:n], r.responses[:n], r.scores[:n].tolist(), tag=split)
        raw = [item["raw"] for item in items[:3]]
        return {**out, "samples": list(zip(raw, r.responses[:3], r.scores[:3].tolist()))}

    torch.manual_seed(recipe.seed + dist.rank)  # sampling RNG: independent of how models were built
    ckpt = CheckpointManager(run_dir, recipe.checkpoint.keep_last, is_main=dist.is_main, tokenizer=tokenizer)
    engines = {"actor": models.actor, **({"critic": models.critic} if models.critic is not None else {})}
    start, before = 1, None
    if resume_from is not None:  # restores weights, optimizers, LR schedules and this rank's RNG
        state = ckpt.load(resume_from, engines)
        if ema is not None:
            ema.load(resume_from)
        if ptx is not None:
            ptx.load_state_dict(state["ptx"])
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
        if test_items:
            evaluate(0, test_items, "test")

    def save(step: int) -> None:
        ckpt.save(step, engines, {"sampler": sampler.state_dict(), "kl_controller": kl_ctl.state_dict(),
                                  "score_stats": score_stats.state_dict(), "before": before,
                                  **({"ptx": ptx.state_dict()} if ptx is not None else {})},
                  write_rank_files=ema.save if ema is not None else None)

    # fused scoring: the first mini-batch of the first epoch is updated by a policy that has not
    # moved yet, so its own forward's log-probs ARE the rollout's: those rows skip the actor's
    # scoring pass. The critic is fused too only when that mini-batch is the whole rollout: both
    # graphs then stay alive until the advantages exist (+1 graph of activations), which pays for
    # itself by a whole critic pass; with several mini-batches it would save only a fraction
    # (measured at 16 x 48, 2 mini-batches, fp32: -0.9 s of 20 s for +630 MiB peak RSS).
    # ZeRO-3 reduces a parameter's gradient once per forward/backward pair, so several forwards
    # before the first backward are only safe when that mini-batch is one micro-batch per rank there.
    fused = ppo.fuse_scoring and (recipe.deepspeed.zero_stage < 3 or sizes.gradient_accumulation_steps == 1)
    # rows that are resampled, log-probs that come from generation and TRPO's own step have no fused forward
    fused = fused and not ppo.dynamic_sampling and ppo.old_logprobs == "recompute" and ppo.algorithm != "trpo"
    fuse_critic = fused and sizes.num_mini_batches == 1
    local_mini = sizes.local_rollout_sequences // sizes.num_mini_batches
    t_start = time.perf_counter()
    for step in range(start, tcfg.steps + 1):
        t_step = time.perf_counter()
        if models.mask is not None and (step == start or (step - 1) % ppo.nlpo_mask_update_every == 0):
            from rlhf_engine.nlpo import sync_mask_model
            sync_mask_model(models.mask, models.actor)  # NLPO: the mask model follows the actor, lagging
        # ---- 1-2. generate and score -------------------------------------------------------------
        def draw_items() -> list:
            global_idx = sampler.next_batch()
            mine = global_idx[dist.rank * local_prompts:(dist.rank + 1) * local_prompts]
            return [train_ds[i] for i in mine for _ in range(ppo.group_size)]  # groups stay contiguous

        items = draw_items()
        orders = _epoch_orders(recipe.seed, step, len(items), ppo.ppo_epochs)
        first_rows = orders[0][:local_mini] if fused else None
        if ppo.dynamic_sampling:  # DAPO: only groups whose scores differ, all ranks in step
            r, times, sampling_stats = _dynamic_sampling(make_rollout, items, draw_items, ppo, tokenizer.pad_token_id)
        else:
            r, times = make_rollout(items, fused_rows=first_rows, fuse_critic=fuse_critic)
            sampling_stats = {}
        mask = r.response_mask
        forwards = (_forward_with_grad(models, r, first_rows, sizes, gen.temperature, times, with_critic=fuse_critic)
                    if fused else None)

        # ---- 3. shape: penalties, clipping, normalisation, per-token KL --------------------------
        scores = r.scores if r.dense_rewards is None else r.scores - r.dense_rewards.sum(1)  # dense: per token
        scores = rl.apply_missing_eos_penalty(scores, r.has_eos, ppo.missing_eos_penalty)
        if ppo.overlong_buffer:
            scores = scores + rl.overlong_penalty(mask.sum(1), gen.max_new_tokens, ppo.overlong_buffer,
                                                  ppo.overlong_penalty_factor)
        scores = rl.clip_scores(scores, ppo.score_clip)
        if ppo.normalize_rewards:
            score_stats.update(_all_gather_cat(scores))
            scores = score_stats.normalize(scores)
        rewards, kl = rl.shape_rewards(scores, r.logprobs, r.ref_logprobs, mask, kl_ctl.value, ppo.kl_estimator)
        if r.dense_rewards is not None:
            rewards = rewards + r.dense_rewards * mask

        # ---- 4. advantages ------------------------------------------------------------------------
        advantages, returns = rl.compute_advantages(
            ppo.algorithm, rewards=rewards, values=r.values, response_mask=mask, gamma=ppo.gamma, lam=ppo.lam,
            whiten=ppo.whiten_advantages, group_size=ppo.group_size)

        # off-policy: how far generation's log-probs are from training's, and the correction weights
        is_weights, is_stats = (rl.rollout_correction(r.logprobs, r.gen_logprobs, mask, ppo.rollout_correction,
                                                      ppo.rollout_is_cap) if r.gen_logprobs is not None else (None, {}))

        # ---- 5. update: epochs x mini-batches x micro-batches -------------------------------------
        t_train = time.perf_counter()
        stats = _update(models, r, advantages, returns, sizes, recipe, orders, forwards, is_weights, ptx)
        if ppo.old_logprobs == "recompute" and r.gen_logprobs is not None:
            stats.update(_mismatch_metrics(rl.mismatch_sums(r.logprobs, r.gen_logprobs, mask, ppo.mismatch_threshold)))
        times["train"] = time.perf_counter() - t_train
        if ema is not None:
            ema.update()

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
            **stats, **{k: _global_mean(v) for k, v in is_stats.items()}, **sampling_stats,
            **{f"time/{k}": v for k, v in times.items()}, "time/step": step_s,
            "tokens_per_s": n_tokens / step_s,
            "memory/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **({"memory/peak_device_mib": torch.cuda.max_memory_allocated() / 2 ** 20}
               if torch.cuda.is_available() else {}),  # compared with the planner (launch/bench_memory.py)
        }
        if returns is not None:
            metrics["returns/mean"] = _global_mean(kernels.masked_mean(returns, mask, dim=-1))
        metrics.update({f"reward/{k}": _global_mean(v) for k, v in (r.reward_parts or {}).items()})
        metrics.update({f"reward/{k}": _global_mean(torch.tensor(v, device=dist.device))
                        for k, v in sorted((r.reward_extra or {}).items())})
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
    if test_items:
        evaluate(tcfg.steps, test_items, "test")
    barrier()
    summary = {"run_dir": str(run_dir), "steps": tcfg.steps, "train_seconds": time.perf_counter() - t_start,
               "score_before": before["score/mean"], "score_after": after["score/mean"],
               "kl_after": after["kl/mean"], "samples_before": before["samples"], "samples_after": after["samples"]}
    if dist.is_main:
        summary["plots"] = [str(p) for p in plot_metrics(run_dir)] if recipe.logging.plots else []
    tracker.close()
    return summary


def _steps_capped_by_epochs(tcfg, num_prompts: int, is_main: bool):
    """train.epochs caps the RL steps at that many passes over the training prompts (each pass drops
    its ragged tail); returns the train section with the steps the run will make."""
    per_epoch = num_prompts // tcfg.rollout_batch_size
    if not tcfg.epochs or tcfg.steps <= tcfg.epochs * per_epoch:
        return tcfg
    if is_main:
        print(f"[train] {tcfg.epochs * per_epoch} RL steps: train.steps={tcfg.steps} capped by train.epochs="
              f"{tcfg.epochs} x {per_epoch} steps per pass over {num_prompts} prompts", flush=True)
    return tcfg.model_copy(update={"steps": tcfg.epochs * per_epoch})


def _dynamic_sampling(make_rollout, items: list, draw_items, ppo, pad_token_id: int) -> tuple[Rollout, dict, dict]:
    """DAPO's dynamic sampling: keep the prompt groups whose scores differ (`rl.groups_with_signal`) and
    generate for freshly drawn prompts until this rank holds as many groups as it started with.

    All ranks run the same number of rounds (an all-reduce of the largest shortfall decides, and every
    rank draws from the same sampler), at most ppo.dynamic_sampling_max_rounds; a rank still short then
    fills up with dropped groups. Returns (rollout, summed timings, dynamic_sampling/* stats).
    """
    g, need = ppo.group_size, len(items) // ppo.group_size
    kept, dropped, times, rounds = [], [], {}, 0
    while True:
        r, t = make_rollout(items)
        rounds += 1
        times = {k: times.get(k, 0.0) + v for k, v in t.items()}
        for group, ok in enumerate(rl.groups_with_signal(r.scores, g).tolist()):
            (kept if ok else dropped).append(r.select(torch.arange(group * g, (group + 1) * g)))
        shortfall = torch.tensor([float(max(need - len(kept), 0))])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(shortfall, op=torch.distributed.ReduceOp.MAX)
        if shortfall.item() == 0 or rounds >= ppo.dynamic_sampling_max_rounds:
            break
        items = draw_items()
    filled = max(need - len(kept), 0)
    stats = {"dynamic_sampling/rounds": rounds,
             "dynamic_sampling/dropped_groups": float(_global_sum(torch.tensor(float(len(dropped))))),
             "dynamic_sampling/filled_groups": float(_global_sum(torch.tensor(float(filled))))}
    return concat_rollouts(kept[:need] + dropped[:filled], pad_token_id), times, stats


def _score_rows(forward, rows: torch.Tensor, micro: int, seq: torch.Tensor, attn: torch.Tensor,
                rmask: torch.Tensor, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token outputs [B, R] of `forward(seq, attn[, extra])` for `rows` in micro-batches, masked; 0 at
    other rows. `extra`: a per-row tensor sliced alongside (NLPO's allowed tokens)."""
    out = torch.zeros_like(rmask, dtype=torch.float32)
    if len(rows):
        tensors = (seq[rows], attn[rows]) + (() if extra is None else (extra[rows],))
        out[rows] = micro_batched(forward, micro, *tensors).float() * rmask[rows]
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
        logp, entropy = forward_logprobs(models.actor, seq[micro], attn[micro], R, temperature, return_entropy=True,
                                         allowed=None if r.allowed is None else r.allowed[micro])
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
            forwards: Optional[list] = None, is_weights: Optional[torch.Tensor] = None,
            ptx: Optional[PtxMixer] = None) -> dict:
    """PPO epochs x mini-batches; each micro-batch loss is weighted so that accumulation is exact.

    `orders`: each epoch's row order (`_epoch_orders`); mini-batches are its consecutive slices.
    `forwards` (fused scoring) supplies the first mini-batch's forward outputs, already computed
    by `_forward_with_grad`. `is_weights` [B, R]: off-policy correction weights (`rl.rollout_correction`).
    `ptx` (ppo.ptx_coef > 0) adds one PTX micro-batch's loss to each actor micro-batch.
    ppo.algorithm picks the actor's loss (clipped surrogate; a2c's plain policy gradient; trpo's
    trust-region step over the whole rollout, engine/trpo.py); the critic's update is the same for all.

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
    agg, extra, mismatch = {}, {}, torch.zeros(4, dtype=torch.float64)
    if ppo.algorithm == "trpo":
        from rlhf_engine.trpo import trpo_update
        extra = trpo_update(actor, r, advantages, ppo, gen.temperature, sizes.micro_batch_size)
    for epoch, perm in enumerate(orders):
        for m in range(sizes.num_mini_batches):
            rows = perm[m * local_mini:(m + 1) * local_mini]
            for i, micro in enumerate(_micro_slices(rows, sizes.micro_batch_size)):
                weight = rl.micro_batch_weight(mask[micro], mask[rows], ppo.loss_agg) * gas
                w_is = None if is_weights is None else is_weights[micro]
                if ppo.algorithm == "trpo":
                    values = None
                elif forwards is not None and epoch == 0 and m == 0:
                    fused_rows, logp, entropy, values = forwards[i]
                    assert torch.equal(fused_rows, micro), "fused forward and update disagree on the rows"
                else:
                    logp, entropy = forward_logprobs(actor, seq[micro], attn[micro], R, gen.temperature,
                                                     return_entropy=True,
                                                     allowed=None if r.allowed is None else r.allowed[micro])
                    values = None
                if ppo.algorithm != "trpo":
                    if ppo.old_logprobs == "generation" and epoch == 0 and m == 0 and r.gen_logprobs is not None:
                        # the policy has not moved yet: this forward is the training side of the mismatch
                        mismatch = _fold_mismatch(mismatch, rl.mismatch_sums(
                            logp.detach(), r.gen_logprobs[micro], mask[micro], ppo.mismatch_threshold))
                    if ppo.algorithm == "a2c":
                        pg_loss = rl.a2c_policy_loss(logp, advantages[micro], mask[micro], ppo.loss_agg, w_is)
                        pg_stats = {"approx_kl": rl.approx_kl(logp, r.logprobs[micro], mask[micro])}
                    else:
                        pg_loss, pg_stats = rl.policy_loss(
                            logp, r.logprobs[micro], advantages[micro], mask[micro], ppo.cliprange, ppo.loss_agg,
                            cliprange_high=ppo.cliprange_high, ratio_level=ppo.ratio_level, weights=w_is)
                    loss = pg_loss
                    if ppo.entropy_coef > 0:
                        loss = loss + rl.entropy_bonus(entropy, mask[micro], ppo.entropy_coef, ppo.loss_agg)
                    actor.backward(loss * weight)
                    if ptx is not None:
                        _accumulate(agg, {"loss/ptx": ptx.backward(actor)})
                    actor.step()
                    _accumulate(agg, {"loss/policy": pg_loss.detach(), "policy/approx_kl": pg_stats["approx_kl"],
                                      **({"policy/clipfrac": pg_stats["clipfrac"]} if "clipfrac" in pg_stats else {}),
                                      "entropy": kernels.masked_mean(entropy.detach(), mask[micro])})
                if critic is not None:
                    if values is None:  # not from the fused forward
                        values = forward_values(critic, seq[micro], attn[micro], R)
                    v_loss, v_stats = rl.value_loss(values, r.values[micro], returns[micro], mask[micro],
                                                    ppo.cliprange_value, ppo.loss_agg)
                    critic.backward(ppo.vf_coef * v_loss * weight)
                    critic.step()
                    _accumulate(agg, {"loss/value": v_loss.detach(), "value/clipfrac": v_stats["vf_clipfrac"]})
    out = {k: _global_mean(torch.stack(v)) for k, v in agg.items()}
    out.update({k: _global_mean(torch.tensor(v)) for k, v in extra.items()})
    if ppo.old_logprobs == "generation" and r.gen_logprobs is not None:
        out.update(_mismatch_metrics(mismatch))
    out["lr"] = actor.get_lr()[0] if hasattr(actor, "get_lr") else recipe.optim.lr
    return out


def _fold_mismatch(acc: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """`rl.mismatch_sums` of one more micro-batch folded in: sums add, the max ([1]) is a max."""
    out = acc + sums
    out[1] = max(acc[1], sums[1])
    return out


def _mismatch_metrics(sums: torch.Tensor) -> dict:
    """Global train-inference mismatch from this rank's `rl.mismatch_sums` (sums over ranks, max of maxima)."""
    total = sums.clone()
    peak = sums[1:2].clone().float()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    tokens = max(float(total[3]), 1.0)
    return {"mismatch/exp_abs_mean": float(total[0]) / tokens if total[3] else 1.0,
            "mismatch/abs_max": float(peak[0]), "mismatch/frac_over": float(total[2]) / tokens}


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
    """Sequence scores [B] from the reward function, checked for NaN / errors. A RewardSet also fills
    r.reward_parts, r.reward_extra and r.dense_rewards."""
    if isinstance(reward_fn, RewardSet):
        res = reward_fn.score(r.prompts, r.responses, r.references, r.meta, sequences=seq, attention_mask=attn,
                              response_ids=r.response_ids, response_mask=r.response_mask)
        r.reward_parts = {k: v.to(seq.device).float() for k, v in res.parts.items()}  # all-reduced with NCCL too
        r.reward_extra = res.extra
        r.dense_rewards = None if res.dense is None else res.dense.to(seq.device)
        return res.scores.to(seq.device).float()
    if hasattr(reward_fn, "score_tokens"):
        scores = reward_fn.score_tokens(seq, attn, prompts=r.prompts, responses=r.responses)
    else:
        scores = reward_fn(r.prompts, r.responses, r.references, r.meta)
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
