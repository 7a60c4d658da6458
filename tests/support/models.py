"""The tiny test checkpoint, built once per test session."""

from __future__ import annotations

from pathlib import Path

from services.worker.tiny_model import build_tiny_model

TINY_MODEL_NAME = "shoal-tiny-moe"


def build(path: Path) -> Path:
    return build_tiny_model(path, seed=0)
