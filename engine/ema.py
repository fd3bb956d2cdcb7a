"""EMA actor (``ppo.ema_decay``): an exponential moving average of the actor's trained weights.

After every RL step's update, ``ema <- decay * ema + (1 - decay) * weights`` (``rl.ema_update``),
starting from the weights the run starts with. It is held the way the actor is: under ZeRO-3 each
rank keeps the average of only its own partition of every parameter (``param.ds_tensor``), so it
costs one float32 copy of the rank's share; otherwise a float32 copy of each trained parameter
(LoRA: only the adapters, the frozen base is its own average).

Checkpoints hold it as ``ema/rank<k>.safetensors`` (plain tensors, no pickle); resume restores it;
``evaluate`` runs the eval prompts on it too (``ema/*`` keys in eval.jsonl); and
``rlhf-engine export RUN --ema`` writes it as a Hugging Face folder (``load_consolidated``).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlhf_engine import rl
from rlhf_engine.distributed import all_reduce_mean, unwrap


def _rank_world() -> tuple[int, int]:
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 partition, else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EmaActor:
    """The moving average of a (DeepSpeed) actor's trainable parameters; see the module docstring."""

    def __init__(self, actor, decay: float):
        self.decay = decay
        named = [(n, p) for n, p in unwrap(actor).named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in named}
        self.sharded = any(hasattr(p, "ds_tensor") for p in self.params)
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    def update(self) -> None:
        """One EMA step from the actor's current weights (call after each RL step's update)."""
        with torch.no_grad():
            rl.ema_update(self.shadow, [_local(p) for p in self.params], self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: the actor holds the EMA weights (cast to its dtype); on exit its own weights return exactly."""
        saved = [_local(p).detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, e in zip(self.params, self.shadow):
                    _local(p).copy_(e)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    _local(p).copy_(s)

    def save(self, folder: Path) -> None:
        """Write this rank's share to ``folder/ema/rank<k>.safetensors`` (every rank calls it)."""
        rank, world = _rank_world()
        (Path(folder) / "ema").mkdir(parents=True, exist_ok=True)
        meta = {"decay": str(self.decay), "world_size": str(world), "sharded": str(int(self.sharded)),
                "shapes": json.dumps(self.shapes)}
        save_file({n: t.contiguous() for n, t in zip(self.names, self.shadow)},
                  str(Path(folder) / "ema" / f"rank{rank}.safetensors"), metadata=meta)

    def load(self, folder: Path) -> None:
        """Restore this rank's share from a checkpoint folder written by ``save`` (same world size)."""
        rank, _ = _rank_world()
        path = Path(folder) / "ema" / f"rank{rank}.safetensors"
        if not path.is_file():
            from rlhf_engine.checkpoint import CheckpointError
            raise CheckpointError(f"{folder} holds no EMA ({path} is missing): it was saved without ppo.ema_decay; "
                                  "resume without it, or start a new run")
        tensors = load_file(str(path))
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(tensors[n])


def load_consolidated(ckpt: Path, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole EMA of a checkpoint (ranks' ZeRO-3 partitions stitched), names without ``prefix``, in ``dtype``."""
    from rlhf_engine.checkpoint import CheckpointError

    files = sorted((Path(ckpt) / "ema").glob("rank*.safetensors"), key=lambda f: int(f.stem[4:]))
    if not files:
        raise CheckpointError(f"checkpoint {ckpt} holds no EMA weights: the run did not set ppo.ema_decay; "
                              "export without --ema")
    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
    shapes, sharded = json.loads(meta["shapes"]), meta["sharded"] == "1"
    parts = [load_file(str(f)) for f in files] if sharded else [load_file(str(files[0]))]
    out = {}
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        # ZeRO-3 pads every parameter to world_size equal partitions; rank r holds the r-th
        flat = torch.cat([p[name].reshape(-1) for p in parts])[:numel]
        out[name.removeprefix(prefix)] = flat.reshape(shape).to(dtype)
    return out


def evaluate_ema(ema: EmaActor, rollout, seed: int) -> dict:
    """Eval metrics of the EMA weights: ``rollout()`` (the eval prompts' rollout) run with the EMA swapped
    in and the same sampling seed as the main evaluation; keys ``ema/score/mean``, ``ema/kl/mean``,
    ``ema/response/length``."""
    with ema.swapped(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        r = rollout()
    mask = r.response_mask
    per_rank = torch.stack([r.scores.float().mean(), ((r.logprobs - r.ref_logprobs) * mask).sum(1).mean(),
                            mask.sum(1).float().mean()])
    score, kl, length = all_reduce_mean(per_rank).tolist()  # equal shares per rank: mean of means
    return {"ema/score/mean": score, "ema/kl/mean": kl, "ema/response/length": length}
