"""The router's model catalog against a real Redis: what it serves as the admin API's documents change."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.controller.desired import DesiredState
from services.router.models import ModelCatalog
from shared.errors import NotFound
from shared.state import schema
from shared.state.versioned import DocumentStore
from shared.types.pools import AliasSpec, ModelCreate, PoolCreate

pytestmark = pytest.mark.integration


async def _served(catalog: ModelCatalog) -> dict[str, str]:
    await catalog.refresh()
    return {m.name: m.listing()["root"] for m in catalog.models()}


async def test_models_with_a_pool_are_served_and_follow_every_change(redis: Redis, tiny_model: Path) -> None:
    desired = DesiredState(redis)
    catalog = ModelCatalog(DocumentStore(redis))
    await redis.set(schema.CLUSTER, "1")  # as the controller's first tick does
    await desired.create_model(ModelCreate(name="a", path=str(tiny_model), context_length=1024))
    assert await _served(catalog) == {}  # no pool serves it yet
    await desired.create_pool(PoolCreate(name="a", model="a"))
    assert await _served(catalog) == {"a": "a"}
    assert catalog.model("a").max_context == 1024 and catalog.model("a").prompts.vocab_size > 0

    await desired.set_alias("stable", AliasSpec(model="a"))
    assert await _served(catalog) == {"a": "a", "stable": "a"}
    assert catalog.model("stable") is catalog.model("a")  # requests for the alias run on the model

    # A model whose folder this router cannot read is not served; the others are.
    await desired.create_model(ModelCreate(name="broken", path=str(tiny_model / "missing")))
    await desired.create_pool(PoolCreate(name="broken", model="broken"))
    assert await _served(catalog) == {"a": "a", "stable": "a"}
    with pytest.raises(NotFound):
        catalog.model("broken")

    await desired.delete_alias("stable")
    assert (await desired.delete_model("a")) is not None  # a pool serves it: deleting, not gone
    assert await _served(catalog) == {}
    with pytest.raises(NotFound):
        catalog.model("a")


async def test_a_wiped_redis_keeps_the_models_served_until_the_documents_come_back(
    redis: Redis, tiny_model: Path
) -> None:
    desired = DesiredState(redis)
    catalog = ModelCatalog(DocumentStore(redis))
    await desired.create_model(ModelCreate(name="a", path=str(tiny_model)))
    await desired.create_pool(PoolCreate(name="a", model="a"))
    await redis.set(schema.CLUSTER, "1")
    assert await _served(catalog) == {"a": "a"}
    documents = await DocumentStore(redis).snapshot()
    await redis.flushdb()
    assert await _served(catalog) == {"a": "a"}  # nothing to read and the mark is gone: Redis lost its data
    model_only = {name: doc for name, doc in documents.items() if name.startswith("model:")}
    await DocumentStore(redis).restore(model_only)
    assert await _served(catalog) == {"a": "a"}  # half written back (no pool yet), still unmarked: kept
    await DocumentStore(redis).restore(documents)
    await redis.set(schema.CLUSTER, "1")
    await desired.delete_pool("a")
    assert await _served(catalog) == {}  # back in step with the documents
