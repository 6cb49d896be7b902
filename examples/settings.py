"""The client settings every example reads from the environment.

=================  ==========================================  ===========================
variable           meaning                                     default
=================  ==========================================  ===========================
FANOUT_HOST        APNs host (``fanout mock``: 127.0.0.1)        Apple's production host
FANOUT_PORT        its port                                    443
FANOUT_CA_FILE     a CA to trust (``fanout mock``: PKI/ca.pem)  the system's
FANOUT_KEY_PATH    the .p8 provider-token key                  (required)
FANOUT_KEY_ID      its key id                                  (required)
FANOUT_TEAM_ID     your team id                                (required)
FANOUT_TOPIC       the app's bundle id                         (required)
FANOUT_CONNECTIONS HTTP/2 connections per process               2
=================  ==========================================  ===========================
"""

from __future__ import annotations

import os
from typing import Any

from fanout import TokenAuth


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"set {name} (see examples/settings.py)")
    return value


def client_options() -> dict[str, Any]:
    """Keyword arguments for ``fanout.asyncio.Client``/``fanout.sync.Client``. Loading the
    key again (per request, per task) is cheap and mints no new JWT: every ``TokenAuth``
    of one key shares the process's token."""
    options: dict[str, Any] = {
        "auth": TokenAuth.from_file(_required("FANOUT_KEY_PATH"), _required("FANOUT_KEY_ID"),
                                    _required("FANOUT_TEAM_ID")),
        "topic": _required("FANOUT_TOPIC"),
        "connections": int(os.environ.get("FANOUT_CONNECTIONS", "2")),
    }
    if host := os.environ.get("FANOUT_HOST"):
        options["host"] = host
    if port := os.environ.get("FANOUT_PORT"):
        options["port"] = int(port)
    if ca_file := os.environ.get("FANOUT_CA_FILE"):
        options["ca_file"] = ca_file
    return options
