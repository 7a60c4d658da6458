"""Schemathesis over a running service's OpenAPI: no input may produce a server error."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path


async def assert_no_server_errors(
    base_url: str, max_examples: int, seed: int, *extra: str, timeout_s: float = 280, config: Path | None = None
) -> str:
    """Run schemathesis (`max_examples` per operation; `config`: a schemathesis.toml); returns its report."""
    argv = [sys.executable, "-m", "schemathesis.cli", *(["--config-file", str(config)] if config else [])]
    argv += ["run", f"{base_url}/openapi.json"]
    argv += ["--checks", "not_a_server_error", "--max-examples", str(max_examples), "--seed", str(seed)]
    argv += ["--suppress-health-check", "all", *extra]
    result = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result.stdout
