"""Router entry point: settings -> telemetry -> app -> serve HTTP until SIGTERM."""

from __future__ import annotations

import sys

from services.router.app import RouterApp
from shared.config import RouterSettings, SettingsError, load_settings
from shared.errors import ShoalError
from shared.processes import run_service
from shared.telemetry import setup_telemetry


def main() -> None:
    try:
        settings = load_settings(RouterSettings)
        setup_telemetry("router", settings)
        app = RouterApp(settings)
    except (SettingsError, ShoalError) as exc:
        sys.exit(str(exc))
    run_service(app.run())


if __name__ == "__main__":
    main()
