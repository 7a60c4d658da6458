"""The models a router serves, followed from the admin API's desired state.

Every CATALOG_INTERVAL_S the router reads a counter the document store bumps
on every write of a model, pool or alias document and, when it moved (or
FULL_READ_S passed), the documents themselves (one scan and one pipelined
read). It serves each model that has a pool and is not being deleted, under
its name, and each alias of such a model under the alias's name. A request
names a model or an alias; an alias resolves to its model when the request
is admitted, so switching an alias moves new requests only, and responses
name the model that answered (as OpenAI's do for its aliases).

A model's tokenizer and chat template are loaded off the event loop when it
first appears or its document changes, from the checkpoint folder the admin
API holds: the router needs that folder too (make run: the same machine; the
chart: the models volume on the router). A model whose folder cannot be read
is not served (tried again at each full read), and the router says why, once
per document version. Models configured on the router itself
(SHOAL_ROUTER_MODELS) are served besides, for a router without a controller
(docker-compose, whose workers are static). Requests read the catalog in
memory; a Redis outage keeps the last view, and so does a Redis that lost its
data (no documents, and the controller's `cluster` mark gone) until the
controller has written the documents back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from shared.errors import NotFound
from shared.openai.models import ServedModel, load_model
from shared.state import schema
from shared.state.redis import read_marked
from shared.state.versioned import DocumentStore, Versioned
from shared.telemetry.logging import get_logger
from shared.types.pools import ModelState

log = get_logger("shoal.router.models")

CATALOG_INTERVAL_S = 1.0
# The documents are read again when their change counter moves, and at least this often regardless.
FULL_READ_S = 30.0
MODEL, POOL, ALIAS = schema.CATALOG_DOCS


class ModelCatalog:
    def __init__(self, docs: DocumentStore, configured: list[ServedModel] | None = None) -> None:
        self.docs = docs
        self.configured = configured or []
        # Name or alias -> the model it resolves to, and what /v1/models lists.
        self._resolve: dict[str, ServedModel] = {model.name: model for model in self.configured}
        self._listing: list[ServedModel] = list(self.configured)
        # Models loaded from the admin API's documents, with the document version they were loaded from.
        self._loaded: dict[str, tuple[int, ServedModel]] = {}
        self._unloadable: dict[str, int] = {}
        self._changes: bytes | None = None
        self._read_at = float("-inf")

    def model(self, name: str) -> ServedModel:
        model = self._resolve.get(name)
        if model is None:
            raise NotFound(f"The model `{name}` does not exist.", param="model")
        return model

    def models(self) -> list[ServedModel]:
        return self._listing

    async def refresh(self) -> None:
        try:
            changes = await self.docs.redis.get(schema.CATALOG_CHANGES)
            if changes is not None and changes == self._changes and time.monotonic() < self._read_at + FULL_READ_S:
                return
            documents, whole = await read_marked(self.docs.redis, lambda: self.docs.snapshot(schema.CATALOG_DOCS))
        except (RedisError, OSError) as exc:
            log.warning("admin state unreachable; keeping the models served", error=str(exc))
            return
        pooled = {doc.body.get("model") for name, doc in documents.items() if name.startswith(POOL)}
        wanted = {
            model_name: doc
            for name, doc in documents.items()
            if name.startswith(MODEL)
            and (model_name := name.removeprefix(MODEL)) in pooled
            and doc.body.get("state") != ModelState.DELETING
        }
        if not whole and not self._loaded.keys() <= wanted.keys():
            # Without the mark a model that went missing may be a restore not yet finished, not a deletion.
            log.warning("admin state lost from Redis; keeping the models served until it is restored")
            return
        loaded = {}
        for name, doc in wanted.items():
            model = await self._load(name, doc)
            if model is not None:
                loaded[name] = (doc.version, model)
        self._loaded = loaded
        models = {name: model for name, (_, model) in loaded.items()}
        for model in self.configured:
            models.setdefault(model.name, model)
        aliases = {
            name.removeprefix(ALIAS): dataclasses.replace(models[target], name=name.removeprefix(ALIAS), root=target)
            for name, doc in documents.items()
            if name.startswith(ALIAS) and (target := str(doc.body.get("model"))) in models
        }
        self._resolve = {**models, **{alias: models[entry.root] for alias, entry in aliases.items()}}
        self._listing = sorted([*models.values(), *aliases.values()], key=lambda m: m.name)
        self._changes, self._read_at = changes, time.monotonic()

    async def _load(self, name: str, doc: Versioned) -> ServedModel | None:
        """The model of this document version: the one loaded before, or loaded now (None: unreadable)."""
        previous = self._loaded.get(name)
        if previous is not None and previous[0] == doc.version:
            return previous[1]
        body: dict[str, Any] = doc.body
        try:
            path, block_size = Path(body.get("path", "")), int(body.get("block_size", 16))
            return await asyncio.to_thread(load_model, name, path, block_size, body.get("context_length"))
        except Exception as exc:  # a missing folder, a broken tokenizer: that model is not served, the rest are
            if self._unloadable.get(name) != doc.version:
                self._unloadable[name] = doc.version
                log.error("model not served: its checkpoint cannot be read here", model=name, error=str(exc))
            return None
