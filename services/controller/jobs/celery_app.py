"""The Celery application: Redis as broker and result backend.

Tasks are acknowledged only when done (a worker that dies mid-task leaves it
for another) and are idempotent (they resume from the phase their job
records). The controller also resubmits jobs whose heartbeat stopped, which
recovers faster than the broker's visibility timeout. The app is configured
from settings by whoever uses it (`configure`), not at import.
"""

from __future__ import annotations

from celery import Celery

from shared.config import ControllerSettings

QUEUE = "shoal"

celery_app = Celery("shoal", include=["services.controller.jobs.tasks"])


def configure(settings: ControllerSettings) -> Celery:
    celery_app.conf.update(
        broker_url=settings.celery_url,
        result_backend=settings.celery_url,
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options={"visibility_timeout": 3600},
    )
    return celery_app
