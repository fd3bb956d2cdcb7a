"""Checkpoints: atomic save / resume of DeepSpeed engines, export to a Hugging Face folder, push to the hub.

One checkpoint, written to ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` when whole:
  engines/<name>/     DeepSpeed ``save_checkpoint(tag=<name>)``: weights, optimizer, LR schedule (ZeRO 0-3 shards)
  hf/<name>/          config.json (+ generation_config.json, adapter_config.json) to rebuild the HF model
  tokenizer/          the tokenizer, chat template included (so export needs nothing else)
  checkpoint.json     step, world size, and per engine: kind, prefix, ZeRO stage, dtype, LoRA
  trainer_state.json  step + the trainer's JSON state (sampler, KL controller, reward moments, ...)
  rng/rank<k>.json    python / numpy / torch RNG states of rank k (plain JSON: resuming unpickles nothing)
  ema/rank<k>.safetensors  (ppo.ema_decay) this rank's share of the actor's moving average (engine/ema.py)
  COMPLETE            written last: only checkpoints holding it are resumed or exported
A crash during a save leaves a ``.tmp-*`` folder that is ignored and removed by the next save.

Exporting a run trained with ZeRO stage 0-2 reads DeepSpeed's ``mp_rank_00_model_states.pt`` with
``torch.load(weights_only=False)``, i.e. it unpickles that file: export only run folders you trust.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from rlhf_engine.config import RecipeError

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RecipeError):
    """A checkpoint / export / push problem, with a message that says what to do (CLI exit code 2)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """{step: folder} of the COMPLETE checkpoints of a run, in step order."""
    root = Path(run_dir) / "checkpoints"
    found = {}
    for d in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(d.name)
        if m and (d / COMPLETE).is_file():
            found[int(m.group(1))] = d
    return dict(sorted(found.items()))


def _describe_available(run_dir: Path) -> str:
    steps = list_checkpoints(run_dir)
    return f"available: {', '.join(f'step-{s}' for s in steps)}" if steps else "there are none"


