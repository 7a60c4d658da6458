"""Controller entry point: settings -> telemetry -> app -> serve the admin API until SIGTERM."""

from __future__ import annotations

import sys

from services.controller.app import ControllerApp
from shared.config import ControllerSettings, SettingsError, load_settings
from shared.errors import ShoalError
from shared.processes import run_service
from shared.telemetry import setup_telemetry


def main() -> None:
    try:
        settings = load_settings(ControllerSettings)
        setup_telemetry("controller", settings)
        app = ControllerApp(settings)
    except (SettingsError, ShoalError) as exc:
        sys.exit(str(exc))
    run_service(app.run())


if __name__ == "__main__":
    main()
