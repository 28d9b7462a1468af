"""A throw-away CA and certificates for the TLS tests (made with ``cryptography``)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CA:
    """A CA whose certificate sits alone in ``trust_dir`` (a ``trustRoots=`` directory)."""

    def __init__(self, directory: Path, name: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.trust_dir = directory / f"{name}-trust"
        self.trust_dir.mkdir(parents=True)
        (self.trust_dir / "ca.pem").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.directory = directory
        #: The CA certificate alone, as a ``clientCA=`` file.
        self.pem = self.trust_dir / "ca.pem"

    def issue(self, common: str, dns: list[str], ips: list[str]) -> tuple[Path, Path]:
        """A leaf certificate for these names; returns ``(certificate.pem, key.pem)``."""
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.directory / f"{common}.pem"
        key_path = self.directory / f"{common}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return cert_path, key_path


def ssl_listen(cert: Path, key: Path) -> str:
    """A ``--listen`` server endpoint with TLS on a kernel-chosen loopback port."""
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


def mtls_listen(cert: Path, key: Path, client_ca: Path, mode: str = "required") -> str:
    """A ``--listen`` endpoint with TLS that verifies client certificates against ``client_ca``."""
    return (
        f"mtls:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:clientCA={client_ca}"
        f":clientCert={mode}"
    )


def tls_target(
    host: str,
    port: int,
    trust: Path,
    via: str | None = None,
    client: tuple[Path, Path] | None = None,
) -> str:
    """A ``tls:`` client endpoint; ``via`` connects to that address and verifies ``host``;
    ``client`` is our ``(certificate, key)``."""
    target = f"tls:host={host}:port={port}:trustRoots={trust}"
    if client is not None:
        target += f":certificate={client[0]}:privateKey={client[1]}"
    if via is not None:
        target += ":endpoint=tcp\\:" + via.replace(":", "\\:")
    return target


#: The board secret the security tests share (our daemons read it from a file).
SECRET = "lab-secret-0123456789abcdef"
