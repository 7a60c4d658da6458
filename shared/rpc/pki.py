"""A throwaway certificate authority and one certificate per service (`shoal pki init`).

What `make run`, docker-compose and the tests use; a cluster uses cert-manager
or certificates of its own (deploy/helm). The layout: `DIR/ca.crt` and
`DIR/ca.key` (the authority), and `DIR/<role>/` holding ca.crt, tls.crt and
tls.key, the folder a service's SHOAL_TLS_DIR names. Keys are EC P-256 and
written 0600; each certificate is good for server and client authentication
under the role's name (shared/rpc/security.py).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.rpc.security import CA_FILE, CERT_FILE, KEY_FILE, Role

CA_KEY_FILE = "ca.key"
DEFAULT_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    path.chmod(0o600)


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # A little slack for clocks that disagree between hosts.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


class Authority:
    """A CA's certificate and key: issues service certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def new(cls, days: int = DEFAULT_DAYS, common_name: str = "shoal internal CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(common_name)
        cert = (
            _builder(name, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, folder: Path) -> Authority:
        cert = x509.load_pem_x509_certificate((folder / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key((folder / CA_KEY_FILE).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(cert, key)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CA_FILE).write_bytes(self.pem)
        _write_private(folder / CA_KEY_FILE, _key_pem(self.key))

    def issue(
        self, folder: Path, names: Iterable[str], days: int = DEFAULT_DAYS, addresses: Iterable[str] = ()
    ) -> None:
        """A certificate for `names` (DNS names; the first is also the common name) and IP `addresses`, in
        `folder` (ca.crt, tls.crt, tls.key)."""
        dns = list(names)
        key = ec.generate_private_key(ec.SECP256R1())
        alternative: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        alternative += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
        cert = (
            _builder(_name(dns[0]), self.cert.subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            # Which CA signed it, by key: during a rotation both CAs share a name in the trusted bundle.
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        (folder / CA_FILE).write_bytes(self.pem)
        (folder / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(folder / KEY_FILE, _key_pem(key))


def _current(folder: Path, roles: Iterable[Role], days_left: int) -> bool:
    """Whether `folder` already holds the authority and every role's certificate, none expiring soon."""
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days_left)
    paths = [folder / CA_FILE, *(folder / role.value / CERT_FILE for role in roles)]
    if not (folder / CA_KEY_FILE).exists() or not all(path.exists() for path in paths):
        return False
    return all(x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc > soon for path in paths)


def init_pki(folder: Path, roles: Iterable[Role] = tuple(Role), days: int = DEFAULT_DAYS, force: bool = False) -> bool:
    """Make the authority and each role's folder; keeps a complete, unexpired set unless `force`.

    Returns whether it wrote anything (services already running keep the certificates they read).
    """
    wanted = tuple(roles)
    if not force and _current(folder, wanted, days_left=min(30, days // 2)):
        return False
    authority = Authority.new(days)
    authority.save(folder)
    folder.chmod(0o700)
    for role in wanted:
        authority.issue(folder / role.value, [role.identity], days)
    return True
