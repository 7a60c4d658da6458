"""The test session's certificate authority and service certificates (shared/rpc/pki.py), made once.

Tests run with mutual TLS, the default: services started in-process or as
processes get their role's folder, and a test calling a service directly
presents the certificate of a service allowed to call it.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

from shared.rpc.pki import init_pki
from shared.rpc.security import Role, RpcSecurity, TLSFiles

# Processes a test spawns (multiprocessing, benchmarks' clients) inherit it: one authority for the run.
_INHERITED = "PYTEST_SHOAL_PKI"  # not SHOAL_*: tests clear those


@functools.cache
def pki_folder() -> Path:
    if _INHERITED in os.environ:
        return Path(os.environ[_INHERITED])
    folder = Path(tempfile.mkdtemp(prefix="shoal-test-pki-"))
    atexit.register(shutil.rmtree, folder, True)
    init_pki(folder, days=2)
    os.environ[_INHERITED] = str(folder)
    return folder


def tls_dir(role: Role) -> Path:
    return pki_folder() / role.value


def security(role: Role, token: str | None = None) -> RpcSecurity:
    """Credentials of `role` from the session's authority."""
    return RpcSecurity.for_role(role, TLSFiles.load(tls_dir(role)), token)


def as_controller(token: str | None = None) -> RpcSecurity:
    """What a test calling a worker presents."""
    return security(Role.CONTROLLER, token)


def as_worker(token: str | None = None) -> RpcSecurity:
    """What a test calling a kvstore presents."""
    return security(Role.WORKER, token)
