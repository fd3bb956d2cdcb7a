"""Rollouts: sample responses for a batch of prompts, then score them (no grad).

Shapes (B = local sequences, P = padded prompt length, R = padded response length):
    prompt_ids / prompt_mask      [B, P]  left-padded
    response_ids / response_mask  [B, R]  right-padded; mask = 1 up to and including the first EOS
    logprobs / ref_logprobs       [B, R]  float32, log pi(token_t | prefix) at temperature T
    values                        [B, R]  float32, critic value of the state before token_t
    scores                        [B]     float32, sequence reward
    dense_rewards                 [B, R]  float32, per-token rewards of `dense` rewards (None without any)
Every per-token tensor is aligned with `response_ids`; positions where response_mask == 0 hold 0.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from rlhf_engine import kernels, seq2seq
from rlhf_engine.batching import chunks, position_ids_from_mask
from rlhf_engine.config import GenerationSection


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R] right-padded
    response_mask: torch.Tensor  # [B, R] float, 1 through the first EOS
    has_eos: torch.Tensor  # [B] bool, the response ended with EOS (not truncated)
    prompts: list[str]  # rendered prompt text (chat template applied): what the model saw
    responses: list[str]
    logprobs: Optional[torch.Tensor] = None  # [B, R] actor (old) log-probs
    ref_logprobs: Optional[torch.Tensor] = None  # [B, R]
    values: Optional[torch.Tensor] = None  # [B, R]
    scores: Optional[torch.Tensor] = None  # [B]
    references: Optional[list] = None  # [B] list[str] each: the dataset row's reference texts (may be empty)
    meta: Optional[list] = None  # [B] the dataset row's meta value (any JSON value or None)
    dense_rewards: Optional[torch.Tensor] = None  # [B, R] per-token rewards of dense rewards (added when shaping)
    reward_parts: Optional[dict] = None  # {reward name: [B]} each reward's own value (a list of rewards)
    reward_extra: Optional[dict] = None  # {name/key: float} batch means of reward servers' extra_logs
    gen_logprobs: Optional[torch.Tensor] = None  # [B, R] log-probs the generation sampled with (temperature T)
    allowed: Optional[torch.Tensor] = None  # [B, R, V] bool, NLPO: tokens the mask model allowed at each step

    @property
    def sequences(self) -> torch.Tensor:
        """[B, P+R] prompt and response token ids."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P+R]: prompt padding and everything after the first EOS are masked."""
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)

    def select(self, idx) -> "Rollout":
        """A sub-batch (rows `idx`) of every tensor and list field."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            elif isinstance(v, dict) and f.name == "reward_parts":
                out[f.name] = {k: t[idx] for k, t in v.items()}
            elif isinstance(v, list):
                ids = idx.tolist() if isinstance(idx, torch.Tensor) else list(range(len(v)))[idx]
                out[f.name] = [v[i] for i in ids]
            else:
                out[f.name] = v
        return Rollout(**out)


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """The rows of several rollouts as one: prompts left-padded to the longest, responses (all
    gen.max_new_tokens wide) stacked; a field that is None in the first part is None in the result."""
    width = max(p.prompt_ids.shape[1] for p in parts)
    out = {}
    for f in fields(Rollout):
        values = [getattr(p, f.name) for p in parts]
        if values[0] is None:
            out[f.name] = None
        elif isinstance(values[0], list):
            out[f.name] = [x for v in values for x in v]
        elif isinstance(values[0], dict):  # reward_parts {name: [B]} rows; reward_extra {key: batch mean} averaged
            out[f.name] = {k: torch.cat([v[k] for v in values]) if isinstance(values[0][k], torch.Tensor)
                           else sum(v[k] for v in values) / len(values) for k in values[0]}
        elif f.name in ("prompt_ids", "prompt_mask"):
            fill = pad_token_id if f.name == "prompt_ids" else 0
            out[f.name] = torch.cat([torch.nn.functional.pad(v, (width - v.shape[1], 0), value=fill) for v in values])
        else:
            out[f.name] = torch.cat(values)
    return Rollout(**out)


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int,
                           ended: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, R] covering tokens up to and including the first EOS, and has_eos [B].

    `ended` [B] marks rows stopped by a stop string: their trailing pad run is masked too.
    """
    B, R = response_ids.shape
    is_eos = response_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full((B,), R, device=response_ids.device))
    pos = torch.arange(R, device=response_ids.device).unsqueeze(0)
    mask = pos <= first_eos.unsqueeze(1)
    if ended is not None and ended.any():
        # stop-string rows: generate() pads after the stop; the last non-pad token closes the response
        not_pad = (response_ids != pad_token_id).long()
        last_real = R - 1 - not_pad.flip(1).argmax(dim=1)
        mask &= ~(ended.unsqueeze(1) & (pos > last_real.unsqueeze(1)))
    return mask.float(), has_eos


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: GenerationSection,
             *, batch_size: Optional[int] = None, return_logprobs: bool = False, mask_model=None,
             mask_top_p: float = 1.0, allowed_out: Optional[list] = None):
    """Sample responses for left-padded prompts [B, P] -> (response_ids [B, R], response_mask, has_eos).

    `return_logprobs`: a 4th item, the generation's log-probs [B, R] of the sampled tokens at
    gen.temperature (0 on padding; None with stop strings, where HF generate() samples).
    `mask_model`, `mask_top_p`, `allowed_out`: NLPO's masked sampling (see `sample_tokens`).

    R = gen.max_new_tokens always (shorter generations are right-padded), so shapes are static.
    `model` is an HF causal LM in inference mode (the hybrid engine's module). Without stop strings
    our own decode loop (`sample_tokens`) runs; with them, HF `generate()` (it implements them).
    """
    B = prompt_ids.shape[0]
    bs = batch_size or B
    R = gen.max_new_tokens
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    outs, lps = [], []
    for i in range(0, B, bs):
        ids, mask = prompt_ids[i:i + bs], prompt_mask[i:i + bs]
        if gen.stop_strings:
            out = _hf_generate(model, tokenizer, ids, mask, gen)
        else:
            out = sample_tokens(model, ids, mask, gen, eos_token_id=None if gen.ignore_eos else eos,
                                pad_token_id=pad, synced=_needs_synced_steps(model), return_logprobs=return_logprobs,
                                mask_model=mask_model, mask_top_p=mask_top_p, allowed_out=allowed_out)
            if return_logprobs:
                out, lp = out
                lps.append(torch.nn.functional.pad(lp, (0, R - lp.shape[1])))
        outs.append(torch.nn.functional.pad(out, (0, R - out.shape[1]), value=pad))
    response_ids = torch.cat(outs).to(prompt_ids.device)
    gen_lp = torch.cat(lps).to(prompt_ids.device) if lps else None
    if gen.ignore_eos:  # fixed-length responses (benchmarks, TRL's stop_token=None): every token counts
        out = response_ids, torch.ones_like(response_ids, dtype=torch.float32), (response_ids == eos).any(1)
        return (*out, gen_lp) if return_logprobs else out
    ended = None
    if gen.stop_strings:
        ended = ~(response_ids == eos).any(1) & (response_ids[:, -1] == pad)
    mask, has_eos = response_mask_from_ids(response_ids, eos, pad, ended)
    # everything after the end is padding, so scoring and decoding never see stray tokens
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad))
    if return_logprobs:
        return response_ids, mask, has_eos, None if gen_lp is None else gen_lp * mask
    return response_ids, mask, has_eos


