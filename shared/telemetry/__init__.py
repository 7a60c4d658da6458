"""Telemetry shared by all services: structured logs, traces, Prometheus metrics."""

from __future__ import annotations

from shared.config.base import CommonSettings, Environment, LogFormat
from shared.telemetry.logging import get_logger, setup_logging
from shared.telemetry.tracing import setup_tracing


def setup_telemetry(service: str, settings: CommonSettings) -> None:
    """Configure logging and tracing for a service process from its settings."""
    setup_logging(service, settings.log_level, settings.log_format is LogFormat.JSON)
    setup_tracing(service, settings.otlp_endpoint)
    log = get_logger("shoal.telemetry")
    log.info("telemetry ready", otlp=settings.otlp_endpoint or "off")
    if settings.env is Environment.DEV:
        log.warning("development mode (SHOAL_ENV=dev): the OpenAI API admits callers without a valid key")
    if not settings.redis_has_password:
        log.warning("Redis is used without a password: anyone who reaches it can rewrite the cluster's state")


__all__ = ["get_logger", "setup_logging", "setup_telemetry", "setup_tracing"]
