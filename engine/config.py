"""Typed recipes: the YAML a user writes, validated before any work starts.

Every field has a one-line doc (``Field(description=...)``); unknown keys are errors, never
ignored. ``load_recipe(path, overrides)`` reads the YAML, applies ``--set a.b.c=value`` overrides
(values parsed as YAML, so ``--set train.steps=3`` is an int), validates, and raises
``RecipeError`` whose message names the file, the key path (and its line), what was expected and,
for a misspelled key, the closest valid one.
"""
from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Precision = Literal["fp32", "bf16", "fp16"]
TrainPrecision = Literal["auto", "fp32", "bf16", "fp16", "bf16_autocast"]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are rejected, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), strict=True)


# --------------------------------------------------------------------------------------------
# models
class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the head.")


class ModelConfig(Section):
    name_or_path: str = Field(
        ..., description="Preset name (see `rlhf-engine presets`), local HF folder, hub id, or a .gguf file.")
    gguf_file: Optional[str] = Field(None, description="GGUF file name inside name_or_path (a folder or hub id).")
    tokenizer: Optional[str] = Field(None, description="Tokenizer source if it differs from the model.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Precision = Field("fp32", description="Weight dtype the model is loaded in.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; flash_attention_2 needs CUDA and the flash-attn package.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off unless you trust it).")
    lora: Optional[LoraConfig] = Field(None, description="Train LoRA adapters instead of all weights.")
    context_start_token: Optional[int] = Field(
        None, ge=0, description="Encoder-decoder models only: token id the decoder starts from (RL4LMs' name); "
                                "default the model config's decoder_start_token_id.")


class CriticConfig(Section):
    init_from: str = Field(
        "actor", description="'actor' (actor backbone), 'reward' (the reward model), or a model path/preset.")
    dtype: Optional[Precision] = Field(None, description="Weight dtype; defaults to the actor's.")
    lr: Optional[float] = Field(None, gt=0, description="Critic learning rate; defaults to optim.lr.")
    gradient_checkpointing: Optional[bool] = Field(None, description="Defaults to the actor's setting.")
    lora: Optional[LoraConfig] = Field(
        None, description="Train LoRA adapters on the critic's backbone (the value head stays fully trained); "
                          "default: all weights, whatever model.lora says.")