def _hf_generate(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, gen: GenerationSection) -> torch.Tensor:
    """HF `generate()` (used for stop strings) -> new tokens [B, <= R]."""
    kwargs = dict(max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens, do_sample=gen.do_sample,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=None if gen.ignore_eos else tokenizer.eos_token_id,
                  use_cache=True, stop_strings=gen.stop_strings, tokenizer=tokenizer)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    skip = ids.shape[1]
    if seq2seq.is_seq2seq(model):  # encoder inputs; the output starts with the decoder start token
        ids, mask, start, skip = seq2seq.hf_generate_inputs(model, ids, mask)
        kwargs.update(start)
    return model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, skip:]


def _needs_synced_steps(model) -> bool:
    """True when forwards run collectives (ZeRO-3 weights not gathered): every rank must then run the
    same number of decode steps, so nobody stops early."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return False
    return any(getattr(p, "ds_status", None) is not None and p.ds_status.name == "NOT_AVAILABLE"
               for p in model.parameters())


def warp_logits(logits: torch.Tensor, gen: GenerationSection) -> torch.Tensor:
    """Next-token logits [B, V] -> sampling logits: temperature, then top-k, then top-p (HF's order)."""
    logits = logits / gen.temperature
    if gen.top_k and gen.top_k < logits.shape[-1]:
        kth = torch.topk(logits, gen.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1.0 - gen.top_p
        drop_sorted[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of probs [B, V] (rows sum to 1, zeros allowed) -> [B] int64.

    Inverse-CDF sampling: one uniform number per row against the float64 cumulative sum. Same
    distribution as `torch.multinomial(probs, 1)`, which draws an exponential variate for every
    vocabulary entry: 16 ms vs 3 ms per token for [8, 49152] on 2 CPU cores (measured here), i.e.
    ~0.4 s of every 32-token rollout. Zero-probability entries are never chosen.
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1).squeeze(1)
    # u * total can round up to the total itself: step back from any trailing zero-probability entry
    bad = probs.gather(1, idx[:, None]).squeeze(1) <= 0
    if bool(bad.any()):
        idx = torch.where(bad, probs.argmax(-1), idx)
    return idx


def _cache_keyword(model) -> str:
    """The forward keyword of the KV cache: 'cache' from transformers 5.24 on, 'past_key_values' before.

    Read from the signature of the innermost Hugging Face model (peft and DeepSpeed wrap it): passing
    'cache' to an older model would land in **kwargs and silently decode without a cache.
    """
    import inspect

    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_tokens(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: GenerationSection, *,
                  eos_token_id: Optional[int], pad_token_id: int, synced: bool = False,
                  return_logprobs: bool = False, mask_model=None, mask_top_p: float = 1.0,
                  allowed_out: Optional[list] = None):
    """Decode up to gen.max_new_tokens tokens for left-padded prompts [B, P] -> new tokens [B, <= R]
    (and, `return_logprobs`, their log-probs [B, <= R] under the raw logits at gen.temperature: the
    quantity the trainer recomputes, so the two measure the train-inference mismatch).
    `mask_model` (NLPO): sampling stays inside its top-`mask_top_p` tokens (`rl.top_p_token_mask`, EOS
    always allowed); the per-step masks [B, R, V] are appended to `allowed_out` and log-probs are
    those of the masked distribution.

    A plain KV-cache loop (one forward per token, LM head on the last position only) that does what
    HF `generate()` does for our settings (min_new_tokens, temperature, top-k, top-p, greedy, EOS, then
    padding) without its per-token bookkeeping: ~1 s less per 32 tokens for SmolLM2 on 2 CPU cores.
    Llama-family models decode with the CPU backend's fused step (`cpu.fused_decode`); others, and
    every model on GPU, run their own forward with a DynamicCache.
    Stops when every row has ended unless `synced` (all ranks then run the same number of steps).
    """
    B = prompt_ids.shape[0]
    first_logits, next_logits = _decode_steps(model, prompt_ids, prompt_mask.long(), gen)
    logits = first_logits()
    if mask_model is not None:
        from rlhf_engine.rl import mask_logits, top_p_token_mask

        first_mask, next_mask = _decode_steps(mask_model, prompt_ids, prompt_mask.long(), gen)
        always = [] if eos_token_id is None else [eos_token_id]
        steps = [top_p_token_mask(first_mask(), mask_top_p, always)]
        logits = mask_logits(logits, steps[-1])
    unfinished = torch.ones(B, dtype=torch.bool, device=prompt_ids.device)
    tokens, logprobs = [], []
    for t in range(gen.max_new_tokens):
        if return_logprobs:
            step_lp = torch.log_softmax(logits / gen.temperature, dim=-1)  # before the min-tokens EOS block
        if eos_token_id is not None and t < gen.min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        if gen.do_sample:
            nxt = sample_categorical(warp_logits(logits, gen).softmax(-1))
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        tokens.append(nxt)
        if return_logprobs:
            logprobs.append(step_lp.gather(1, nxt[:, None]).squeeze(1))
        if eos_token_id is not None:
            unfinished &= nxt != eos_token_id
        if t == gen.max_new_tokens - 1 or (not synced and not bool(unfinished.any())):
            break
        logits = next_logits(nxt)
        if mask_model is not None:
            steps.append(top_p_token_mask(next_mask(nxt), mask_top_p, always))
            logits = mask_logits(logits, steps[-1])
    if mask_model is not None and allowed_out is not None:
        allowed = torch.stack(steps[:len(tokens)], dim=1)  # padding steps after an early stop: all allowed
        allowed_out.append(torch.nn.functional.pad(allowed, (0, 0, 0, gen.max_new_tokens - allowed.shape[1]),
                                                   value=True))
    if return_logprobs:
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)
    return torch.stack(tokens, dim=1)


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """Print a notice once per process (the first rollout), not once per rollout; rank 0 only."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    if message not in _SAID:
        _SAID.add(message)
        print(f"[generate] {message}", flush=True)


def _decode_steps(model, prompt_ids: torch.Tensor, mask: torch.Tensor, gen: GenerationSection):
    """(prefill() -> logits [B, V], step(tokens [B]) -> logits [B, V]), float32 next-token logits."""
    from rlhf_engine.backends import cpu as cpu_backend

    B, P = prompt_ids.shape
    if seq2seq.is_seq2seq(model):
        return seq2seq.decode_steps(model, prompt_ids, mask)
    decoder, why_not = cpu_backend.fused_decoder(model, B, P + gen.max_new_tokens)
    if decoder is not None:
        return (lambda: decoder.prefill(prompt_ids, mask)), decoder.step
    if why_not:
        _say_once(f"cpu.fused_decode: {why_not}; decoding with the model's own forward")

    from transformers import DynamicCache
    positions = position_ids_from_mask(mask)
    state = {"mask": mask, "pos": positions[:, -1:] + 1}
    cache = {_cache_keyword(model): DynamicCache(config=model.config)}

    def prefill():
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **cache)
        return out.logits[:, -1].float()

    def step(tokens):
        state["mask"] = torch.cat([state["mask"], mask.new_ones(B, 1)], dim=1)
        out = model(input_ids=tokens.unsqueeze(1), attention_mask=state["mask"], position_ids=state["pos"],
                    use_cache=True, **cache)
        state["pos"] = state["pos"] + 1
        return out.logits[:, -1].float()

    return prefill, step


def forward_logprobs(model: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                     temperature: float = 1.0, *, return_entropy: bool = False,
                     hidden_out: Optional[list] = None, allowed: Optional[torch.Tensor] = None):
    """Log-probs [B, R] of the last R tokens of `input_ids` [B, L] (and entropy [B, R] if asked).

    `model` is an HF causal LM or a DeepSpeed engine wrapping one. Only the R+1 last positions go
    through the LM head (`logits_to_keep`), and the log-softmax is the chunked kernel, so no
    [B, L, V] float32 tensor exists. `hidden_out`: a list that receives the backbone's final
    hidden states [B, L, H] (a reward head sharing this backbone reads them). `allowed` [B, R, V]
    bool (NLPO): log-probs of the distribution renormalised over those tokens.
    Encoder-decoder models: `input_ids` is prompt + response as well (engine/seq2seq.py splits it).
    """
    if seq2seq.is_seq2seq(model):
        if hidden_out is not None:
            raise ValueError("a reward model cannot share an encoder-decoder reference's backbone")
        if allowed is not None:
            raise ValueError("NLPO's masked policy is implemented for causal LMs only")
        return seq2seq.forward_logprobs(model, input_ids, attention_mask, response_len, temperature,
                                        return_entropy=return_entropy)
    hook = None
    if hidden_out is not None:
        backbone = getattr(model, "module", model).base_model
        hook = backbone.register_forward_hook(lambda _m, _a, out: hidden_out.append(out.last_hidden_state))
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), logits_to_keep=response_len + 1,
                    use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    logits = out.logits[:, -response_len - 1:-1]
    if allowed is not None:
        from rlhf_engine.rl import mask_logits

        logits = mask_logits(logits, allowed.to(logits.device))
    labels = input_ids[:, -response_len:]
    return kernels.logprobs_from_logits(logits, labels, temperature, return_entropy=return_entropy)


def forward_values(critic: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   response_len: int) -> torch.Tensor:
    """Critic values [B, R] for the states before each of the last R tokens of `input_ids` [B, L].

    `critic` is an engine.models.ScalarModel or a DeepSpeed engine wrapping one (forward, so ZeRO hooks run).
    """
    if seq2seq.is_seq2seq(critic):  # values on the decoder states (engine/seq2seq.py)
        return critic(input_ids=input_ids, attention_mask=attention_mask, per_token=True,
                      response_len=response_len).float()
    values = critic(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), per_token=True)
    return values[:, -response_len - 1:-1].float()


@torch.no_grad()
def micro_batched(fn: Callable, micro_batch_size: int, *tensors: torch.Tensor, **kwargs) -> torch.Tensor:
    """Apply fn to row slices of `tensors` and concatenate: bounded memory for scoring passes."""
    return torch.cat([fn(*parts, **kwargs) for parts in zip(*(chunks(t, micro_batch_size) for t in tensors))])
