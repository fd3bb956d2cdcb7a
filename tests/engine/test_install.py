"""The installed environment: one import package, rlhf_engine, beside Hugging Face's `kernels` and transformers."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, importlib.util
import kernels, transformers
import rlhf_engine, rlhf_engine.kernels, rlhf_engine.cli
print(json.dumps({"hf_kernels": kernels.__file__, "ours": rlhf_engine.kernels.__file__,
                  "engine": importlib.util.find_spec("engine") is not None,
                  "transformers": transformers.__version__}))
"""


def test_hugging_face_kernels_transformers_and_rlhf_engine_in_one_process(tmp_path):
    """HF's `kernels` (required by transformers >= 5.25) imports as itself; ours is rlhf_engine.kernels."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(info["ours"]).parent == REPO / "kernels"
    assert Path(info["hf_kernels"]).parent != REPO / "kernels" and "site-packages" in info["hf_kernels"]
    assert not info["engine"], "a top-level `engine` import name must not be installed"


def test_a_checkout_on_sys_path_hands_kernels_to_hugging_face():
    """`python -c` from the checkout puts its root (and kernels/ folder) first: the name still reaches HF's
    package, and transformers' model code (which imports it) loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    code = ("import kernels, rlhf_engine.kernels as ours; from transformers import AutoModelForCausalLM; "
            "print(kernels.__file__); print(ours.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    hf, ours = out.stdout.strip().splitlines()[-2:]
    assert "site-packages" in hf and Path(ours).parent == REPO / "kernels"
