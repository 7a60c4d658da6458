"""`make run`'s stack as processes with SHOAL_ENV=prod: the OpenAI API refuses callers without a key and
serves the key the stack made; Redis refuses a client without the password."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError

from cli.localstack import local_stack
from tests.support.models import TINY_MODEL_NAME

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_the_stack_in_prod_mode_refuses_callers_without_a_key(tiny_model: Path) -> None:
    with local_stack(tiny_model, [("mixed", "sim")], {"SHOAL_ENV": "prod"}) as (endpoints, _):
        assert not endpoints.dev_mode
        body = {"model": TINY_MODEL_NAME, "prompt": "hello", "max_tokens": 3}
        async with httpx.AsyncClient(base_url=endpoints.router, timeout=60) as http:
            assert (await http.get("/v1/models")).status_code == 401
            assert (await http.post("/v1/completions", json=body)).status_code == 401
            answered = await http.post("/v1/completions", json=body, headers=endpoints.api_headers)
            assert answered.status_code == 200, answered.text
        parts = urlsplit(endpoints.redis_url)
        anonymous = Redis.from_url(urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}")))
        with pytest.raises((AuthenticationError, ResponseError)):
            await anonymous.ping()
        await anonymous.aclose()