class RemoteRewardSection(Section):
    """How a `type: remote` reward talks to its server (OpenRLHF's protocol, see docs/rewards.md)."""

    batch_size: int = Field(64, gt=0, description="Samples per POST request.")
    max_concurrency: int = Field(4, gt=0, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for one response before retrying.")
    retries: int = Field(3, ge=0, description="Retries of a failed request (timeout, connection error, HTTP 5xx).")
    backoff_s: float = Field(0.5, ge=0, description="First retry waits this long; each next retry waits twice as long.")


class RewardConfig(Section):
    type: Literal["model", "callable", "sentiment", "length", "remote", "metric"] = Field(
        ..., description="Learned reward model, a Python callable, a built-in judge, a reward server (remote), "
                         "or an evaluation metric against the references (metric).")
    name: Optional[str] = Field(
        None, description="Name in the logs (metrics key reward/<name>); default: the metric name or the type.")
    weight: float = Field(1.0, description="Weight of this reward in the sum when `reward` is a list.")
    metric: Optional[str] = Field(
        None, description="type metric: registry name (rouge, bleu, chrf, meteor, bertscore, increasing_numbers, "
                          "dates, ...); reward.kwargs go to the metric.")
    metric_key: Optional[str] = Field(
        None, description="type metric: which per-sample value is the reward (e.g. rouge2); default: the metric's main one.")
    dense: bool = Field(
        False, description="Give this reward per token: r_t = f(response[:t+1]) - f(response[:t]) with f('') = 0, "
                           "so the tokens' rewards add up to the sentence score.")
    url: Optional[str] = Field(None, description="type remote: the reward server's URL (POST, OpenRLHF's protocol).")
    remote: RemoteRewardSection = Field(default_factory=RemoteRewardSection,
                                        description="type remote: batching, concurrency, timeout and retries.")
    model: Optional[ModelConfig] = Field(None, description="Reward model (type: model): backbone + scalar head.")
    function: Optional[str] = Field(
        None, description="'module:function' (type: callable) taking (prompts, responses) -> list of floats.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the reward.")
    scale: float = Field(1.0, description="Multiply every score by this.")
    share_reference_backbone: bool = Field(
        True, description="A reward model with exactly the reference's backbone weights scores from the reference "
                          "forward (one frozen forward and one copy of the weights instead of two).")

    @model_validator(mode="after")
    def _needs_source(self):
        if self.type == "model" and self.model is None:
            raise ValueError("reward.type 'model' needs reward.model (name_or_path: ...)")
        if self.type == "callable" and not (self.function and ":" in self.function):
            raise ValueError("reward.type 'callable' needs reward.function as 'module:function'")
        if self.type == "remote" and not (self.url and self.url.startswith(("http://", "https://"))):
            raise ValueError("reward.type 'remote' needs reward.url: http://host:port/path")
        if self.type == "metric" and not self.metric:
            raise ValueError("reward.type 'metric' needs reward.metric (a metric name, e.g. rouge)")
        if self.type != "metric" and (self.metric or self.metric_key):
            raise ValueError("reward.metric / reward.metric_key are only read by reward.type 'metric'")
        if self.type != "remote" and self.url:
            raise ValueError("reward.url is only read by reward.type 'remote'")
        if self.dense and self.type in ("model", "remote"):
            raise ValueError(f"reward.dense: a '{self.type}' reward scores whole responses only (one call per token "
                             "prefix would be too slow); use dense with callable, built-in or metric rewards")
        return self

    @property
    def label(self) -> str:
        """The name this reward is logged under."""
        return self.name or self.metric or self.type


# --------------------------------------------------------------------------------------------
# data
class DatasetConfig(Section):
    path: str = Field(..., description="JSONL/JSON/CSV/parquet file (relative to the recipe) or a `datasets` name.")
    subset: Optional[str] = Field(None, description="`datasets` configuration name.")
    split: str = Field("train", description="`datasets` split to read.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map our field names (prompt, response, chosen, rejected, messages, margin, references, meta) "
                    "to columns.")
    chat_template: bool = Field(True, description="Apply the tokenizer's chat template to plain-text prompts.")
    system_prompt: Optional[str] = Field(None, description="System message added before chat prompts.")
    max_prompt_length: int = Field(256, gt=0, description="Prompt token budget.")
    max_length: int = Field(512, gt=0, description="Prompt + response token budget (SFT, reward).")
    overflow: Literal["drop", "truncate"] = Field("drop", description="Too-long rows: drop them or truncate.")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of rows held out for evaluation.")
    eval_size: Optional[int] = Field(None, ge=0, description="Rows held out for evaluation (overrides fraction).")
    limit: Optional[int] = Field(None, gt=0, description="Use only the first N rows (after shuffling).")
    shuffle: bool = Field(True, description="Shuffle rows with the recipe seed before splitting.")


# --------------------------------------------------------------------------------------------
# distributed / optimisation
class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage for trained models.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO 1-3).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3).")
    precision: TrainPrecision = Field(
        "auto", description="Training precision: bf16/fp16 = DeepSpeed half weights + fp32 master copies; "
        "bf16_autocast = fp32 weights, grads and optimizer with bf16 matmuls (torch.autocast); auto = bf16 on "
        "GPUs that support it (else fp32), on CPU fp32 or bf16_autocast, whichever a short matmul probe at the "
        "model's shapes finds faster (recorded in run.json and the summary).")
    frozen_zero_stage: Optional[Literal[0, 3]] = Field(
        None, description="Reference/reward models: 3 = partitioned, 0 = replicated; default follows zero_stage.")
    frozen_offload_params: bool = Field(
        False, description="Reference/reward models only: keep their partitioned parameters in CPU memory (needs a "
                           "frozen stage of 3); trained models stay on the device.")
    gradient_clipping: float = Field(1.0, ge=0.0, description="Clip the global grad norm (0 = off).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Raw keys merged into the DeepSpeed config.")

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage: 3")
        frozen = self.frozen_zero_stage if self.frozen_zero_stage is not None else (3 if self.zero_stage == 3 else 0)
        if self.frozen_offload_params and frozen != 3:
            raise ValueError("deepspeed.frozen_offload_params needs partitioned frozen models: zero_stage: 3 or "
                             "frozen_zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (actor / trained model).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), strict=False, description="AdamW betas (a YAML list of two).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")


class TrainConfig(Section):
    steps: int = Field(..., gt=0, description="RL steps (one rollout + update each) or supervised optimizer steps.")
    rollout_batch_size: int = Field(8, gt=0, description="Prompts per RL step, all ranks together.")
    mini_batch_size: int = Field(8, gt=0, description="Sequences per optimizer step, all ranks together.")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward pass on one rank.")
    generation_batch_size: Optional[int] = Field(None, gt=0, description="Prompts per generate() call on one rank.")
    scoring_batch_size: Optional[int] = Field(
        None, gt=0, description="Sequences per no-grad scoring forward on one rank (reference, reward, old "
        "log-probs and values; no activations are kept, so it can exceed micro_batch_size). Default: micro_batch_size.")
    epochs: Optional[int] = Field(
        None, gt=0, description="Stop after this many passes over the training rows (RL: prompts), or at train.steps, "
        "whichever comes first (each pass drops its ragged tail). Default: no cap, train.steps alone.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0 = only at the end).")
    eval_size: int = Field(16, ge=0, description="Held-out prompts scored at each evaluation.")


class GenerationSection(Section):
    max_new_tokens: int = Field(64, gt=0, description="Longest response, in tokens.")
    min_new_tokens: int = Field(0, ge=0, description="EOS is blocked before this many tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (also used for log-probs).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    do_sample: bool = Field(True, description="Sample (true) or greedy (false).")
    stop_strings: list[str] = Field(default_factory=list, description="Stop a response at any of these strings.")
    ignore_eos: bool = Field(False, description="Always generate max_new_tokens; tokens after EOS count too.")
    dtype: Optional[Precision] = Field(
        None, description="Weight dtype while generating (a temporary cast; trained weights untouched). "
        "Default: bf16 under deepspeed.precision bf16_autocast, else the weights' own dtype.")
    attn_implementation: Optional[Literal["sdpa", "eager", "flash_attention_2"]] = Field(
        None, description="Attention kernel while generating (default: the model's). On CPU: train eager, "
        "generate sdpa.")


class MetricConfig(Section):
    name: str = Field(..., description="Metric registry name (rouge, bleu, chrf, meteor, bertscore, diversity, "
                                       "perplexity, increasing_numbers, dates, ...).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the metric.")


class EvalSection(Section):
    """Evaluation of held-out prompts (data's eval split, every train.eval_every steps and at the end) and of
    an optional test split (before and after training)."""

    generation: Optional[GenerationSection] = Field(
        None, description="Sampling for evaluation (e.g. do_sample: false for greedy); default: the rollout's "
                          "`generation`. dtype / attn_implementation follow `generation`.")
    metrics: list[Union[str, MetricConfig]] = Field(
        default_factory=list, description="Metrics of the responses against the references, corpus-level and per "
                                          "sample, logged to eval.jsonl (names or {name, kwargs}).")
    test_data: Optional[DatasetConfig] = Field(
        None, description="Test split (all its rows): generated and scored before and after training.")
    save_predictions: bool = Field(
        True, description="Write predictions/<split>-step-<N>.jsonl: prompt, response, references, meta, score and "
                          "per-sample metrics.")

    @model_validator(mode="after")
    def _gen_follows(self):
        g = self.generation
        if g is not None and (g.dtype is not None or g.attn_implementation is not None):
            raise ValueError("eval.generation.dtype / attn_implementation: set them in `generation` (the generation "
                             "engine is shared by rollouts and evaluation)")
        t = self.test_data
        if t is not None and (t.eval_fraction > 0 or t.eval_size):
            raise ValueError("eval.test_data.eval_fraction / eval_size: every row of the test split is evaluated; "
                             "use limit to evaluate fewer")
        return self

    def metric_configs(self) -> list[MetricConfig]:
        return [MetricConfig(name=m) if isinstance(m, str) else m for m in self.metrics]


GROUP_ALGORITHMS = ("grpo", "rloo", "dr_grpo", "reinforce++-baseline")  # baselines over a prompt's group


class PPOConfig(Section):
    """The clipped policy-gradient loop; `algorithm` picks the advantage estimator (GAE or a baseline)."""

    algorithm: Literal["ppo", "grpo", "rloo", "reinforce++", "dr_grpo", "reinforce++-baseline", "a2c", "trpo",
                       "nlpo"] = Field(
        "ppo", description="Advantage estimator and update: critic-based ppo (clipped), a2c (one unclipped step), "
        "trpo (natural-gradient step in a KL trust region), nlpo (ppo with a top-p masked policy); critic-free "
        "grpo, dr_grpo, rloo, reinforce++, reinforce++-baseline (docs/rl-algorithms.md).")
    group_size: int = Field(1, gt=0, description="Responses sampled per prompt (GRPO/RLOO need >= 2).")
    ppo_epochs: int = Field(1, gt=0, description="Passes over each rollout batch.")
    kl_coef: float = Field(0.05, ge=0, description="Initial beta of the per-token KL penalty.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="KL estimator used in the penalty.")
    kl_controller: Literal["fixed", "adaptive"] = Field("fixed", description="Keep beta fixed or adapt it.")
    target_kl: float = Field(6.0, gt=0, description="Adaptive controller: target sequence KL.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive controller: horizon in samples.")
    cliprange: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip epsilon.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss weight.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Normalise advantages over the batch.")
    normalize_rewards: bool = Field(False, description="Scale scores by a running std.")
    score_clip: Optional[float] = Field(None, gt=0, description="Clip sequence scores to [-c, c].")
    missing_eos_penalty: Optional[float] = Field(None, description="Added to the score of responses with no EOS.")
    ema_decay: Optional[float] = Field(
        None, gt=0, lt=1, description="Keep an exponential moving average of the actor's weights (updated after "
        "each RL step, checkpointed, evaluated as ema/* in eval.jsonl, exported with `export --ema`).")
    ptx_coef: float = Field(0.0, ge=0, description="Weight of the language-model loss on ptx_data rows added to "
                            "every actor update (InstructGPT's PPO-ptx; 0 = off).")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="How per-token policy losses become one number: mean over tokens, mean of "
        "per-response means, mean of per-response sums, or those sums / max_new_tokens (Dr.GRPO).")
    cliprange_high: Optional[float] = Field(
        None, gt=0, description="Upper ratio clip eps_high (DAPO clip-higher: 1+eps_high); default: cliprange, "
        "which is then eps_low.")
    ratio_level: Literal["token", "sequence"] = Field(
        "token", description="Importance ratio per token (PPO) or per response, the geometric mean over its "
        "tokens (GSPO; use tiny clip ranges such as 3e-4 / 4e-4).")
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop prompt groups whose scores are all equal and generate more prompts "
        "until the batch is full (needs group_size >= 2).")
    dynamic_sampling_max_rounds: int = Field(
        4, gt=0, description="Cap on generation rounds per step for dynamic sampling; a batch still short "
        "after it is filled with dropped groups (logged as dynamic_sampling/filled_groups).")
    overlong_buffer: Optional[int] = Field(
        None, gt=0, description="DAPO overlong penalty: responses longer than max_new_tokens - buffer lose up to "
        "overlong_penalty_factor, linearly in the extra tokens.")
    overlong_penalty_factor: float = Field(1.0, ge=0, description="Largest overlong penalty (at max_new_tokens).")
    old_logprobs: Literal["recompute", "generation"] = Field(
        "recompute", description="Old log-probs of the PPO ratio: a training forward (exact) or the generation's "
        "own (saves the scoring pass; the ratio then also absorbs the train-inference mismatch).")
    rollout_correction: Literal["none", "tis", "mis-token", "mis-sequence"] = Field(
        "none", description="Weigh the policy loss by pi_train/pi_inference per token: truncated (tis) or masked "
        "per token / per response (mis-*); needs old_logprobs: recompute.")
    rollout_is_cap: float = Field(
        2.0, gt=1, description="TIS truncation cap C; MIS keeps weights in [1/C, C].")
    mismatch_threshold: float = Field(
        0.1, gt=0, description="mismatch/frac_over logs the share of tokens whose |logp_train - logp_inference| "
        "exceeds this.")
    trpo_max_kl: float = Field(0.01, gt=0, description="TRPO trust region: mean per-token KL(old || new) per step.")
    trpo_cg_iters: int = Field(10, gt=0, description="TRPO conjugate-gradient iterations.")
    trpo_damping: float = Field(0.1, ge=0, description="TRPO: F + damping * I in the conjugate gradient.")
    trpo_backtracks: int = Field(10, gt=0, description="TRPO line search: halvings of the step tried.")
    nlpo_top_p: float = Field(
        0.9, gt=0, le=1, description="NLPO: the actor samples only tokens inside the mask model's top-p set.")
    nlpo_mask_update_every: int = Field(
        5, gt=0, description="NLPO: copy the actor into the mask model every N steps.")
    fuse_scoring: bool = Field(
        True, description="Take the first mini-batch's old log-probs from its own update forward (the policy has not "
                          "moved yet) instead of a scoring pass; with 1 mini-batch the critic's values too.")

    @model_validator(mode="after")
    def _groups(self):
        if self.algorithm in GROUP_ALGORITHMS and self.group_size < 2:
            raise ValueError(f"ppo.algorithm '{self.algorithm}' needs ppo.group_size >= 2")
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError("ppo.dynamic_sampling needs ppo.group_size >= 2 (it filters groups of one prompt)")
        if self.rollout_correction != "none" and self.old_logprobs != "recompute":
            raise ValueError(f"ppo.rollout_correction '{self.rollout_correction}' weighs the training engine's "
                             "log-probs against the generation's: set ppo.old_logprobs: recompute")
        if self.algorithm in ("a2c", "trpo") and self.ppo_epochs != 1:
            raise ValueError(f"ppo.algorithm '{self.algorithm}' makes one update per rollout: set ppo.ppo_epochs: 1")
        return self


class SFTSection(Section):
    pack: bool = Field(False, description="SFT: pack several rows into each micro-batch row (sequences kept apart).")


class RewardModelSection(Section):
    center_coef: float = Field(
        0.0, ge=0, description="Reward model: weight of the centering term (s_chosen + s_rejected)^2.")


class DPOSection(Section):
    beta: float = Field(0.1, gt=0, description="DPO / IPO beta: strength of the pull towards the reference.")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid = DPO's -log sigmoid(beta h); ipo = IPO's (h - 1/(2 beta))^2 on per-token "
        "mean log-probs.")
    reference: Literal["precompute", "on_the_fly"] = Field(
        "precompute", description="Reference log-probs: one pass over every row before training (the reference is "
        "then freed) or a reference forward per micro-batch.")


