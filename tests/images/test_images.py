"""The image builds, and the docker-compose dev stack comes up and serves (`make test-images`).

A real build and a real compose run, with Docker where a Docker engine
answers and with podman otherwise (deploy/container-host.sh sets it up). With
podman the base and Redis images are built from Debian's packages
(tests/support/containers.py), since this machine cannot pull from a
registry. The stack runs on shifted host ports, without the OpenTelemetry
collector (its image comes from a registry), under its own project name, and
is torn down whole (containers, network, volumes) whatever happens.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator

import httpx
import orjson
import pytest

from shared.processes import free_port
from shared.state import acl
from tests.support.containers import BASE_TAG, REDIS_TAG, ComposeStack, Engine, build_image, compose_stack, local_images

pytestmark = pytest.mark.images

TAG = "shoal:dev"  # what docker-compose.yml runs
ADMIN_TOKEN = secrets.token_hex(16)
API_KEY = f"sk-{secrets.token_hex(16)}"
AUTH = {"authorization": f"Bearer {API_KEY}"}
HEALTH_CHECKED = ["redis", "kvstore", "worker-prefill", "worker-decode", "worker-b", "controller", "router"]
SERVICES = [*HEALTH_CHECKED, "celery", "pki"]
DEV_TOOLS = ["pytest", "mypy", "ruff", "schemathesis", "hypothesis", "grpc_tools"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine.detect()
    if engine.name == "podman":
        local_images(engine)
    return engine


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    build_image(engine, TAG, BASE_TAG if engine.name == "podman" else None)
    return TAG


def in_image(engine: Engine, image: str, *command: str) -> tuple[int, str]:
    done = engine("run", "--rm", "--entrypoint", command[0], image, *command[1:], capture=True, check=False)
    return done.returncode, done.stdout + done.stderr


def test_the_cli_and_the_health_probe_run_in_the_image(engine: Engine, image: str) -> None:
    code, out = in_image(engine, image, "shoal", "--help")
    assert code == 0, out
    assert "probe" in out and "tiny-model" in out
    # Nothing listens there: the probe answers "unhealthy" (1), it does not crash on an import.
    code, out = in_image(engine, image, "shoal", "probe", "127.0.0.1:1", "--service", "shoal.v1.Worker")
    assert (code, "Traceback" in out) == (1, False), out


def test_the_image_runs_as_its_user_without_development_tools(engine: Engine, image: str) -> None:
    probe = "import importlib.util as u, os; print(os.getuid(), [m for m in {} if u.find_spec(m)])"
    code, out = in_image(engine, image, "python", "-c", probe.format(DEV_TOOLS))
    assert code == 0, out
    assert out.split(None, 1) == ["10001", "[]\n"]
    imports = "import redis.asyncio, services.kvstore.main, simulator.cluster"
    code, out = in_image(engine, image, "python", "-c", imports)
    assert code == 0, out


@pytest.fixture(scope="module")
def stack(engine: Engine, image: str) -> Iterator[tuple[ComposeStack, str, str]]:
    router_port, controller_port, otlp_port = free_port(), free_port(), free_port()
    env = {
        "SHOAL_ROUTER_PORT": str(router_port),
        "SHOAL_CONTROLLER_PORT": str(controller_port),
        "SHOAL_OTLP_PORT": str(otlp_port),
        "SHOAL_OTLP_ENDPOINT": "",
        "SHOAL_ADMIN_TOKEN": ADMIN_TOKEN,
        "SHOAL_API_KEY": API_KEY,
        "SHOAL_REDIS_PASSWORD": secrets.token_hex(16),
        "SHOAL_INTERNAL_TOKEN": secrets.token_hex(16),
        **{acl.password_variable(user): secrets.token_hex(16) for user in acl.USER_NAMES},
    }
    if engine.name == "podman":
        env["SHOAL_REDIS_IMAGE"] = REDIS_TAG
    project = f"shoal-images-{uuid.uuid4().hex[:6]}"
    with compose_stack(engine, project, SERVICES, env) as running:
        running.wait_healthy(HEALTH_CHECKED, timeout_s=float(os.environ.get("SHOAL_IMAGES_HEALTH_S", "420")))
        yield running, f"http://127.0.0.1:{router_port}", f"http://127.0.0.1:{controller_port}"


def test_a_streamed_chat_completion_comes_back_through_the_router(stack: tuple[ComposeStack, str, str]) -> None:
    _, router, _ = stack
    body = {
        "model": "shoal-tiny-moe",
        "messages": [{"role": "user", "content": "hello from compose"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with httpx.stream("POST", f"{router}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    finishes = [choice["finish_reason"] for c in chunks for choice in c["choices"] if choice["finish_reason"]]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_both_models_are_served_behind_the_one_endpoint(stack: tuple[ComposeStack, str, str]) -> None:
    _, router, _ = stack
    assert httpx.get(f"{router}/v1/models", timeout=30).status_code == 401  # no key: refused
    listed = httpx.get(f"{router}/v1/models", headers=AUTH, timeout=30).json()["data"]
    assert sorted(m["id"] for m in listed) == ["shoal-tiny-moe", "shoal-tiny-moe-b"]
    body = {"model": "shoal-tiny-moe-b", "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{router}/v1/completions", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "shoal-tiny-moe-b" and response.json()["usage"]["completion_tokens"] == 4


def test_a_scale_command_goes_through_the_admin_api(stack: tuple[ComposeStack, str, str]) -> None:
    _, _, controller = stack
    admin = httpx.Client(base_url=controller, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    # The compose workers registered themselves in pools `prefill` and `decode`: declare the decode pool and pin it
    # at the one worker compose runs, so the controller owns a pool it observes and starts nothing.
    model = admin.post("/v1/models", json={"name": "shoal-tiny-moe", "path": "/models/shoal-tiny-moe"})
    assert model.status_code in (201, 409), model.text
    pool = {"name": "decode", "model": "shoal-tiny-moe", "role": "decode", "min_replicas": 1, "max_replicas": 2}
    created = admin.post("/v1/pools", json=pool)
    assert created.status_code == 201, created.text
    scaled = admin.post("/v1/pools/decode/scale", json={"replicas": 1})
    assert scaled.status_code == 200, scaled.text
    assert scaled.json()["replicas_override"] == 1
    unauthorized = httpx.post(f"{controller}/v1/pools/decode/scale", json={"replicas": 2}, timeout=30)
    assert unauthorized.status_code == 401
    workers = admin.get("/v1/workers", params={"pool": "decode"}).json()
    assert [w["worker_id"] for w in workers] == ["worker-decode"]
