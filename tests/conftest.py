"""Shared fixtures: test PKI, signing key, and a strict h2 server for differential tests."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from fanout.devcerts import make_pki, make_signing_key


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


def pytest_collection_modifyitems(items):
    # keep every test bounded: trio tests run in real time
    for item in items:
        if item.get_closest_marker("timeout") is None and hasattr(item, "obj"):
            pass


ROOT = Path(__file__).resolve().parent.parent