class HybridConfig(Section):
    enabled: bool = Field(True, description="Gather the ZeRO-3 actor and detach hooks while generating.")
    layers_per_group: Optional[int] = Field(
        None, gt=0, description="Gather this many layers at a time to bound memory (default: whole model).")


class WandbConfig(Section):
    project: str = Field("rlhf-engine", description="wandb project.")
    mode: Literal["online", "offline", "disabled"] = Field("offline", description="offline needs no key.")


class LoggingConfig(Section):
    log_every: int = Field(1, gt=0, description="Write metrics.jsonl every N steps.")
    samples_every: int = Field(1, gt=0, description="Write samples.jsonl every N steps.")
    num_samples: int = Field(4, ge=0, description="Samples written each time.")
    progress: bool = Field(True, description="Show progress bars.")
    plots: bool = Field(True, description="Write plots/*.png at the end.")
    wandb: Optional[WandbConfig] = Field(None, description="Log to Weights & Biases too.")


class CheckpointConfig(Section):
    save_every: int = Field(0, ge=0, description="Save every N steps (0 = only at the end).")
    keep_last: int = Field(2, gt=0, description="Keep the newest K checkpoints.")
    save_final: bool = Field(True, description="Save when training ends.")


# --------------------------------------------------------------------------------------------
# CPU backend (rlhf_engine.backends.cpu): applied at the start of a run on CPU only, never on GPU
class CpuConfig(Section):
    allocator: Literal["auto", "tcmalloc", "system"] = Field(
        "auto", description="malloc of training processes: tcmalloc (preloaded; faster steps, less memory), "
        "system, or auto = tcmalloc when installed (libtcmalloc-minimal4), else system.")
    transparent_huge_pages: bool = Field(
        True, description="torch's CPU allocator puts large tensors on 2 MiB pages (THP_MEM_ALLOC_ENABLE=1; "
        "fewer page faults per step). An explicit THP_MEM_ALLOC_ENABLE in the environment wins.")
    keep_freed_memory: bool = Field(
        True, description="glibc keeps freed memory for the next step instead of unmapping it (mallopt "
        "thresholds of 1 GiB); peak memory is unchanged.")
    onednn_linear: bool = Field(
        True, description="float32 nn.Linear layers run on oneDNN instead of MKL (same float32 math; faster "
        "on the CPUs measured); no effect on other dtypes.")
    lean_activations: bool = Field(
        True, description="Llama/Mistral/Qwen2 MLPs and RMSNorms keep ~40% fewer activations for backward "
        "(same forward numbers, no extra matmul).")
    fused_decode: bool = Field(
        True, description="Llama-family policies generate with a fused decode step (static KV cache, fused "
        "QKV/MLP matmuls; same math); false = the model's own forward.")
    skinny_decode_linear: bool = Field(
        True, description="While the actor generates, F.linear over a few rows runs as W @ x.T (faster for "
        "bf16 decode steps); false = torch's own kernel.")


