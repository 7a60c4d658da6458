"""The Celery worker of the controller's jobs: `python -m services.controller.jobs`."""

from services.controller.jobs.celery_app import QUEUE, configure
from shared.config import ControllerSettings, load_settings
from shared.telemetry import setup_telemetry

settings = load_settings(ControllerSettings)
setup_telemetry("celery", settings)
app = configure(settings)
# Threads, not forked processes: jobs mostly wait (on drains), and gRPC does not survive fork.
app.worker_main(["worker", "--pool=threads", "--concurrency=8", f"--queues={QUEUE}", "--loglevel=INFO"])
