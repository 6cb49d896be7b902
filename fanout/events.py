"""The engine's one listener interface (after Pushy's metrics listener).

The engine calls these hooks; backends (Prometheus metrics, progress lines, tests) subclass
:class:`Events` and override what they need. Hooks run on the hot path: keep them cheap
and never raise. ``conn`` is the live connection (``fanout._engine.connection``): read it,
never keep it or call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._engine.connection import Connection
from .outcome import Result

__all__ = ["Events", "MultiEvents"]

#: A connection of any client, as the hooks see it.
AnyConnection = Connection[Any]


class Events:
    """Every hook, each doing nothing: override the ones a backend needs."""

    def push_finished(self, result: Result, push_type: bytes, latency_s: float | None) -> None:
        """One push reached its final result (``latency_s``: send to answer, if answered)."""

    def retry(self, cause: str) -> None:
        """A push is being sent again (cause: unprocessed, lost, timeout, 429, 5xx, auth ...)."""

    def connection_opened(self, conn: AnyConnection) -> None:
        """A connection is ready (TLS, ALPN h2 and the server's SETTINGS done)."""

    def connection_retired(self, conn: AnyConnection, why: str) -> None:
        """A connection takes no new streams (GOAWAY, ids exhausted, error ...)."""

    def connection_closed(self, conn: AnyConnection) -> None:
        """A connection closed; its streams have all ended (``conn.error``: why, if it failed)."""

    def connection_failed(self, index: int, exc: BaseException) -> None:
        """Opening connection slot ``index`` failed (it is retried with backoff)."""

    def invalid_token(self, token: str, reason: str | None, timestamp: int | None) -> None:
        """APNs called ``token`` invalid (once per token; ``timestamp`` in ms, if given)."""

    def stream_reset(self, conn: AnyConnection) -> None:
        """A stream was reset: by us (deadline, cancel) or by the server (RST_STREAM)."""

    def goaway(self, conn: AnyConnection, reason: str | None) -> None:
        """A GOAWAY frame arrived; ``reason`` from its debug data (free-form, may be None)."""

    def auth_failure(self, reason: str | None) -> None:
        """APNs answered 403, or 429 TooManyProviderTokenUpdates."""

    def limiter_wait(self, seconds: float) -> None:
        """A push waited ``seconds`` in the limiter's token buckets / global pause."""

    def wrong_environment_found(self, accepted_by: str) -> None:
        """APNs called a token BadDeviceToken and the other environment (``accepted_by``)
        took the push (:class:`fanout.teams.Teams` with ``retry_wrong_environment``)."""


class MultiEvents(Events):
    """Fans every hook out to several backends, in order."""

    def __init__(self, *backends: Events) -> None:
        self._backends = backends

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name not in Events.__dict__:
            return object.__getattribute__(self, name)
        backends = object.__getattribute__(self, "_backends")
        methods: list[Callable[..., None]] = [getattr(b, name) for b in backends]

        def call(*args: object) -> None:
            for m in methods:
                m(*args)
        return call
