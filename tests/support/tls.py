"""A throwaway certificate authority and a server certificate for 127.0.0.1, made with the openssl CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerCert:
    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str, folder: Path) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


def local_ca(folder: Path) -> ServerCert:
    """A CA, and a certificate it signed for 127.0.0.1 and localhost (files in `folder`, keys 0600)."""
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=shoal test CA", folder=folder)  # fmt: skip
    _openssl("req", *new_key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", folder=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "1", "-extfile", "san.ext", folder=folder)  # fmt: skip
    for key in ("ca.key", "server.key"):
        (folder / key).chmod(0o600)
    return ServerCert(folder / "ca.pem", folder / "server.pem", folder / "server.key")