# --------------------------------------------------------------------------------------------
class Recipe(Section):
    """A whole run. Sections a stage does not use must be omitted or left default."""

    name: str = Field(..., description="Run name: the run folder is <output_dir>/<name>.")
    stage: Literal["sft", "reward", "rl", "dpo"] = Field(
        ..., description="Which training stage this recipe runs.")
    seed: int = Field(42, description="Seed for data order, sampling and initialisation.")
    output_dir: str = Field("runs", description="Parent folder of run folders (relative to the working dir).")
    cache_dir: Optional[str] = Field(None, description="Where converted models are cached (default ~/.cache).")
    num_threads: Optional[int] = Field(None, gt=0, description="torch CPU threads per rank (default: cores/ranks).")
    model: ModelConfig = Field(..., description="The trained model (actor for RL).")
    reference: Optional[ModelConfig] = Field(None, description="Reference model; default: a frozen actor copy.")
    critic: CriticConfig = Field(default_factory=CriticConfig, description="PPO critic (value model).")
    reward: Optional[Union[RewardConfig, list[RewardConfig]]] = Field(
        None, description="Reward for RL; a list is a weighted sum (each reward logged as reward/<name>).")
    eval: EvalSection = Field(default_factory=EvalSection, description="RL evaluation: generation, metrics, test split.")
    data: DatasetConfig = Field(..., description="Training data (prompts for RL, pairs for reward, SFT rows).")
    ptx_data: Optional[DatasetConfig] = Field(None, description="SFT rows (prompt + response) for ppo.ptx_coef.")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection, description="ZeRO and precision.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and LR schedule.")
    train: TrainConfig = Field(..., description="Steps and batch sizes.")
    generation: GenerationSection = Field(default_factory=GenerationSection, description="Sampling.")
    ppo: PPOConfig = Field(default_factory=PPOConfig,
                           description="RL loop settings: PPO and every other algorithm of the one loop (ppo.algorithm).")
    hybrid: HybridConfig = Field(default_factory=HybridConfig, description="Hybrid engine.")
    sft: SFTSection = Field(default_factory=SFTSection, description="SFT stage settings.")
    reward_model: RewardModelSection = Field(default_factory=RewardModelSection,
                                             description="Reward-model stage settings.")
    dpo: DPOSection = Field(default_factory=DPOSection, description="DPO stage settings (preference pairs).")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics, samples, wandb.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Saving.")
    cpu: CpuConfig = Field(default_factory=CpuConfig, description="CPU speed settings (applied on CPU only).")

    @model_validator(mode="after")
    def _stage_needs(self):
        if self.stage == "rl" and self.reward is None:
            raise ValueError("stage 'rl' needs a reward section")
        if self.ppo.ptx_coef > 0 and self.ptx_data is None:
            raise ValueError("ppo.ptx_coef > 0 needs ptx_data")
        if isinstance(self.reward, list):
            if not self.reward:
                raise ValueError("reward: an empty list; give at least one reward")
            labels = [r.label for r in self.reward]
            dup = sorted({n for n in labels if labels.count(n) > 1})
            if dup:
                raise ValueError(f"reward: several rewards are named {dup}; give each a distinct reward.name")
        if any(r.label == "mean" for r in self.reward_configs()):
            raise ValueError("reward.name 'mean' is taken (metrics key reward/mean is the shaped reward); pick another")
        if (self.ppo.old_logprobs == "generation" or self.ppo.rollout_correction != "none") and self.generation.stop_strings:
            raise ValueError("ppo.old_logprobs: generation and ppo.rollout_correction need the log-probs of the engine's "
                             "own decode loop, but generation.stop_strings samples with HF generate(); drop one")
        return self

    def reward_configs(self) -> list[RewardConfig]:
        """The reward section as a list (one entry for a single reward)."""
        if self.reward is None:
            return []
        return list(self.reward) if isinstance(self.reward, list) else [self.reward]


