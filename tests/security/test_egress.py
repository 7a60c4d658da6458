"""Agent graphs' HTTP tools post only where the operator allowed: server-side request forgery refused."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from services.controller.agents.egress import EgressPolicy, pinned
from services.controller.agents.runner import GraphRunner
from services.controller.api.routes import check_rendezvous
from shared.errors import InvalidArgument, PermissionDenied
from tests.support.services import ADMIN, OPERATOR, running_controller, serving

INTERNAL = [
    "http://169.254.169.254/latest/meta-data/",  # the cloud's metadata service (link-local)
    "http://127.0.0.1:6379/",  # loopback: Redis, the admin API
    "http://[::1]:8080/v1/pools",
    "http://[::ffff:127.0.0.1]/",  # loopback written as IPv4-mapped IPv6
    "http://10.0.3.7:50051/",  # a pod
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # shared address space
    "http://0.0.0.0:8000/",
]


@pytest.mark.unit
@pytest.mark.parametrize("url", INTERNAL)
def test_internal_addresses_are_refused_even_when_names_are_listed(url: str) -> None:
    with pytest.raises(InvalidArgument, match="internal address"):
        EgressPolicy(["api.example.com", "*.example.org"]).check(url)


@pytest.mark.unit
def test_only_listed_hosts_pass() -> None:
    policy = EgressPolicy(["api.example.com", "*.example.org", "10.20.0.0/16", "203.0.113.7"])
    assert policy.check("https://api.example.com/tool") == "api.example.com"
    assert policy.check("http://search.example.org:8080/q") == "search.example.org"
    assert policy.check("http://10.20.4.5/") == "10.20.4.5"  # internal, but covered by an address entry
    assert policy.check("http://203.0.113.7/") == "203.0.113.7"
    for refused in (
        "https://evil.example.net/",
        "http://example.org/",
        "http://api.example.com.evil.net/",
        "http://203.0.113.8/",
        "ftp://api.example.com/",
        "http:///nohost",
    ):
        with pytest.raises(InvalidArgument):
            policy.check(refused)
    with pytest.raises(InvalidArgument, match="SHOAL_CONTROLLER_TOOL_HOSTS"):
        EgressPolicy([]).check("https://api.example.com/")  # nothing listed: no HTTP tool runs


def _dns(answers: dict[str, str]) -> Any:
    """Stands in for DNS, which a test cannot control here: each name resolves to the address given."""

    async def resolve(host: str, port: int) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    return resolve


@pytest.mark.unit
async def test_a_wildcard_name_that_resolves_inside_is_refused_at_call_time() -> None:
    policy = EgressPolicy(
        ["*.example.org", "trusted.internal.corp", "10.9.0.0/16"],
        _dns(
            {
                "search.example.org": "93.184.216.34",
                "rebound.example.org": "169.254.169.254",
                "inside.example.org": "10.9.1.1",
                "trusted.internal.corp": "10.50.0.2",
            }
        ),
    )
    assert str(await policy.vet("http://search.example.org/")) == "93.184.216.34"  # where the call will go
    assert str(await policy.vet("http://inside.example.org/")) == "10.9.1.1"  # covered by an address entry
    await policy.vet("http://trusted.internal.corp/")  # listed exactly: trusted with whatever it resolves to
    with pytest.raises(PermissionDenied, match=r"169\.254\.169\.254"):
        await policy.vet("http://rebound.example.org/")


def _graph(url: str) -> dict[str, Any]:
    return {"steps": [{"id": "fetch", "kind": "tool", "url": url, "args": {"q": "x"}}], "sla": {"deadline_s": 60}}


@pytest.mark.integration
async def test_a_graph_posting_to_a_metadata_or_loopback_address_gets_400(redis_url: str) -> None:
    async with (
        running_controller(redis_url, tool_hosts=["tools.example.com"]) as controller,
        httpx.AsyncClient(base_url=controller.url, headers={"authorization": f"Bearer {OPERATOR}"}) as http,
    ):
        for url in (INTERNAL[0], INTERNAL[1], "https://elsewhere.example.net/"):
            response = await http.post("/v1/graphs", json=_graph(url))
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "steps[0].url" and error["type"] == "invalid_request_error"
        assert (await http.get("/v1/graphs", headers={"authorization": f"Bearer {ADMIN}"})).json() == []


@pytest.mark.unit
def test_a_resize_rendezvous_must_be_on_the_instances_host_or_listed() -> None:
    check_rendezvous("10.1.2.3:29500", "10.1.2.3:50051", [])  # the instance's own pod
    check_rendezvous("ranks.example.com:29500", "10.1.2.3:50051", ["ranks.example.com"])
    for elsewhere in ("10.1.2.4:29500", "169.254.169.254:80", "evil.example.com:29500"):
        with pytest.raises(InvalidArgument, match="SHOAL_CONTROLLER_RENDEZVOUS_HOSTS"):
            check_rendezvous(elsewhere, "10.1.2.3:50051", ["ranks.example.com"])


@pytest.mark.integration
async def test_the_call_goes_to_the_address_that_was_checked() -> None:
    """The tool's name resolves (stand-in DNS) to a server here; the post reaches that address with the name in
    its Host header, so a second lookup returning something else could not redirect it."""
    seen: dict[str, Any] = {}
    tool = FastAPI()

    @tool.post("/search")
    async def search(request: Request) -> PlainTextResponse:
        seen["host"] = request.headers["host"]
        seen["body"] = await request.json()
        return PlainTextResponse("found")

    server = uvicorn.Server(uvicorn.Config(tool, host="127.0.0.1", port=0, log_level="warning"))
    async with serving(server) as base:
        port = int(base.rsplit(":", 1)[1])
        policy = EgressPolicy(["*.example.test", "127.0.0.1/32"], _dns({"tool.example.test": "127.0.0.1"}))
        url = f"http://tool.example.test:{port}/search"
        address = await policy.vet(url)
        assert await GraphRunner._http_tool(url, address, {"q": "shoal"}, timeout_s=10) == "found"
    assert seen == {"host": f"tool.example.test:{port}", "body": {"q": "shoal"}}


@pytest.mark.unit
def test_a_pinned_https_call_keeps_the_name_for_tls() -> None:
    target, headers, extensions = pinned(
        "https://user:pw@api.example.com:8443/v1?q=1", ipaddress.ip_address("2001:db8::7")
    )
    assert target == "https://[2001:db8::7]:8443/v1?q=1"
    assert headers == {"host": "api.example.com:8443"}
    assert extensions == {"sni_hostname": "api.example.com"}
