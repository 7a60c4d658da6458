"""Fixtures every tier shares: a real redis-server and a clean database per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from shared.state.redis import connect
from tests.support import models
from tests.support.redis import redis_server


@pytest.fixture(autouse=True)
def _no_shoal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the SHOAL_* variables they set themselves."""
    for name in list(os.environ):
        if name.startswith("SHOAL_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
async def redis_url(redis_server_url: str) -> str:
    """The session's redis-server, emptied before each test."""
    client = connect(redis_server_url)
    await client.flushall()
    await client.aclose()
    return redis_server_url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mixtral checkpoint with tokenizer (built once, fixed seed)."""
    return models.build(tmp_path_factory.mktemp("models") / models.TINY_MODEL_NAME)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny checkpoint, unlike the first: 4 experts, another vocabulary and tokenizer."""
    return models.build_b(tmp_path_factory.mktemp("models") / models.TINY_MODEL_B_NAME)
