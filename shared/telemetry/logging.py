"""Structured logging: one line per event, with fields and the trace id.

`get_logger(name).info("worker registered", worker_id=w)` writes
`... INFO worker shoal.registry worker registered worker_id=w trace_id=...`
in text mode, or one JSON object per line in json mode. Thread-safe (it is the
standard logging module underneath).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace

_FIELDS = "shoal_fields"


class _Formatter(logging.Formatter):
    def __init__(self, service: str, as_json: bool) -> None:
        super().__init__()
        self.service = service
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, _FIELDS, {}))
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            fields["trace_id"] = format(ctx.trace_id, "032x")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        message = record.getMessage()
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            doc = {
                "ts": stamp,
                "level": record.levelname,
                "service": self.service,
                "logger": record.name,
                "msg": message,
                **fields,
            }
            return json.dumps(doc, default=str)
        extra = " ".join(f"{key}={value}" for key, value in fields.items())
        return f"{stamp} {record.levelname:<7} {self.service} {record.name}: {message} {extra}".rstrip()


class StructuredLogger:
    """A logger whose calls take keyword fields: `log.info("msg", key=value)`."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, msg: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, msg, exc_info=exc_info, extra={_FIELDS: fields}, stacklevel=3)

    def debug(self, msg: str, **fields: Any) -> None:
        self._log(logging.DEBUG, msg, False, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._log(logging.INFO, msg, False, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._log(logging.WARNING, msg, False, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, False, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, True, fields)


def get_logger(name: str) -> StructuredLogger:
    return StructuredLogger(logging.getLogger(name))


def setup_logging(service: str, level: str = "INFO", as_json: bool = False) -> None:
    """Route all logging to stderr in Shoal's format. Idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(service, as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that log every request at INFO drown the services' own lines.
    for noisy in ("uvicorn.access", "httpx", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
