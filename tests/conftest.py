"""Shared fixtures: the embedded tiny model is built once per test session."""
from __future__ import annotations

import os

import pytest

# before any test imports torch (libgomp reads it once, at load): the suite ran 24 min instead of ~12 on a
# 2-core machine shared with another job under libgomp's default spin-waiting; see llava_sculpt/__init__.py
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from llava_sculpt.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir / "model")


@pytest.fixture
def one_thread():
    """Generation with the tiny model runs ~20x faster on one thread when the 2 cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
