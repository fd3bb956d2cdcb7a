"""2-rank worker for tests/engine/test_seq2seq.py: seq2seq actors (tiny T5, tiny BART + LoRA) at ZeRO-3.

For each model: build it the engine's way (zero_init_context + create_train_engine), take one training
step on the teacher-forced log-probs (ZeRO-3 backward through encoder and decoder), then greedy-decode
per-rank prompts (a) inside the hybrid engine, (b) sharded with the hybrid engine off (synced steps),
and (c) with an unsharded copy holding the gathered weights (LoRA: merged into the base). Prints
`SEQ2SEQ {json}` per rank and model.
"""
from __future__ import annotations

import argparse
import json

import deepspeed
import torch

from rlhf_engine.config import GenerationSection, derive_batch_sizes, load_recipe
from rlhf_engine.distributed import create_train_engine, ds_config, init_distributed, zero_init_context
from rlhf_engine.hybrid import HybridEngine, original_linear
from rlhf_engine.models import load_policy, load_tokenizer
from rlhf_engine.rollout import forward_logprobs, generate

RECIPE = "recipes/tiny/ppo-seq2seq.yaml"
PROMPTS = [["Write a haiku about rain.", "Hi", "Name three colours of the sea at night."],
           ["Why do cats purr so loudly?", "Count to five.", "Tell me a story"]]


def full_state(module) -> dict:
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: t.detach().clone() for n, t in module.state_dict().items()}  # tied weights under every name


def run(name: str, lora: bool, rank: int) -> dict:
    overrides = [f"model.name_or_path={name}", "optim.lr=1e-4"] + (["model.lora={r: 4, alpha: 8}"] if lora else [])
    recipe = load_recipe(RECIPE, overrides)
    sizes = derive_batch_sizes(recipe, 2)
    tokenizer = load_tokenizer(recipe.model)
    with zero_init_context(ds_config(recipe, sizes)):
        actor = create_train_engine(load_policy(recipe.model), recipe, sizes, total_steps=1)
    batch = tokenizer(PROMPTS[rank], return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    gen = GenerationSection(max_new_tokens=10, do_sample=False, ignore_eos=True)

    # one step that raises the log-probs of a fixed response: the weights are no longer the folder's
    target = tokenizer(["a b c d"] * len(ids), return_tensors="pt").input_ids
    seq, attn = torch.cat([ids, target], 1), torch.cat([mask, torch.ones_like(target)], 1)
    loss = -forward_logprobs(actor, seq, attn, target.shape[1]).mean()
    actor.backward(loss)
    actor.step()

    def decode(model) -> dict:
        """Greedy tokens, seeded samples and the sampled tokens' log-probs (random models are nearly
        input-blind when greedy; the samples and log-probs see every weight)."""
        greedy = generate(model, tokenizer, ids, mask, gen)[0]
        torch.manual_seed(7)
        sampled = generate(model, tokenizer, ids, mask, gen.model_copy(update={"do_sample": True}))[0]
        seq = torch.cat([ids, sampled], 1)
        logp = forward_logprobs(model, seq, torch.ones_like(seq) * torch.cat([mask, torch.ones_like(sampled)], 1),
                                sampled.shape[1])
        return {"greedy": greedy.tolist(), "sampled": sampled.tolist(), "logp": logp.flatten().tolist()}

    hybrid = HybridEngine(actor)
    with hybrid.inference() as model:
        in_hybrid = decode(model)
    with HybridEngine(actor, enabled=False).inference() as model:
        sharded = decode(model)
    state = full_state(actor.module)
    plain = load_policy(recipe.model.model_copy(update={"lora": recipe.model.lora}))
    plain.load_state_dict(state)
    if lora:
        plain = plain.merge_and_unload()
    with original_linear():
        unsharded = decode(plain.eval())
    lora_b = [v.abs().max().item() for k, v in state.items() if "lora_B" in k]
    return {"model": name, "rank": rank, "lora": lora, "loss": loss.item(), "hybrid": in_hybrid,
            "sharded": sharded, "unsharded": unsharded, "sharded_params": sum(
                hasattr(p, "ds_id") for p in actor.module.parameters()),
            "lora_b_max": max(lora_b) if lora_b else None, "gather_s": hybrid.last_timings["gather_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.parse_args()
    dist = init_distributed()
    for name, lora in (("tiny-t5", False), ("tiny-bart", True)):
        print("SEQ2SEQ " + json.dumps(run(name, lora, dist.rank)), flush=True)


if __name__ == "__main__":
    main()
