"""Shared fixtures: test PKI, signing key, and a strict h2 server for differential tests."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fanout.testing.devcerts import make_pki, make_signing_key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory):
    return make_signing_key(tmp_path_factory.mktemp("key"))


@pytest.fixture
def server_ssl(pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.cert_file), str(pki.key_file))
    ctx.set_alpn_protocols(["h2"])
    return ctx


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mock_process(tmp_path, signing_key):
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
            pytest.fail(f"mock did not start: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    yield int(port_file.read_text()), tmp_path / "pki" / "ca.pem"
    proc.terminate()
    proc.wait(10)
