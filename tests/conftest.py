"""Shared fixtures: test PKI, signing key, the TLS context of the servers in the tests, and the
mock as a process. Shared functions (the mock in the test process, the daemon ...) are in
tests/helpers.py."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fanout.testing.devcerts import TestPKI, TestSigningKey, make_pki, make_signing_key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A throwaway CA and server certificate for 127.0.0.1, for the whole session."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> TestSigningKey:
    """A throwaway ES256 provider-token key, for the whole session."""
    return make_signing_key(tmp_path_factory.mktemp("key"))


@pytest.fixture
def server_ssl(pki: TestPKI) -> ssl.SSLContext:
    """The server side of TLS with ``pki``, offering h2."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.cert_file), str(pki.key_file))
    ctx.set_alpn_protocols(["h2"])
    return ctx


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mock_process(tmp_path: Path, signing_key: TestSigningKey) -> Iterator[tuple[int, Path]]:
    """``fanout mock`` as a process: its port and the CA file it wrote."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanout"] + ["mock", "--pki-dir", str(tmp_path / "pki"), "--port", "0",
                  "--port-file", str(port_file), "--key-path", str(signing_key.path),
                  "--key-id", signing_key.key_id, "--team-id", signing_key.team_id,
                  "--unregistered-fraction", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"mock did not start: {err.decode()}")
        time.sleep(0.05)
    yield int(port_file.read_text()), tmp_path / "pki" / "ca.pem"
    proc.terminate()
    proc.wait(10)