# --------------------------------------------------------------------------------------------
# what an engine holds, for export
def _find_hf_model(module: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(state-dict prefix, the HF model or peft wrapper) inside a user module (CriticModule, ScalarModel, ...)."""
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel
        kinds: tuple = (PreTrainedModel, PeftModel)
    except ImportError:
        kinds = (PreTrainedModel,)
    for name, sub in module.named_modules():
        if isinstance(sub, kinds):
            return (name + "." if name else ""), sub
    raise CheckpointError(f"{type(module).__name__} holds no Hugging Face model; only HF models can be exported")


def _save_hf_description(engine, out: Path) -> dict:
    """Write config (+ generation config, LoRA config) of the engine's HF model to ``out``; return its metadata."""
    from deepspeed import DeepSpeedEngine

    module = engine.module if isinstance(engine, DeepSpeedEngine) else engine
    prefix, hf = _find_hf_model(module)
    peft = hasattr(hf, "peft_config")
    base = hf.get_base_model() if peft else hf
    cls = type(base).__name__
    kind = next((k for k, suffix in (("seq_cls", "ForSequenceClassification"), ("causal_lm", "ForCausalLM"),
                                     ("seq2seq_lm", "ForConditionalGeneration")) if cls.endswith(suffix)), None)
    if kind is None:
        raise CheckpointError(f"cannot export a {cls}: expected a *ForCausalLM, *ForConditionalGeneration or "
                              "*ForSequenceClassification model")
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(base.config)
    config.architectures = [cls]  # a critic loaded from a causal-LM folder still says *ForCausalLM
    config.save_pretrained(out)
    if kind in ("causal_lm", "seq2seq_lm") and getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(out)
    if peft:
        hf.peft_config[hf.active_adapter].save_pretrained(out)
    stage = engine.zero_optimization_stage() if isinstance(engine, DeepSpeedEngine) else 0
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    return {"kind": kind, "class": cls, "prefix": prefix, "peft": peft, "zero_stage": stage, "dtype": dtype}


def _rng_state() -> dict:
    """This process's RNG states as JSON-able lists (no pickle on the way back)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(torch.tensor(state["accelerator"], dtype=torch.uint8))


def prepare_run_dir(run_dir: Path, resume: Optional[str], *, is_main: bool) -> Optional[Path]:
    """Collective, called once the inputs are checked: the checkpoint to resume from, or None.

    A fresh run (no ``resume``, or ``--resume auto`` finding no checkpoint, which is said) moves an
    earlier run's folder aside first, so it never appends to its metrics or mixes its checkpoints.
    """
    run_dir = Path(run_dir)
    ckpt = CheckpointManager(run_dir, 1, is_main=is_main).resolve(resume) if resume else None
    if ckpt is None:
        if is_main and resume == "auto":
            print(f"[resume] --resume auto: no complete checkpoint in {run_dir / 'checkpoints'}; starting a fresh run",
                  flush=True)
        if is_main:
            from rlhf_engine.tracking import archive_previous_run
            moved = archive_previous_run(run_dir)
            if moved:
                print(f"[run] an earlier run in {run_dir} was moved to {moved}", flush=True)
    _barrier()
    return ckpt


# --------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves / finds / restores checkpoints under ``run_dir/checkpoints`` (see the module docstring).

    ``tokenizer`` (optional) is saved into every checkpoint so export needs nothing else.
    """

    def __init__(self, run_dir: Path, keep_last: int, *, is_main: bool, tokenizer=None):
        if keep_last < 1:
            raise CheckpointError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.run_dir, self.root = Path(run_dir), Path(run_dir) / "checkpoints"
        self.keep_last, self.is_main, self.tokenizer = keep_last, is_main, tokenizer

    def save(self, step: int, engines: dict, state: dict, write_rank_files=None) -> Path:
        """Collective (every rank calls it): write checkpoint ``step`` atomically, prune to keep_last.

        ``engines``: {name: DeepSpeed engine} (actor, critic, model, ...); ``state``: JSON-able trainer
        state (floats, ints, lists, dicts); ``write_rank_files(folder)``: called on every rank to add its
        own files (e.g. the EMA shard) before the checkpoint is marked complete. Returns the final
        ``checkpoints/step-N`` folder.
        """
        try:
            state_text = json.dumps({"step": step, **state}, indent=1)
        except TypeError as err:  # checked on every rank, before any rank waits in a barrier
            raise CheckpointError(f"checkpoint state for step {step} is not JSON-serialisable ({err}); "
                                  "pass floats/ints/lists/dicts (e.g. tensor.tolist())") from None
        final, tmp = self.root / f"step-{step}", self.root / f".tmp-step-{step}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(".tmp-*"):  # from a save that crashed
                shutil.rmtree(leftover, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        for name, engine in engines.items():  # each rank writes its own ZeRO shards
            engine.save_checkpoint(str(tmp / "engines"), tag=name, save_latest=False)
        (tmp / "rng" / f"rank{_rank()}.json").write_text(json.dumps(_rng_state()))
        if write_rank_files is not None:
            write_rank_files(tmp)
        if self.is_main:
            meta = {name: _save_hf_description(engine, tmp / "hf" / name) for name, engine in engines.items()}
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            (tmp / "trainer_state.json").write_text(state_text)
            (tmp / "checkpoint.json").write_text(json.dumps(
                {"format": 1, "step": step, "world_size": _world(), "time": time.time(), "engines": meta}, indent=1))
        _barrier()  # every rank's files are on disk
        if self.is_main:
            (tmp / COMPLETE).write_text(f"step {step}\n")
            if final.exists():  # re-saving a step after a resume: the new one replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        steps = list_checkpoints(self.run_dir)
        for step in list(steps)[:-self.keep_last]:
            shutil.rmtree(steps[step], ignore_errors=True)

    def latest(self) -> Optional[Path]:
        """The newest COMPLETE checkpoint, or None (``.tmp-*`` and unmarked folders are ignored)."""
        steps = list_checkpoints(self.run_dir)
        return steps[max(steps)] if steps else None

    def resolve(self, resume: str) -> Optional[Path]:
        """``"auto"`` -> latest() (None if there is none); else a checkpoint folder, ``step-N`` or ``N``."""
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not path.exists() and (self.root / resume).exists():
            path = self.root / resume
        elif not path.exists() and resume.isdigit():
            path = self.root / f"step-{resume}"
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder; {_describe_available(self.run_dir)} "
                                  f"in {self.root}. Pass one of them, or --resume auto")
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"--resume {resume}: {path} is incomplete (no {COMPLETE} marker: its save did not "
                                  f"finish); {_describe_available(self.run_dir)} in {self.root}")
        return path

    def load(self, path: Path, engines: dict) -> dict:
        """Restore ``engines`` (weights, optimizer, LR schedule) and this rank's RNG from ``path``.

        Collective. Returns the trainer state saved with it (``{"step": N, ...}``).
        """
        path = Path(path)
        meta = json.loads((path / "checkpoint.json").read_text())
        missing = sorted(set(engines) - set(meta["engines"]))
        if missing:
            raise CheckpointError(f"checkpoint {path} has no engine(s) {', '.join(missing)}; it holds "
                                  f"{', '.join(meta['engines'])}. Resume with the recipe that wrote it")
        sharded = any(meta["engines"][n]["zero_stage"] > 0 for n in engines)
        if sharded and meta["world_size"] != _world():
            raise CheckpointError(f"checkpoint {path} was written by {meta['world_size']} ranks but this run has "
                                  f"{_world()}; ZeRO shards cannot be re-split here. Resume with "
                                  f"--nproc {meta['world_size']}, or export it and start a new run from the export")
        for name, engine in engines.items():
            loaded, _ = engine.load_checkpoint(str(path / "engines"), tag=name, load_module_strict=True,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load engine '{name}' from {path / 'engines' / name}")
        rng = path / "rng" / f"rank{_rank()}.json"
        if rng.is_file():
            _set_rng_state(json.loads(rng.read_text()))
        elif _rank() == 0:  # written by an older version as a pickle: not read, the run continues
            print(f"[resume] {path} has no rng/rank*.json: sampling RNG starts fresh", flush=True)
        return json.loads((path / "trainer_state.json").read_text())


# --------------------------------------------------------------------------------------------
# export
def pick_checkpoint(run_dir: Path, step: Optional[int] = None) -> Path:
    """The checkpoint folder to export: ``step`` or the newest; CheckpointError naming what exists otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass the folder `rlhf-engine train` wrote "
                              "(<output_dir>/<name>, e.g. runs/my-run)")
    steps = list_checkpoints(run_dir)
    if not steps:
        raise CheckpointError(f"no checkpoints in {run_dir / 'checkpoints'}; train with checkpoint.save_final: true "
                              "(or checkpoint.save_every: N) so the run saves one")
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        raise CheckpointError(f"--step {step}: no complete checkpoint step-{step} in {run_dir / 'checkpoints'}; "
                              f"{_describe_available(run_dir)}")
    return steps[step]


def _pick_engine(meta: dict, which: Optional[str], stage: Optional[str]) -> str:
    names = list(meta["engines"])
    if which == "reward" and "reward" not in names and stage == "reward":
        which = "model"  # a reward-model run trains one engine, called "model"
    if which is None:
        which = next((n for n in ("actor", "model") if n in names), names[0] if len(names) == 1 else None)
    if which not in names:
        raise CheckpointError(f"--which {which}: this checkpoint holds {', '.join(names)}; pick one of them")
    return which


def _consolidated_state_dict(ckpt: Path, name: str, info: dict) -> dict[str, torch.Tensor]:
    """Whole-model weights of engine ``name`` (prefix stripped, in its training dtype), single process, CPU."""
    if info["zero_stage"] == 3:  # weights live only in the per-rank fp32 partitions: stitch them
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "engines"), tag=name)
    else:  # stages 0-2 keep the whole module in the rank-0 model file
        state = torch.load(ckpt / "engines" / name / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    dtype, prefix = getattr(torch, info["dtype"]), info["prefix"]
    return {k[len(prefix):]: (v.to(dtype) if v.is_floating_point() else v)
            for k, v in state.items() if k.startswith(prefix)}


def _rebuild(hf_dir: Path, info: dict, state: dict, name: str):
    """HF model (or peft wrapper) from the saved config, with ``state`` loaded exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    auto = {"seq_cls": AutoModelForSequenceClassification, "seq2seq_lm": AutoModelForSeq2SeqLM}.get(
        info["kind"], AutoModelForCausalLM)
    with no_init_weights():  # every weight is overwritten below; random init would only cost time
        model = auto.from_config(AutoConfig.from_pretrained(hf_dir), dtype=getattr(torch, info["dtype"]))
    if info["peft"]:
        from peft import PeftConfig, get_peft_model
        peft_cfg = PeftConfig.from_pretrained(hf_dir)
        peft_cfg.base_model_name_or_path = model.name_or_path  # the base is this model (peft warns otherwise)
        model = get_peft_model(model, peft_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    missing = [k for k in missing if current[k].data_ptr() not in loaded]  # tied weights were loaded via a twin
    if missing or unexpected:
        raise CheckpointError(f"weights of engine '{name}' do not match its saved config {hf_dir / 'config.json'}: "
                              f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    return model.eval()


def _check_overwrite(out_dir: Path, run_dir: Path) -> None:
    """--overwrite deletes ``out_dir``: never when it is the run, holds the run, or is the working folder."""
    out, run, cwd = out_dir.resolve(), run_dir.resolve(), Path.cwd().resolve()
    if out == run or out in run.parents:
        raise CheckpointError(f"--out {out_dir} with --overwrite would delete the run folder {run_dir} itself "
                              "(it is the run or a folder holding it); choose another --out")
    if out == cwd or out in cwd.parents:
        raise CheckpointError(f"--out {out_dir} with --overwrite would delete the current folder {cwd}; "
                              "choose a new folder for --out")


def export_run(run_dir: Path, out_dir: Path, *, step: Optional[int] = None, which: Optional[str] = None,
               merge_lora: bool = False, overwrite: bool = False, ema: bool = False) -> Path:
    """Write a Hugging Face folder for one engine of a run's checkpoint; returns ``out_dir``.

    ``which``: engine name ("actor", "critic", "model") or "reward" (a reward-stage run's model);
    default "actor", else "model". Causal LMs export as *ForCausalLM, critics / reward models as
    *ForSequenceClassification (num_labels=1). LoRA engines export the adapter, or with
    ``merge_lora`` a plain model with the adapters merged. ``ema``: the actor's moving average
    (``ppo.ema_decay``) instead of its trained weights. Bad input raises CheckpointError
    before anything is written; the folder is assembled aside and renamed into place.
    """
    import yaml

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = pick_checkpoint(run_dir, step)
    recipe_path = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else {}
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    name = _pick_engine(meta, which, recipe.get("stage"))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise CheckpointError(f"export target {out_dir} already exists and is not empty; choose a new --out "
                                  "or pass --overwrite to replace it")
        _check_overwrite(out_dir, run_dir)
    info = meta["engines"][name]
    hf_dir = ckpt / "hf" / name
    state = _consolidated_state_dict(ckpt, name, info)
    if ema:
        from rlhf_engine.ema import load_consolidated
        if name != "actor":
            raise CheckpointError(f"--ema exports the actor's moving average; drop --which {name}")
        averaged = load_consolidated(ckpt, info["prefix"], getattr(torch, info["dtype"]))
        twins = {state[k].data_ptr(): v for k, v in averaged.items() if k in state}  # tied: lm_head = embed_tokens
        state = {k: averaged.get(k, twins.get(v.data_ptr(), v)) for k, v in state.items()}
    adapter_only = info["peft"] and not merge_lora
    if info["peft"] and merge_lora:  # the same merge as the final folder of a training run
        from peft import PeftConfig

        from rlhf_engine.models import merge_lora_state_dict
        state = merge_lora_state_dict(state, PeftConfig.from_pretrained(hf_dir))
        info = {**info, "peft": False}
    model = _rebuild(hf_dir, info, state, name)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        if adapter_only:  # peft saves adapter_config.json + adapter_model.safetensors
            base_name = recipe.get("model", {}).get("name_or_path")
            model.peft_config[model.active_adapter].base_model_name_or_path = base_name
        elif info["kind"] in ("causal_lm", "seq2seq_lm") and (hf_dir / "generation_config.json").is_file():
            from transformers import GenerationConfig
            model.generation_config = GenerationConfig.from_pretrained(hf_dir)
        model.save_pretrained(tmp)
        _save_tokenizer(ckpt, recipe, tmp)
        write_model_card(tmp, run_dir=run_dir, recipe=recipe, step=meta["step"], engine=name, info=info,
                         adapter_only=adapter_only)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _save_tokenizer(ckpt: Path, recipe: dict, out: Path) -> None:
    """Copy the checkpoint's tokenizer files (chat template included); else load the recipe's tokenizer."""
    if (ckpt / "tokenizer").is_dir():
        shutil.copytree(ckpt / "tokenizer", out, dirs_exist_ok=True)
        return
    from rlhf_engine.config import ModelConfig
    from rlhf_engine.models import load_tokenizer
    load_tokenizer(ModelConfig.model_validate(recipe["model"]), recipe.get("cache_dir")).save_pretrained(out)


def _metrics_table(row: dict) -> str:
    cells = [f"| {k} | {v:.4g} |" for k, v in row.items() if k != "step" and isinstance(v, (int, float))]
    return "| metric | value |\n|---|---|\n" + "\n".join(cells[:24]) if cells else "(none logged)"


def write_model_card(out: Path, *, run_dir: Path, recipe: dict, step: int, engine: str, info: dict,
                     adapter_only: bool) -> None:
    """README.md: base model, recipe, data, final metrics (metrics.jsonl / eval.jsonl) and plots copied from the run."""
    import yaml

    from rlhf_engine.tracking import read_jsonl

    model = recipe.get("model", {}).get("name_or_path", "?")
    stage = recipe.get("stage", "?")
    algo = recipe.get("ppo", {}).get("algorithm", "ppo") if stage == "rl" else None
    seq_cls = info["kind"] == "seq_cls"
    hub_like = model.count("/") == 1 and not Path(model).expanduser().exists()  # card metadata wants a hub id
    front = {"library_name": "peft" if adapter_only else "transformers",
             "pipeline_tag": "text-classification" if seq_cls else
             "text2text-generation" if info["kind"] == "seq2seq_lm" else "text-generation",
             "tags": ["rlhf-engine", stage] + ([algo] if algo else []) + (["reward-model"] if seq_cls else [])}
    if hub_like:
        front["base_model"] = model
    plots = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if plots:
        (out / "plots").mkdir(exist_ok=True)
        for p in plots:
            shutil.copy2(p, out / "plots" / p.name)
    metrics, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    auto = ("AutoModelForSequenceClassification" if seq_cls else
            "AutoModelForSeq2SeqLM" if info["kind"] == "seq2seq_lm" else "AutoModelForCausalLM")
    load = (f"from peft import PeftModel\nfrom transformers import {auto}\n"
            f"base = {auto}.from_pretrained(\"{model}\")\n"
            f"model = PeftModel.from_pretrained(base, \"path/to/this/folder\")"
            if adapter_only else f"from transformers import {auto}, AutoTokenizer\n"
            f"model = {auto}.from_pretrained(\"path/to/this/folder\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")")
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {recipe.get('name', run_dir.name)}: {engine}",
        f"Trained with rlhf-engine (stage `{stage}`" + (f", algorithm `{algo}`" if algo else "") + f"), exported "
        f"from checkpoint step {step} of `{run_dir}`. "
        + ("A sequence-classification model with one label: its logit is the score / value." if seq_cls
           else "An encoder-decoder (seq2seq) language model." if info["kind"] == "seq2seq_lm"
           else "A causal language model."),
        f"- Base model: `{model}`\n- Data: `{recipe.get('data', {}).get('path', '?')}`\n"
        f"- Weights: {info['dtype']}, trained with ZeRO stage {info['zero_stage']}",
    ]
    if adapter_only:
        parts.append("**LoRA adapter only.** Load it on top of the base model (below), or export again with "
                     "`--merge-lora` for a plain model with the adapters merged into the weights.")
    parts.append(f"## Final metrics (step {metrics[-1]['step']})\n\n{_metrics_table(metrics[-1])}" if metrics
                 else "## Final metrics\n\nNo metrics.jsonl in the run folder.")
    if evals:
        parts.append(f"## Evaluation (step {evals[-1].get('step')})\n\n{_metrics_table(evals[-1])}")
    if plots:
        parts.append("## Training curves\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots[:4]))
    parts.append(f"## Usage\n\n```python\n{load}\n```")
    if recipe:
        parts.append("## Recipe\n\n```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```")
    (out / "README.md").write_text("\n\n".join(parts) + "\n")


# --------------------------------------------------------------------------------------------
# push
def hub_preflight(repo_id: str, token: Optional[str] = None):
    """Check repo id, token and endpoint before any export work; returns (HfApi, user name).

    Token: ``token`` > ``HF_TOKEN`` > the saved login. Endpoint: ``HF_ENDPOINT`` (read now) or huggingface.co.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as err:
        raise CheckpointError(f"--push-to-hub {repo_id}: not a valid repo id ({err}); expected 'user/name'") from None
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if constants.is_offline_mode():
        raise CheckpointError("cannot push: Hugging Face offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); "
                              "unset it, or export without --push-to-hub and upload the folder later")
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise CheckpointError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login` (`hf auth login`)")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        user = api.whoami(token=token)
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status == 401:
            raise CheckpointError(f"{endpoint} rejected the Hugging Face token (401); set a valid HF_TOKEN "
                                  "(write access) or run `huggingface-cli login`") from None
        raise CheckpointError(f"cannot reach {endpoint}: {err}") from None
    except Exception as err:  # connection refused, DNS, timeouts
        raise CheckpointError(f"cannot reach {endpoint}: {type(err).__name__}: {err}; check the network "
                              "(or HF_ENDPOINT), or export without --push-to-hub and upload later") from None
    return api, user.get("name", "?")


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
                token: Optional[str] = None) -> str:
    """Create ``repo_id`` if needed (and branch ``revision``), upload ``folder`` in one commit; returns its URL."""
    api, _ = hub_preflight(repo_id, token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=f"Upload {Path(folder).name} (rlhf-engine export)")
    except Exception as err:
        raise CheckpointError(f"upload of {folder} to {repo_id} failed: {type(err).__name__}: {err}. The export is "
                              f"complete on disk; retry with `hf upload {repo_id} {folder}`") from None
    return info.commit_url
