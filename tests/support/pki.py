"""A small site PKI for TLS links: a site CA, a server certificate, per-device client certificates.

Used by the tests and by ``make run`` style demos to set up ``tls://``,
``https://`` and ``mqtts://`` on loopback without any outside tool. Real sites
bring their own CA; these helpers only write standard PEM files.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.record import record

__all__ = ["Pki", "make_pki"]


@record(frozen=True)
class Pki:
    """Paths of the PEM files (keys are mode 0600)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client(self, name: str) -> tuple[Path, Path]:
        """A further client certificate with common name ``name`` (e.g. a device ID)."""
        d = self.ca_cert.parent
        cert, key = d / f"client-{name}.pem", d / f"client-{name}.key"
        if not cert.exists():
            ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
            ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
            assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
            _issue(ca, ca_key, name, cert, key, server=False)
        return cert, key


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _issue(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, cert_path: Path,
           key_path: Path, server: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
    )
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)


def make_pki(directory: Path, site: str = "site") -> Pki:
    """Create (or reuse) a CA, a loopback server certificate and one client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory / "ca.pem", directory / "ca.key", directory / "server.pem",
              directory / "server.key", directory / "client.pem", directory / "client.key")
    if pki.client_key.exists():
        return pki
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{site} licensing CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.ca_key, ca_key)
    _issue(ca, ca_key, "localhost", pki.server_cert, pki.server_key, server=True)
    _issue(ca, ca_key, "admin", pki.client_cert, pki.client_key, server=False)
    return pki
