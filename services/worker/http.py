"""Direct access to one worker over the OpenAI API, without the router.

With SHOAL_WORKER_HTTP_PORT set, a worker serves `/v1/chat/completions`,
`/v1/completions` and `/v1/models` itself (the same endpoints and validation
as the router, shared/openai), running each request on its own engine. It is
how a single engine server is used elsewhere, and what `make bench-router`
measures the router against: the same load generator and requests, with and
without the router in the path. There is no routing, retry or P/D here.
Callers present the internal token as their key (none is needed only when
no internal token is set, which is refused outside development mode).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator

from fastapi import FastAPI

from services.worker.engines.base import Engine
from services.worker.server import WorkerServicer, logprobs_to_wire
from shared.errors import NotFound
from shared.httpapi import install_error_handlers
from shared.httpserver import HttpServer
from shared.openai.access import StaticKeys
from shared.openai.api import openai_server
from shared.openai.completions import EdgeMetrics
from shared.openai.jobs import Chunk, Hints, Job
from shared.openai.models import ServedModel
from shared.rpc.shoal.v1 import common_pb2, worker_pb2


class EngineBackend:
    """The OpenAI endpoints' backend for one worker: requests go straight to its engine."""

    def __init__(
        self, servicer: WorkerServicer, model: ServedModel, edge_metrics: EdgeMetrics, keys: list[str]
    ) -> None:
        self.servicer = servicer
        self._access = StaticKeys(keys)
        self.engine: Engine = servicer.engine
        self._model = model
        self._edge_metrics = edge_metrics
        self._ids = (f"direct-{n:x}" for n in itertools.count())

    def model(self, name: str) -> ServedModel:
        if name != self._model.name:
            raise NotFound(f"The model `{name}` does not exist.", param="model")
        return self._model

    def models(self) -> list[ServedModel]:
        return [self._model]

    @property
    def access(self) -> StaticKeys:
        return self._access

    @property
    def edge_metrics(self) -> EdgeMetrics:
        return self._edge_metrics

    def job(self, model: ServedModel, prompt: list[int], sampling: common_pb2.SamplingParams, hints: Hints) -> Job:
        return Job(request_id=next(self._ids), model=model.name, prompt=prompt, sampling=sampling)

    async def stream(self, job: Job) -> AsyncGenerator[Chunk, None]:
        request = self.servicer.engine_request(
            worker_pb2.GenerateRequest(
                request_id=job.request_id, model=job.model, prompt_token_ids=job.prompt, sampling=job.sampling
            )
        )
        await self.servicer.compiled(request)
        async for output in self.engine.generate(request):
            logprobs = logprobs_to_wire(output.logprobs)
            if output.finish is None:
                yield Chunk(output.text, len(output.token_ids), logprobs=logprobs)
                continue
            yield Chunk(
                output.text,
                len(output.token_ids),
                output.finish.value,
                output.prompt_tokens,
                output.completion_tokens,
                output.cached_tokens,
                logprobs,
            )
            return


def direct_server(backend: EngineBackend) -> HttpServer:
    api = FastAPI(
        title="Shoal worker (direct)",
        description="One worker's engine over the OpenAI API, without the router.",
        version="1.0.0",
        telemetry={"metrics": False, "logs": False, "operation_spans": False},
    )
    install_error_handlers(api)
    return openai_server(backend, api)