# --------------------------------------------------------------------------------------------
# derived batch sizes: computed once, never silently rewritten
class BatchSizes(BaseModel):
    world_size: int
    rollout_sequences: int  # prompts x group_size, all ranks
    local_rollout_sequences: int  # per rank
    mini_batch_size: int  # global sequences per optimizer step
    num_mini_batches: int  # optimizer steps per PPO epoch
    micro_batch_size: int  # per rank per forward
    gradient_accumulation_steps: int


def derive_batch_sizes(recipe: Recipe, world_size: int) -> BatchSizes:
    """Check that the batch sizes divide and return the derived ones; raise RecipeError if not."""
    t = recipe.train
    group = recipe.ppo.group_size if recipe.stage == "rl" else 1
    seqs = t.rollout_batch_size * group if recipe.stage == "rl" else t.mini_batch_size

    def need(cond: bool, msg: str):
        if not cond:
            raise RecipeError(f"train: {msg} (world size {world_size}); adjust the batch sizes in the recipe")

    need(seqs % world_size == 0, f"rollout_batch_size x group_size = {seqs} must divide by the world size")
    need(seqs % t.mini_batch_size == 0, f"rollout sequences {seqs} must divide by mini_batch_size {t.mini_batch_size}")
    per_step = t.micro_batch_size * world_size
    need(t.mini_batch_size % per_step == 0,
         f"mini_batch_size {t.mini_batch_size} must divide by micro_batch_size x world = {per_step}")
    if recipe.stage == "rl" and (recipe.ppo.algorithm in GROUP_ALGORITHMS or recipe.ppo.dynamic_sampling):
        need((seqs // world_size) % group == 0, "each rank must hold whole prompt groups")
    if recipe.stage == "rl" and recipe.ppo.algorithm == "trpo":
        need(seqs == t.mini_batch_size, f"ppo.algorithm trpo takes one step over the whole rollout: set "
             f"mini_batch_size = rollout sequences ({seqs})")
    return BatchSizes(world_size=world_size, rollout_sequences=seqs, local_rollout_sequences=seqs // world_size,
                      mini_batch_size=t.mini_batch_size, num_mini_batches=seqs // t.mini_batch_size,
                      micro_batch_size=t.micro_batch_size,
                      gradient_accumulation_steps=t.mini_batch_size // per_step)


# --------------------------------------------------------------------------------------------
# loading and errors
class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-3` (no dot) as a string; recipes read it as the number it means (as YAML 1.2 does),
    so strict types need no quoting rules."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class RecipeError(ValueError):
    """A recipe problem, with a message meant for the user (file, key, expectation, fix)."""


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML text to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _section_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class that owns the key at `loc` (walks the Recipe schema)."""
    cls: Any = Recipe
    for part in loc[:-1]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        cls = next((a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _format_errors(err: ValidationError, source: str, lines: dict[tuple, int], overridden: set) -> str:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in (
            "list[str]", "literal['all-linear']", "ModelConfig", "LoraConfig", "WandbConfig", "DatasetConfig",
            "RewardConfig", "list[RewardConfig]", "GenerationSection", "MetricConfig", "str"))))
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = f"--set {key}" if loc in overridden else source
        if loc in lines and loc not in overridden:
            where += f", line {lines[loc]}"
        if e["type"] == "extra_forbidden":
            section = _section_at(loc)
            names = list(section.model_fields) if section else []
            hint = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
            msg = f"unknown key '{key}' in {where}"
            msg += f"; did you mean '{hint[0]}'?" if hint else (f"; valid keys here: {', '.join(names)}" if names else "")
        elif e["type"] == "missing":
            section = _section_at(loc)
            doc = section.model_fields[loc[-1]].description if section and loc[-1] in section.model_fields else ""
            msg = f"missing required key '{key}' in {where}" + (f" ({doc})" if doc else "")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            msg = f"bad value for '{key}' in {where}: {e['msg']}{got_s}"
        out.append(msg)
    return "\n".join(out)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], value parsed as YAML)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.steps=10")
    key, raw = item.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> set[tuple]:
    """Apply --set overrides in place; return the key paths they touched."""
    touched = set()
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise RecipeError(f"--set {'.'.join(path)}: '{part}' is a value, not a section")
            node = node[part]
        node[path[-1]] = value
        touched.add(tuple(path))
    return touched


def read_utf8(path: Union[str, Path]) -> str:
    """A text file's contents; RecipeError naming the file and line of the first bytes that are not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise RecipeError(f"{path}, line {line}: bytes {raw[e.start:e.end]!r} are not UTF-8 text; save the file "
                          "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError with a user-facing message."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    text = read_utf8(path)
    try:
        data = _yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"YAML syntax error in {path}{line}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    touched = apply_overrides(data, overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, str(path), _key_lines(text), touched)) from None
    # data paths are relative to the recipe file, so a recipe runs from any working directory
    for ds in (recipe.data, recipe.ptx_data, recipe.eval.test_data):
        if ds is not None and not Path(ds.path).is_absolute() and (path.parent / ds.path).exists():
            ds.path = str((path.parent / ds.path).resolve())
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written into every run folder)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
