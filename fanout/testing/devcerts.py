"""Throw-away credentials for tests, the mock APNs server and ``fanout demo``.

Nothing here is fit for production: :func:`make_pki` mints a fresh CA and a ``localhost``
server certificate, :func:`make_signing_key` a fresh ES256 key shaped like an APNs ``.p8``.
Secret files are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "TestPKI",
    "TestSigningKey",
    "client_ssl_context",
    "ensure_pki",
    "make_pki",
    "make_signing_key",
    "server_ssl_context",
]

_CA_FILE = "ca.pem"
_CERT_FILE = "server.pem"
_KEY_FILE = "server-key.pem"


@dataclass(frozen=True)
class TestPKI:
    """A CA certificate plus a server certificate/key for ``localhost`` and ``127.0.0.1``."""

    __test__ = False  # not a pytest test class

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class TestSigningKey:
    """An APNs-style token signing key: ``.p8`` file, key id, team id and public half."""

    __test__ = False  # not a pytest test class

    path: Path
    key_id: str
    team_id: str
    public_key: EllipticCurvePublicKey


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Write ``data`` to ``path``; secrets are created 0600 (never briefly world-readable)."""
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # O_CREAT ignores mode for an existing file


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fanout test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_pki(directory: Path | str, *, days: int = 365) -> TestPKI:
    """Create a fresh CA and a server certificate signed by it in ``directory``.

    The server certificate covers DNS ``localhost`` and IPs ``127.0.0.1`` and ``::1``.
    The CA private key is not kept: nothing else can ever be signed by this CA.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(days=1), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fanout test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pki = TestPKI(directory / _CA_FILE, directory / _CERT_FILE, directory / _KEY_FILE)
    _write(pki.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(pki.cert_file, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(
        pki.key_file,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        secret=True,
    )
    return pki


def ensure_pki(directory: Path | str) -> TestPKI:
    """Reuse the PKI files in ``directory`` if all exist, else create them with :func:`make_pki`."""
    directory = Path(directory)
    pki = TestPKI(directory / _CA_FILE, directory / _CERT_FILE, directory / _KEY_FILE)
    if all(p.is_file() for p in (pki.ca_file, pki.cert_file, pki.key_file)):
        return pki
    return make_pki(directory)


def make_signing_key(
    directory: Path | str, key_id: str = "ABC123DEFG", team_id: str = "TEAM123456"
) -> TestSigningKey:
    """Write a fresh P-256 key as ``AuthKey_<key_id>.p8`` (PKCS#8 PEM, mode 0600)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / f"AuthKey_{key_id}.p8"
    _write(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        secret=True,
    )
    return TestSigningKey(path=path, key_id=key_id, team_id=team_id, public_key=key.public_key())


def client_ssl_context(ca_file: Path | str) -> ssl.SSLContext:
    """A client context trusting only ``ca_file``; ALPN ``h2``, TLS 1.2 or newer."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx


def server_ssl_context(pki: TestPKI, *, alpn: bool = True) -> ssl.SSLContext:
    """The mock server's context; ``alpn=False`` offers no ALPN at all (clients must refuse)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki.cert_file), str(pki.key_file))
    if alpn:
        ctx.set_alpn_protocols(["h2"])
    return ctx
