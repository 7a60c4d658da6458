"""The router's HTTP API: the OpenAI API over the dispatcher (shared/openai), health and metrics."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import Response

from shared.httpapi import install_error_handlers
from shared.httpserver import HttpServer
from shared.openai.api import json_response, openai_server
from shared.telemetry.metrics import render

if TYPE_CHECKING:
    from services.router.app import RouterApp


def _router(request: Request) -> RouterApp:
    app: RouterApp = request.app.state.router
    return app


def build_server(router: RouterApp) -> HttpServer:
    api = FastAPI(
        title="Shoal router",
        description="OpenAI-compatible API in front of a Shoal cluster.",
        version="1.0.0",
        telemetry={"metrics": False, "logs": False, "operation_spans": False},
    )
    api.state.router = router
    install_error_handlers(api)

    @api.get("/health")
    async def health(request: Request) -> Response:
        app = _router(request)
        workers = len(app.directory.serving())
        return json_response(
            {"status": "ok", "workers": workers, "inflight": app.dispatcher.requests, "pid": os.getpid()}
        )

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = render(_router(request).metrics.registry)
        return Response(body, media_type=content_type)

    return openai_server(router, api)
