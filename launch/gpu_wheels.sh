#!/usr/bin/env bash
# Prepare .whl/ for launch/gpu_check.sh: the packages the GPU machine lacks (it has python3.12, torch,
# transformers, peft, triton and no network), as wheels. Run here, where pip reaches PyPI; the device
# tool carries .whl (`carry: [".whl"]`). DeepSpeed is published as a source tarball only, so its
# wheel is built here (pure Python, ops compiled on first use there); the rest are downloaded for
# CPython 3.12 on manylinux x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(ver deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" "annotated-types==$(ver annotated-types)" \
    "typing-inspection==$(ver typing-inspection)" "hjson==$(ver hjson)"

du -sh .whl && ls .whl
