"""kvstore entry point: settings -> telemetry -> app -> serve until SIGTERM."""

from __future__ import annotations

import sys

from services.kvstore.app import KVStoreApp
from shared.config import KVStoreSettings, SettingsError, load_settings
from shared.processes import run_service
from shared.telemetry import setup_telemetry


def main() -> None:
    try:
        settings = load_settings(KVStoreSettings)
    except SettingsError as exc:
        sys.exit(str(exc))
    setup_telemetry("kvstore", settings)
    run_service(KVStoreApp(settings).run())


if __name__ == "__main__":
    main()
