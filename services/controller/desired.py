"""Desired state: models, their aliases, pools, overrides and the pause switch, as versioned documents."""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from shared.policies.scaling import make_policy
from shared.state.versioned import DocumentStore
from shared.types.pools import (
    AliasPublic,
    AliasSpec,
    ModelCreate,
    ModelPublic,
    ModelState,
    ModelUpdate,
    PoolCreate,
    PoolPublic,
    PoolUpdate,
)

PAUSED = "scaling:paused"


class DesiredState:
    def __init__(self, redis: Redis) -> None:
        self.docs = DocumentStore(redis)

    # -- models -----------------------------------------------------------------

    async def models(self) -> list[ModelPublic]:
        out = []
        for name in await self.docs.names("model:"):
            doc = await self.docs.get(name)
            if doc is not None:
                out.append(ModelPublic(**doc.body, version=doc.version))
        return out

    async def model(self, name: str) -> ModelPublic:
        doc = await self.docs.get(f"model:{name}")
        if doc is None:
            raise NotFound(f"no model named {name!r}", param="name")
        return ModelPublic(**doc.body, version=doc.version)

    async def create_model(self, spec: ModelCreate) -> ModelPublic:
        if await self.docs.get(f"model:{spec.name}") is not None:
            raise AlreadyExists(f"model {spec.name!r} exists", param="name")
        if await self.docs.get(f"alias:{spec.name}") is not None:
            raise AlreadyExists(f"{spec.name!r} is an alias; a model cannot take its name", param="name")
        model = ModelPublic(**spec.model_dump())
        version = await self.docs.put(f"model:{spec.name}", _body(model), expected_version=0)
        return model.model_copy(update={"version": version})

    async def update_model(self, name: str, change: ModelUpdate) -> ModelPublic:
        current = await self.model(name)
        if current.state is ModelState.DELETING:
            raise FailedPrecondition(f"model {name!r} is being deleted", param="name")
        model = current.model_copy(update=change.model_dump(exclude_none=True))
        version = await self.docs.put(f"model:{name}", _body(model), expected_version=current.version)
        return model.model_copy(update={"version": version})

    async def delete_model(self, name: str) -> ModelPublic | None:
        """Delete a model: at once when no pool serves it (None); else mark it DELETING and return it.

        A DELETING model is no longer admitted by the routers; the reconcile loop then drains its pools
        (requests in flight finish), deletes them, and deletes the model last.
        """
        current = await self.model(name)
        pointing = sorted(a.name for a in await self.aliases() if a.model == name)
        if pointing:
            raise FailedPrecondition(
                f"aliases {pointing} point at model {name!r}; move or delete them first", param="name"
            )
        if not [p for p in await self.pools() if p.model == name]:
            await self.docs.delete(f"model:{name}")
            return None
        if current.state is ModelState.DELETING:
            return current
        model = current.model_copy(update={"state": ModelState.DELETING, "deleting_since": time.time()})
        version = await self.docs.put(f"model:{name}", _body(model), expected_version=current.version)
        return model.model_copy(update={"version": version})

    async def forget_model(self, name: str) -> None:
        """Drop a DELETING model's document once its last pool is gone."""
        await self.docs.delete(f"model:{name}")

    # -- aliases ----------------------------------------------------------------

    async def aliases(self) -> list[AliasPublic]:
        documents = await self.docs.snapshot(("alias:",))
        return [
            AliasPublic(name=name.removeprefix("alias:"), model=doc.body["model"], version=doc.version)
            for name, doc in sorted(documents.items())
        ]

    async def alias(self, name: str) -> AliasPublic:
        doc = await self.docs.get(f"alias:{name}")
        if doc is None:
            raise NotFound(f"no alias named {name!r}", param="name")
        return AliasPublic(name=name, model=doc.body["model"], version=doc.version)

    async def set_alias(self, name: str, spec: AliasSpec) -> AliasPublic:
        """Point alias `name` at a serving model (creating the alias, or switching it)."""
        if await self.docs.get(f"model:{name}") is not None:
            raise AlreadyExists(f"{name!r} is a model; an alias cannot take its name", param="name")
        target = await self.model(spec.model)
        if target.state is ModelState.DELETING:
            raise FailedPrecondition(f"model {spec.model!r} is being deleted", param="model")
        version = await self.docs.put(f"alias:{name}", {"model": spec.model})
        return AliasPublic(name=name, model=spec.model, version=version)

    async def delete_alias(self, name: str) -> None:
        await self.alias(name)
        await self.docs.delete(f"alias:{name}")

    # -- pools ------------------------------------------------------------------

    async def pools(self) -> list[PoolPublic]:
        out = []
        for name in await self.docs.names("pool:"):
            doc = await self.docs.get(name)
            if doc is not None:
                out.append(PoolPublic(**doc.body, version=doc.version))
        return out

    async def pool(self, name: str) -> PoolPublic:
        doc = await self.docs.get(f"pool:{name}")
        if doc is None:
            raise NotFound(f"no pool named {name!r}", param="name")
        return PoolPublic(**doc.body, version=doc.version)

    async def _check(self, body: dict[str, Any]) -> None:
        model = await self.model(body["model"])
        if model.state is ModelState.DELETING:
            raise FailedPrecondition(f"model {model.name!r} is being deleted", param="model")
        scaling = body.get("scaling") or {}
        try:
            make_policy(scaling.get("policy", "predictive"), scaling.get("params", {}))
        except ValueError as exc:
            raise FailedPrecondition(str(exc), param="scaling") from None

    async def create_pool(self, spec: PoolCreate) -> PoolPublic:
        body = spec.model_dump(mode="json")
        if await self.docs.get(f"pool:{spec.name}") is not None:
            raise AlreadyExists(f"pool {spec.name!r} exists", param="name")
        await self._check(body)
        version = await self.docs.put(f"pool:{spec.name}", {**body, "replicas_override": None}, expected_version=0)
        return PoolPublic(**body, version=version)

    async def update_pool(self, name: str, change: PoolUpdate) -> PoolPublic:
        current = await self.pool(name)
        body = {
            **current.model_dump(mode="json", exclude={"version"}),
            **change.model_dump(mode="json", exclude_none=True),
        }
        try:
            merged = PoolPublic(**body)  # the update and the pool must still agree (bounds)
        except ValidationError as exc:
            raise InvalidArgument(exc.errors()[0]["msg"].removeprefix("Value error, "), param="body") from None
        await self._check(body)
        version = await self.docs.put(
            f"pool:{name}", merged.model_dump(mode="json", exclude={"version"}), expected_version=current.version
        )
        return merged.model_copy(update={"version": version})

    async def set_override(self, name: str, replicas: int | None) -> PoolPublic:
        current = await self.pool(name)
        if replicas is not None and not current.min_replicas <= replicas <= current.max_replicas:
            raise FailedPrecondition(
                f"replicas {replicas} outside the pool's bounds [{current.min_replicas}, {current.max_replicas}]",
                param="replicas",
            )
        body = {**current.model_dump(mode="json", exclude={"version"}), "replicas_override": replicas}
        version = await self.docs.put(f"pool:{name}", body, expected_version=current.version)
        return PoolPublic(**body, version=version)

    async def delete_pool(self, name: str) -> None:
        await self.pool(name)
        await self.docs.delete(f"pool:{name}")

    # -- pause ------------------------------------------------------------------

    async def paused(self) -> bool:
        doc = await self.docs.get(PAUSED)
        return bool(doc and doc.body)

    async def set_paused(self, paused: bool) -> None:
        await self.docs.put(PAUSED, paused)


def _body(model: ModelPublic) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude={"version"})
