"""What operators look at, tested against the real thing: a local stack as `make run` starts it (P/D pools,
the decode pool an expert-parallel instance of two ranks) under a bounded load, a real Prometheus
scraping it, and the console in the system's headless Chromium. `make test-monitoring` (CI; not in
make test: it needs Debian's prometheus and chromium packages)."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from cli.localstack import Endpoints, local_stack, prometheus_config
from shared.processes import free_port
from tests.support.models import TINY_MODEL_NAME

pytestmark = [pytest.mark.monitoring, pytest.mark.slow]

# A prompt past the router's P/D threshold: prefill on one pool, KV through the store, decode on the other.
LONG_PROMPT = [16 + (i * 7) % 200 for i in range(400)]
GRAPH = {
    "name": "console-check",
    "sla": {"deadline_s": 120},
    "steps": [
        {"id": "find", "kind": "retrieval", "retriever": "docs", "query": "how are pools scaled?"},
        {"id": "budget", "kind": "tool", "tool": "calculator", "args": {"expression": "3 * 8"}},
        {"id": "draft", "kind": "llm", "model": TINY_MODEL_NAME, "prompt": "Context: {{steps.find}}", "max_tokens": 8},
        {
            "id": "answer",
            "kind": "llm",
            "model": TINY_MODEL_NAME,
            "prompt": "{{steps.draft}} and {{steps.budget}}",
            "max_tokens": 8,
        },
    ],
}


@dataclass
class Monitored:
    endpoints: Endpoints
    viewer_token: str
    graph_id: str

    def admin(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.endpoints.controller,
            headers={"authorization": f"Bearer {token or self.endpoints.admin_token}"},
            timeout=30,
        )


def _load(endpoints: Endpoints, stop: threading.Event, max_requests: int = 2000, max_s: float = 600.0) -> None:
    """Requests of every kind the dashboards show, until stopped (bounded in count and time): short chats
    streamed and not, long prompts that go through P/D, and one that is refused (4xx)."""
    started = time.monotonic()
    with httpx.Client(base_url=endpoints.router, headers=endpoints.api_headers, timeout=120) as http:
        for n in range(max_requests):
            if stop.is_set() or time.monotonic() - started > max_s:
                return
            messages = [{"role": "user", "content": f"tell me about pools, {n}"}]
            if n % 4 == 3:
                body = {"model": TINY_MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 8, "ignore_eos": True}
                http.post("/v1/completions", json=body)
            elif n % 13 == 12:
                http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": messages})
            else:
                body = {"model": TINY_MODEL_NAME, "messages": messages, "max_tokens": 8, "ignore_eos": True}
                http.post("/v1/chat/completions", json={**body, "stream": n % 2 == 0})


@pytest.fixture(scope="package")
def monitored(tiny_model: Path) -> Iterator[Monitored]:
    admin, viewer = secrets.token_hex(16), secrets.token_hex(16)
    env = {"SHOAL_ADMIN_TOKEN": admin, "SHOAL_CONTROLLER_ADMIN_TOKENS": f"{admin}:admin,{viewer}:viewer"}
    workers = [("prefill", "reference"), ("decode", "reference")]
    with local_stack(tiny_model, workers, env, pool_env={"decode": {"EP_SIZE": "2"}}) as (endpoints, _):
        stop = threading.Event()
        load = threading.Thread(target=_load, args=(endpoints, stop), daemon=True)
        load.start()
        headers = {"authorization": f"Bearer {admin}"}
        # Room for the console's scale action on prefill, and no autoscaling under the test's load: the
        # pages show the replicas the test expects.
        fixed = {"max_replicas": 2, "scaling": {"policy": "fixed", "params": {"replicas": 1}}}
        httpx.patch(f"{endpoints.controller}/v1/pools/prefill", json=fixed, headers=headers).raise_for_status()
        graph = httpx.post(f"{endpoints.controller}/v1/graphs", json=GRAPH, headers=headers, timeout=30)
        graph.raise_for_status()
        try:
            yield Monitored(endpoints, viewer, graph.json()["id"])
        finally:
            stop.set()
            load.join(timeout=150)


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, object]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, object]] = body["data"]["result"]
        return result


@pytest.fixture(scope="package")
def prometheus(monitored: Monitored, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Debian's Prometheus on a free port, scraping the stack every second with the project's alert rules."""
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(monitored.endpoints, interval_s=1)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (folder / "prometheus.log").open("w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (folder / "prometheus.log").read_text()
            time.sleep(0.5)
        yield Prometheus(url)
    finally:
        process.terminate()
        process.wait(timeout=30)
