#!/usr/bin/env bash
# The prepared GPU check (launch/gpu_check.py): under 8 minutes on one H100, no network.
#   here:   bash launch/gpu_wheels.sh          (once: .whl/ with deepspeed, pydantic, ..., rlhf-engine)
#   device: bash launch/gpu_check.sh [OUT]     (carry .whl; prints one JSON object, writes OUT/gpu_check.json)
# Without CUDA it says so and exits 0 having checked nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check}}
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
    # the carried wheels, and this checkout itself (setuptools is there; no index, no build isolation)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec timeout 470 python3 launch/gpu_check.py "$OUT"
