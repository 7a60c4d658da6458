"""Checkpoint configs the reference engine cannot serve correctly are refused at load, naming why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.worker.engines.reference.checkpoint import CheckpointError, ModelConfig

pytestmark = pytest.mark.unit


def config_with(tmp_path: Path, tiny_model: Path, **changes: Any) -> Path:
    raw = json.loads((tiny_model / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **changes}))
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"sliding_window": 64, "max_position_embeddings": 512}, "sliding-window attention (sliding_window=64"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
        ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ],
    ids=["sliding-window", "rope-scaling-legacy", "rope-parameters"],
)
def test_unsupported_attention_is_refused(
    tmp_path: Path, tiny_model: Path, changes: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(CheckpointError, match="not supported by the reference engine") as refused:
        ModelConfig.from_folder(config_with(tmp_path, tiny_model, **changes))
    assert fragment in refused.value.message


@pytest.mark.parametrize(
    "changes",
    [
        {"sliding_window": None},
        {"sliding_window": 4096, "max_position_embeddings": 4096},  # the window covers every position
        {"use_sliding_window": False, "sliding_window": 64},  # Qwen's switch, off
        {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "rope_scaling": None},
    ],
    ids=["no-window", "window-covers-context", "window-off", "default-rope"],
)
def test_configs_whose_attention_is_plain_load(tmp_path: Path, tiny_model: Path, changes: dict[str, Any]) -> None:
    assert ModelConfig.from_folder(config_with(tmp_path, tiny_model, **changes)).num_layers > 0
