"""The web console at /ui: three static files (console/), served with a strict content security policy.

The console is a client of the admin API and holds no authority of its own: the pages load without a
token, and every read and action they make is an API call with the token the user signs in with.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

from shared.errors import NotFound

ASSETS = Path(__file__).parent / "console"
_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
# Only the console's own files run and load; no inline script, no framing, no other origin.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def mount_console(api: FastAPI) -> None:
    files = {name: (ASSETS / name).read_bytes() for name in _TYPES}

    def asset(name: str) -> Response:
        return Response(files[name], media_type=_TYPES[name], headers=_HEADERS)

    @api.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @api.get("/ui/", include_in_schema=False)
    async def ui_index() -> Response:
        return asset("index.html")

    @api.get("/ui/{name}", include_in_schema=False)
    async def ui_asset(name: str) -> Response:
        if name not in files:
            raise NotFound(f"the console has no file {name!r}", param="name")
        return asset(name)
