"""Generation speed of a ZeRO-3 actor three ways: sharded, hybrid engine, unsharded copy.

    deepspeed --num_gpus 2 launch/bench_generate.py [--model tiny|smollm2] [--batch 8] [--new-tokens 32]
        [--layers-per-group K]   # also time the memory-bounded layer-group mode

Every rank generates its own batch of prompts concurrently in each mode (greedy, exactly
`--new-tokens` tokens), with one torch thread per rank by default:
- sharded:   `generate()` on the ZeRO-3 model with its hooks on (each forward gathers every layer);
- hybrid:    `HybridEngine(engine).inference()`: gather + generate + release, all timed;
- unsharded: a plain copy of the same weights (the speed the hybrid engine should match).
Rank 0 prints one JSON line: seconds (slowest rank), tokens/s (all ranks), ratios, targets
(hybrid <= 1.15x unsharded, sharded >= 5x hybrid) and whether the three produced the same tokens.
`--model tiny` is a quick 2-layer random Llama (all weights partitioned); `smollm2` (default) is
SmolLM2-135M-Instruct from the `smollm2-135m-instruct` preset.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from rlhf_engine.distributed import init_distributed
from rlhf_engine.hybrid import HybridEngine, original_linear

PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?",
           "Explain gradient descent to a child.", "List three uses of a paperclip.",
           "Why is the sky blue?", "Give me a recipe for pancakes.", "Summarise the plot of Hamlet.",
           "How do airplanes fly?", "Tell me a joke about computers.", "What is reinforcement learning?"]


def zero3_config(tiny: bool) -> dict:
    zero = {"stage": 3}
    if tiny:  # the default threshold would keep every tiny weight whole: partition them all instead
        zero.update(stage3_param_persistence_threshold=0)
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "steps_per_print": 10**9}


def load_unsharded(name: str, batch: int, rank: int):
    """(plain model in eval mode, input_ids [batch, prompt_len], attention_mask), left-padded prompts."""
    if name == "tiny":
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
        model = AutoModelForCausalLM.from_config(config)
        ids = torch.randint(3, 1000, (batch, 16), generator=torch.Generator().manual_seed(rank))
        return model.eval(), ids, torch.ones_like(ids)
    from rlhf_engine.config import ModelConfig
    from rlhf_engine.models import load_policy, load_tokenizer
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct")
    if rank == 0:  # convert / cache the preset once before the other rank reads it
        load_tokenizer(cfg)
    dist.barrier()
    tokenizer = load_tokenizer(cfg)
    model = load_policy(cfg, for_training=False)
    texts = [PROMPTS[(rank * batch + i) % len(PROMPTS)] for i in range(batch)]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True) for t in texts]
    enc = tokenizer(chats, return_tensors="pt", padding=True)
    return model, enc["input_ids"], enc["attention_mask"]


def zero3_engine(plain, tiny: bool):
    """A ZeRO-3 DeepSpeedEngine (with AdamW, like a training actor) holding the weights of `plain`."""
    config = zero3_config(tiny)
    keep = HfDeepSpeedConfig(config)  # noqa: F841  (alive while constructing: zero.Init)
    model = AutoModelForCausalLM.from_config(plain.config)
    unset_hf_deepspeed_config()
    src = dict(plain.named_parameters())
    with GatheredParameters(list(model.parameters()), modifier_rank=0):
        for name, p in model.named_parameters():
            p.data.copy_(src[name].data)
    model.generation_config = plain.generation_config
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
                                      config=config)
    return engine


def timed(fn) -> tuple[float, torch.Tensor]:
    """Run `fn` on all ranks at once; return (slowest rank's seconds, fn's output)."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    seconds = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item(), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--batch", type=int, default=8, help="prompts per rank")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers-per-group", type=int, default=None, help="also time the layer-group mode")
    parser.add_argument("--repeats", type=int, default=2, help="time each mode this often, keep the fastest")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():  # as a CPU run does: the CPU backend's model switches at their defaults
        from rlhf_engine.backends import cpu
        from rlhf_engine.config import CpuConfig

        cpu.configure(CpuConfig())
    init_distributed(num_threads=args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()

    plain, ids, mask = load_unsharded(args.model, args.batch, rank)
    engine = zero3_engine(plain, tiny=args.model == "tiny")
    gen = dict(attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
               do_sample=False)

    def run(hybrid: HybridEngine, new_tokens: int):
        with hybrid.inference() as model:
            return model.generate(ids, **{**gen, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens})

    modes = {"sharded": HybridEngine(engine, enabled=False), "hybrid": HybridEngine(engine)}
    if args.layers_per_group:
        modes["groups"] = HybridEngine(engine, layers_per_group=args.layers_per_group)
    def unsharded(new_tokens: int):
        with original_linear():  # as in a process that never built a ZeRO-3 model
            return plain.generate(ids, **{**gen, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens})

    run(modes["hybrid"], 2)  # warm-up: first-call allocations and lazy inits
    unsharded(2)
    seconds, outputs, breakdown = {}, {}, {}
    for _ in range(args.repeats):  # modes interleaved, fastest repeat kept: robust to a busy machine
        for name, fn in [("unsharded", unsharded), *[(n, functools.partial(run, h)) for n, h in modes.items()]]:
            t, outputs[name] = timed(lambda: fn(args.new_tokens))
            if t < seconds.get(name, float("inf")):
                seconds[name] = t
                if name in modes:
                    breakdown[name] = modes[name].last_timings
    tokens = args.batch * args.new_tokens * world
    same = {n: torch.equal(out, outputs["unsharded"]) for n, out in outputs.items() if n != "unsharded"}
    same_all = torch.tensor([float(all(same.values()))])
    dist.all_reduce(same_all, op=dist.ReduceOp.MIN)
    ratio_unsharded = seconds["hybrid"] / seconds["unsharded"]
    speedup = seconds["sharded"] / seconds["hybrid"]
    report = dict(model=args.model, ranks=world, threads_per_rank=args.threads, repeats=args.repeats, batch_per_rank=args.batch,
                  prompt_len=ids.shape[1], new_tokens=args.new_tokens, seconds=seconds,
                  tokens_per_s={n: tokens / s for n, s in seconds.items()}, hybrid_timings=breakdown,
                  hybrid_over_unsharded=ratio_unsharded, sharded_over_hybrid=speedup,
                  same_tokens_all_ranks=bool(same_all.item()),
                  targets=dict(hybrid_within_1_15x_unsharded=ratio_unsharded <= 1.15,
                               hybrid_5x_faster_than_sharded=speedup >= 5.0))
    if rank == 0:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
