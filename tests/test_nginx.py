"""The engine against a non-Python HTTP/2 server: nginx (Debian), over real TLS.

nginx answers 200 for ordinary tokens and 410 with an APNs-style JSON body for tokens
starting with "dead"; ``keepalive_requests`` makes it send GOAWAY every 500 requests, so
connection rollover is exercised by an independent implementation too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fanout.client import Client
from fanout.testing.nginx import nginx_binary
from fanout.testing.nginx import start_nginx as _start


def start_nginx(tmp_path, pki, extra=""):
    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed; .ci/run installs it")
        pytest.skip("nginx not installed (apt-get install nginx-light)")
    return _start(tmp_path, pki.cert_file, pki.key_file, extra=extra, keepalive_requests=500)


@pytest.fixture
def nginx(tmp_path, pki):
    proc, port = start_nginx(tmp_path, pki)
    yield port
    proc.terminate()
    proc.wait(5)


def make_client_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A client CA and a client certificate + key signed by it (for mTLS)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.USER_ID, "com.example.app"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Apple Push Services: com.example.app")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = directory / "client-ca.pem", directory / "client.pem", \
        directory / "client-key.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


async def test_engine_against_nginx(nginx, pki):
    tokens = [f"{i:064x}" for i in range(4000)] + [f"dead{i:060x}" for i in range(200)]
    invalid = []
    async with Client(topic="com.example.app", host="127.0.0.1", port=nginx,
                      ca_file=str(pki.ca_file), connections=2,
                      on_invalid_token=lambda t, r, ts: invalid.append((t, r, ts))) as client:
        counts: dict[str, int] = {}
        seen = set()
        with trio.fail_after(60):
            async for r in client.fan_out({"aps": {"alert": "hello"}}, tokens):
                counts[r.outcome] = counts.get(r.outcome, 0) + 1
                assert r.token not in seen
                seen.add(r.token)
                if r.outcome == "invalid_token":
                    assert r.status == 410 and r.reason == "Unregistered"
                    assert r.timestamp == 1700000000000
        opened = client.pool.opened
    assert counts == {"delivered": 4000, "invalid_token": 200}
    assert len(invalid) == 200 and all(t.startswith("dead") for t, _, _ in invalid)
    # 4200 requests at 500 per connection: nginx's GOAWAYs forced at least 8 new connections
    assert opened >= 9


async def test_certificate_auth_verified_by_nginx(tmp_path, pki):
    """mTLS: nginx requires a client certificate signed by the client CA."""
    from fanout.auth import CertAuth
    from fanout.payload import Notification

    client_ca, cert, key = make_client_cert(tmp_path)
    proc, port = start_nginx(tmp_path, pki, extra=f"ssl_client_certificate {client_ca}; "
                                                 f"ssl_verify_client on;")
    try:
        note = Notification(token="ab" * 32, payload={"aps": {"alert": "hi"}})
        async with Client(auth=CertAuth(str(cert), str(key)), topic="com.example.app",
                          host="127.0.0.1", port=port, ca_file=str(pki.ca_file),
                          connections=1) as client:
            with trio.fail_after(10):
                ok = await client.send(note)
        async with Client(topic="com.example.app", host="127.0.0.1", port=port,
                          ca_file=str(pki.ca_file), connections=1) as client:
            with trio.fail_after(10):
                refused = await client.send(note)
    finally:
        proc.terminate()
        proc.wait(5)
    assert ok.outcome == "delivered"
    assert refused.outcome == "rejected" and refused.status == 400
