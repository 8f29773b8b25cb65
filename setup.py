"""Packaging for llava-sculpt.

torch is declared as a range that the CPU wheel torch==2.13.0 satisfies; we never force a newer torch
(a newer one would pull a multi-GB CUDA build).  Install torch first, then this package (see README).
"""
from setuptools import find_packages, setup

setup(
    name="llava-sculpt",
    version="0.1.0",
    description="Fine-tune LLaVA-1.5 without forgetting: LoRASculpt (CVPR 2025), baselines and evaluation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llava_sculpt", "llava_sculpt.*"]),
    package_data={"llava_sculpt": ["data/knowledge_questions.jsonl"]},  # the knowledge benchmark's list
    install_requires=[
        "torch>=2.1,<3",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "attrs>=21",  # PEFT's CorDA (--init_lora_weights corda) imports `attr` without declaring it
        "accelerate>=1.0",
        "safetensors>=0.4",
        "pillow>=9",
        "tqdm>=4.60",
        "tokenizers>=0.20",
        "matplotlib>=3.6",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "quant": ["bitsandbytes>=0.45"],
        # datasets: `llava-sculpt prepare --hf-dataset` (benchmarks as Hugging Face parquet datasets)
        "eval": ["pycocoevalcap>=1.2", "pycocotools>=2.0", "datasets>=2.16"],
        # original LLaVA checkpoints ship a SentencePiece tokenizer.model; reading it needs these
        "convert": ["sentencepiece>=0.2", "protobuf>=4"],
        # `llava-sculpt compose --language-model X.gguf` and `make demo-real` (SmolLM2's GGUF weights)
        "real": ["gguf>=0.10"],
        # pytest-xdist: `make test` runs the suite in one worker per core (Makefile, target test)
        "dev": ["pytest>=7", "pytest-timeout", "pytest-xdist>=3"],
        # --report_to wandb / tensorboard
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["llava-sculpt=llava_sculpt.cli:main"]},
)
