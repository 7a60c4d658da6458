"""Both HTTP APIs fuzzed deeply: up to 500 generated requests per operation, and no server error.

`make test-fuzz` (CI runs it after `make test`); `make test` runs a short
version of each (the schemathesis tests beside the APIs' own tests). Here
the admin API has something to act on: a registered worker, a job, a graph
and an API key, whose ids schemathesis puts in the paths that name one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import EngineKind
from tests.integration.controller.test_admin_api import MODEL as CONTROLLER_MODEL
from tests.integration.controller.test_admin_api import POOL, call
from tests.integration.router.test_router_api import SIM, stack
from tests.support.fuzz import assert_no_server_errors
from tests.support.models import TINY_MODEL_NAME
from tests.support.services import ADMIN, running_controller, running_worker

pytestmark = pytest.mark.fuzz

EXAMPLES = 500
SEED = 7
# How often a generated request names a thing that exists (the rest name random ones).
KNOWN = 0.8


def _config(folder: Path, known: dict[str, list[str]]) -> Path:
    """A schemathesis.toml feeding each parameter its known values, KNOWN of the time."""
    dictionaries = "".join(
        f"[dictionaries.d{i}]\nvalues = [{', '.join(repr(v) for v in values)}]\n"
        for i, values in enumerate(known.values())
    )
    bindings = "".join(f'"{key}" = {{ dictionary = "d{i}", probability = {KNOWN} }}\n' for i, key in enumerate(known))
    path = folder / "schemathesis.toml"
    path.write_text(f"{dictionaries}[parameters]\n{bindings}")
    return path


async def test_the_admin_api_gives_no_server_error(redis_url: str, tiny_model: Path, tmp_path: Path) -> None:
    async with (
        running_controller(redis_url, local_max_workers=0) as front,  # fuzzed pools start no process
        running_worker(redis_url, model_path=tiny_model, worker_id="w-fuzz", engine=EngineKind.SIM),
    ):
        assert (await call(front, "POST", "/v1/models", json=CONTROLLER_MODEL)).status_code == 201
        assert (await call(front, "POST", "/v1/pools", json=POOL)).status_code == 201
        job, _ = await front.app.jobs.create("scale-down", {"pool": "decode", "worker_id": "w-gone"})
        graph = {"sla": {"deadline_s": 60}, "steps": [{"id": "a", "kind": "tool", "tool": "word-count"}]}
        submitted = await call(front, "POST", "/v1/graphs", json=graph)
        assert submitted.status_code == 202, submitted.text
        key = await call(front, "POST", "/v1/keys", json={"name": "fuzzed", "requests_per_s": 5})
        assert key.status_code == 201, key.text
        known = {
            "path.key_id": [key.json()["id"]],
            "path.worker_id": ["w-fuzz"],
            "path.job_id": [job.id],
            "path.graph_id": [submitted.json()["id"]],
            "path.name": ["decode", "tiny"],
        }
        config = _config(tmp_path, known)
        report = await assert_no_server_errors(
            front.url, EXAMPLES, SEED, "--header", f"Authorization: Bearer {ADMIN}", timeout_s=2400, config=config
        )
    print(report[-2500:])


async def test_the_openai_api_gives_no_server_error(redis_url: str, tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, {"body.model": [TINY_MODEL_NAME]})
    async with stack(redis_url, tiny_model, [SIM]) as (front, _apps):
        report = await assert_no_server_errors(
            front.url, EXAMPLES, SEED, "--request-timeout", "60", timeout_s=2400, config=config
        )
    print(report[-2500:])
