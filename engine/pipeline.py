"""Pipelines: one YAML that chains stage recipes (SFT -> reward model -> RL), resumable stage by stage.

    # header ...
    pipeline:
      name: e2e-smollm2
      stages:
        - recipe: sft.yaml                 # paths relative to this file
        - recipe: rm.yaml
        - recipe: ppo.yaml
          set: [train.steps=8]             # per-stage overrides

A stage feeds the next through its output folder: a later stage names the earlier run's `final/`
folder (e.g. `set: ["model.name_or_path={output_dir}/e2e-sft/final"]`; `{output_dir}` is the
runs folder, so `--set output_dir=...` moves the whole pipeline). Each stage runs as its own
process (a clean DeepSpeed world per stage); a finished stage leaves `PIPELINE_STAGE_DONE` in its
run folder and is skipped when the pipeline is run again, and a stage (SFT, reward model or RL) that
was cut off resumes from its newest checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml
from pydantic import Field, ValidationError

from rlhf_engine.config import Recipe, RecipeError, Section, _format_errors, _key_lines, load_recipe
from rlhf_engine.tracking import run_dir_for

DONE = "PIPELINE_STAGE_DONE"


class PipelineStage(Section):
    recipe: str = Field(..., description="Stage recipe, relative to the pipeline file.")
    set: list[str] = Field(default_factory=list, description="Overrides for this stage (KEY=VALUE).")


class PipelineSpec(Section):
    name: str = Field(..., description="Pipeline name (for messages).")
    stages: list[PipelineStage] = Field(..., min_length=1, description="Stages, run in order.")


class PipelineFile(Section):
    pipeline: PipelineSpec = Field(..., description="The pipeline.")


def is_pipeline(path) -> bool:
    """True when the YAML file's top level is a `pipeline:` mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # load_recipe reports it, naming file and line
        return False
    return isinstance(data, dict) and "pipeline" in data


def load_pipeline(path, overrides: Optional[list[str]] = None) -> tuple[PipelineSpec, list[tuple[Path, list, Recipe]]]:
    """Validate the pipeline and every stage recipe; returns (spec, [(recipe path, overrides, recipe)])."""
    path = Path(path)
    text = path.read_text()
    try:
        spec = PipelineFile.model_validate(yaml.safe_load(text)).pipeline
    except ValidationError as e:
        raise RecipeError(_format_errors(e, str(path), _key_lines(text), set())) from None
    stages = []
    for i, stage in enumerate(spec.stages):
        stage_path = (path.parent / stage.recipe).resolve()
        if not stage_path.is_file():
            raise RecipeError(f"{path}: pipeline.stages[{i}].recipe '{stage.recipe}' not found ({stage_path})")
        # `{output_dir}` in a stage override names where the runs go, so a stage can point at an
        # earlier stage's output folder wherever the runs are written
        output_dir = load_recipe(stage_path, overrides).output_dir
        sets = [*(s.replace("{output_dir}", output_dir) for s in stage.set), *(overrides or [])]
        stages.append((stage_path, sets, load_recipe(stage_path, sets)))
    return spec, stages


def run_pipeline(path, overrides: Optional[list[str]] = None, nproc: int = 1) -> int:
    """Run the stages in order, each as `rlhf-engine train`; skip stages already done."""
    spec, stages = load_pipeline(path, overrides)
    for i, (stage_path, sets, recipe) in enumerate(stages, 1):
        run_dir = run_dir_for(recipe)
        tag = f"[pipeline {spec.name}] stage {i}/{len(stages)} ({recipe.stage}: {recipe.name})"
        if (run_dir / DONE).exists():
            print(f"{tag}: done before, skipped ({run_dir})", flush=True)
            continue
        resume = (run_dir / "checkpoints").is_dir()  # a stage cut off mid-way continues from its checkpoint
        print(f"{tag}: starting" + (" (resuming)" if resume else ""), flush=True)
        cmd = [sys.executable, "-m", "rlhf_engine.cli", "train", str(stage_path), "--nproc", str(nproc),
               *[f"--set={s}" for s in sets], *(["--resume=auto"] if resume else [])]
        # PYTHONSAFEPATH: `-m` would put the current folder first on sys.path, and a checkout's top-level
        # kernels/ folder would then shadow Hugging Face's `kernels` package
        code = subprocess.call(cmd, env={**os.environ, "PYTHONSAFEPATH": "1"})
        if code != 0:
            print(f"{tag}: failed (exit code {code}); fix it and run the pipeline again: finished stages "
                  "are skipped", file=sys.stderr, flush=True)
            return code
        (run_dir / DONE).write_text("ok\n")
    print(f"[pipeline {spec.name}] all {len(stages)} stages done", flush=True)
    return 0
