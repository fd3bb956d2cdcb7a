"""A quiet, useful console: one line per model loaded, library chatter off unless --verbose.

`quiet_libraries()` (called by `rlhf_engine.worker.run` at the start of a run, not on import) turns
off the progress bars of transformers, datasets and huggingface_hub and lowers their loggers to
errors, so transformers' per-model "LOAD REPORT" table for a freshly initialised value or score head
(expected: that head is what the critic and reward model train) does not read like a problem.
What it said is kept instead: `from_pretrained` (models.py) records the keys it had to initialise,
and `report_model` prints them in the model's one line:

    [model] smollm2-135m-instruct (LlamaForSequenceClassification, trained): 134.5M params, fp32,
            ZeRO-0, 2.1 s; new (initialised): score
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field


def quiet_libraries() -> None:
    """Progress bars off and third-party loggers at ERROR (transformers, datasets, hub, DeepSpeed)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


@dataclass
class LoadReport:
    """What loading a model took, kept on the model (`model.load_report`) until its line is printed."""
    name: str
    started: float = field(default_factory=time.perf_counter)
    new_keys: list[str] = field(default_factory=list)
    printed: bool = False


def new_modules(missing_keys) -> list[str]:
    """Module names of freshly initialised parameters: 'score.weight' -> 'score'."""
    return sorted({k.rsplit(".", 1)[0] if "." in k else k for k in missing_keys or []})


def _params(module) -> int:
    return sum(getattr(p, "ds_numel", 0) or p.numel() for p in module.parameters())


def _dtype(module, autocast: bool) -> str:
    p = next(iter(module.parameters()), None)
    name = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(p.dtype) if p is not None else "", "?")
    return f"{name} + bf16 autocast" if autocast else name


def report_model(model, *, zero_stage: int, trained: bool, autocast: bool = False) -> None:
    """Print the one line of a loaded model (main rank, once per model): name, class, parameters,
    dtype, ZeRO stage, seconds since its load began, and any freshly initialised modules."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine's module
    report = getattr(inner, "load_report", None)
    if report is None or report.printed or os.environ.get("RANK", "0") != "0":
        return
    report.printed = True
    cls = type(getattr(inner, "hf_model", inner)).__name__
    n = _params(inner)
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    line = (f"[model] {report.name} ({cls}, {'trained' if trained else 'frozen'}): {size} params, "
            f"{_dtype(inner, autocast)}, ZeRO-{zero_stage}, {time.perf_counter() - report.started:.1f} s")
    if report.new_keys:
        line += "; new (initialised): " + ", ".join(report.new_keys)
    print(line, flush=True)
