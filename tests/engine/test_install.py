"""The installed environment: PyPI's `kernels` (Hugging Face hub kernels) shares our package's import name."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _import_engine(extra_path: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (extra_path, str(REPO)) if p)}
    return subprocess.run([sys.executable, "-c", "import engine, kernels; print(kernels.__file__)"],
                          env=env, capture_output=True, text=True, cwd=REPO)


def test_our_kernels_package_is_the_one_imported():
    out = _import_engine()
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == REPO / "kernels"


def test_hub_kernels_distribution_is_refused_with_what_to_do(tmp_path):
    """A `kernels` distribution next to ours: a clear error at `import engine`, not deep in transformers."""
    info = tmp_path / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    out = _import_engine(str(tmp_path))
    assert out.returncode != 0
    assert "PyPI package 'kernels' 0.19.1" in out.stderr
    assert "transformers<5.25" in out.stderr and "pip uninstall -y kernels" in out.stderr
