"""Desired state: models, pools, overrides and the pause switch, as versioned documents."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from shared.policies.scaling import make_policy
from shared.state.versioned import DocumentStore
from shared.types.pools import ModelCreate, ModelPublic, ModelUpdate, PoolCreate, PoolPublic, PoolUpdate

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
        version = await self.docs.put(f"model:{spec.name}", spec.model_dump(mode="json"), expected_version=0)
        return ModelPublic(**spec.model_dump(), version=version)

    async def update_model(self, name: str, change: ModelUpdate) -> ModelPublic:
        current = await self.model(name)
        body = {**current.model_dump(mode="json", exclude={"version"}), **change.model_dump(exclude_none=True)}
        version = await self.docs.put(f"model:{name}", body, expected_version=current.version)
        return ModelPublic(**body, version=version)

    async def delete_model(self, name: str) -> None:
        await self.model(name)
        users = [p.name for p in await self.pools() if p.model == name]
        if users:
            raise FailedPrecondition(f"model {name!r} is served by pools {users}; delete them first", param="name")
        await self.docs.delete(f"model:{name}")

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
        await self.model(body["model"])
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
