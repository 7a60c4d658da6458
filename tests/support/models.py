"""The tiny test checkpoints, built once per test session."""

from __future__ import annotations

from pathlib import Path

from services.worker.tiny_model import VARIANTS, build_tiny_model

TINY_MODEL_NAME = "shoal-tiny-moe"
# The second model make run serves: 4 experts, another vocabulary.
TINY_MODEL_B_NAME = "shoal-tiny-moe-b"


def build(path: Path) -> Path:
    return build_tiny_model(path, seed=0)


def build_b(path: Path) -> Path:
    return build_tiny_model(path, seed=0, variant=VARIANTS["b"])
