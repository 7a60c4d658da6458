"""The `shoal` admin commands against a real controller (real HTTP, real Redis)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from shared.config import EngineKind
from shared.types.pools import ModelCreate, PoolCreate
from tests.support.services import ADMIN, VIEWER, RunningController, running_controller, running_worker

pytestmark = pytest.mark.integration


async def shoal(front: RunningController, *args: str, token: str = ADMIN) -> Result:
    env = {"SHOAL_CONTROLLER_URL": front.url, "SHOAL_ADMIN_TOKEN": token, "COLUMNS": "200"}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def test_the_cli_shows_and_changes_the_cluster(redis_url: str, tiny_model: Path) -> None:
    async with running_controller(redis_url) as front:
        assert (await shoal(front, "pools")).exit_code == 0
        front_app = front.app
        await front_app.desired.create_model(ModelCreate(name="tiny", path=str(tiny_model)))
        await front_app.desired.create_pool(
            PoolCreate(name="decode", model="tiny", role="decode", engine="sim", min_replicas=0, max_replicas=0)
        )
        async with running_worker(redis_url, engine=EngineKind.SIM, model_path=tiny_model, worker_id="w-1") as worker:
            listed = await shoal(front, "workers")
            assert listed.exit_code == 0 and "w-1" in listed.output and "serving" in listed.output

            pinned = await shoal(front, "scale", "decode", "0")
            assert pinned.exit_code == 0, pinned.output
            assert (await front_app.desired.pool("decode")).replicas_override == 0
            assert (await shoal(front, "scale", "decode", "auto")).exit_code == 0
            assert (await front_app.desired.pool("decode")).replicas_override is None
            assert (await shoal(front, "scale", "decode", "many")).exit_code == 2

            assert (await shoal(front, "drain", "w-1")).exit_code == 0
            assert worker.engine.draining

            status = await shoal(front, "status")
            assert status.exit_code == 0 and "decode" in status.output

            jobs = await shoal(front, "jobs")
            assert jobs.exit_code == 0

        refused = await shoal(front, "scale", "decode", "1", token=VIEWER)
        assert refused.exit_code == 1 and "operator" in refused.output
        missing = await shoal(front, "drain", "nobody")
        assert missing.exit_code == 1 and "nobody" in missing.output


async def test_keys_are_made_listed_and_revoked_and_the_writes_audited(redis_url: str) -> None:
    async with running_controller(redis_url) as front:
        made = await shoal(front, "key", "create", "batch-jobs", "--rps", "5", "--tpm", "100000")
        assert made.exit_code == 0, made.output
        key_id, secret = made.output.split()[0], made.output.split()[2]
        assert secret.startswith("sk-shoal-")
        listed = await shoal(front, "key", "list")
        assert listed.exit_code == 0 and key_id in listed.output and "batch-jobs" in listed.output
        assert secret not in listed.output  # only its first characters
        assert (await shoal(front, "key", "revoke", key_id)).exit_code == 0
        assert (await front.app.api_keys.get(key_id)).revoked_at is not None
        audit = await shoal(front, "audit")
        assert audit.exit_code == 0
        assert f"/v1/keys/{key_id}" in audit.output and "DELETE" in audit.output and "admin#" in audit.output
        assert (await shoal(front, "audit", token=VIEWER)).exit_code == 1
