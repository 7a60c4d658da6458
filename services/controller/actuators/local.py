"""The local actuator: worker processes on this machine.

The actuator itself only writes the pool's launch document in Redis (target,
workers to remove, how to start one), so it works the same from the
controller and from a Celery task. The LocalLauncher, inside the controller
process, owns the processes and makes them match the documents.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from services.controller.actuators.base import Instance, InstanceState, PoolInstances
from shared.state.versioned import DocumentStore
from shared.types.pools import ModelPublic, PoolPublic


def launch_doc(pool: str) -> str:
    return f"launch:{pool}"


def status_doc(pool: str) -> str:
    return f"launch-status:{pool}"


class LocalActuator:
    name = "local"

    def __init__(self, redis: Redis) -> None:
        self.docs = DocumentStore(redis)

    async def scale_to(self, pool: PoolPublic, model: ModelPublic, replicas: int) -> None:
        def change(body: Any) -> dict[str, Any]:
            doc = dict(body or {"remove": []})
            doc["target"] = replicas
            doc["spec"] = _spec(pool, model)
            return doc

        await self.docs.update(launch_doc(pool.name), change)

    async def remove(self, pool: PoolPublic, worker_id: str) -> None:
        def change(body: Any) -> dict[str, Any]:
            doc = dict(body or {"target": 0, "remove": []})
            if worker_id not in doc["remove"]:
                doc["remove"] = [*doc["remove"], worker_id]
                doc["target"] = max(0, int(doc.get("target", 0)) - 1)
            return doc

        await self.docs.update(launch_doc(pool.name), change)

    async def instances(self, pool: str) -> PoolInstances:
        launch = await self.docs.get(launch_doc(pool))
        status = await self.docs.get(status_doc(pool))
        target = int(launch.body["target"]) if launch else 0
        items = status.body["instances"] if status else []
        return PoolInstances(
            target, [Instance(i["worker_id"], InstanceState(i["state"]), float(i["started_at"])) for i in items]
        )

    async def delete_pool(self, pool: str) -> None:
        await self.docs.update(launch_doc(pool), lambda body: {**(body or {"remove": []}), "target": 0})


def _spec(pool: PoolPublic, model: ModelPublic) -> dict[str, Any]:
    env = {
        "SHOAL_WORKER_POOL": pool.name,
        "SHOAL_WORKER_ROLE": pool.role.value,
        "SHOAL_WORKER_ENGINE": pool.engine.value,
        "SHOAL_WORKER_MODEL_NAME": model.name,
        "SHOAL_WORKER_BLOCK_SIZE": str(model.block_size),
        "SHOAL_WORKER_GPU_TYPE": pool.gpu_type,
    }
    if model.path:
        env["SHOAL_WORKER_MODEL_PATH"] = model.path
    env.update({f"SHOAL_WORKER_{key}": value for key, value in pool.worker_env.items()})
    return {"env": env}
