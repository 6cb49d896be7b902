"""The engine's one listener interface (after Pushy's metrics listener).

The engine calls these hooks; backends (Prometheus metrics, progress lines, tests) subclass
:class:`Events` and override what they need. Hooks run on the hot path: keep them cheap
and never raise.
"""

from __future__ import annotations

from typing import Any


class Events:
    def push_finished(self, result: Any, push_type: bytes, latency_s: float | None) -> None:
        """One push reached its final result."""

    def retry(self, cause: str) -> None:
        """A push is being sent again (cause: unprocessed, lost, timeout, 429, 5xx, auth ...)."""

    def connection_opened(self, conn: Any) -> None: ...

    def connection_retired(self, conn: Any, why: str) -> None: ...

    def connection_closed(self, conn: Any) -> None: ...

    def connection_failed(self, index: int, exc: BaseException) -> None: ...

    def invalid_token(self, token: str, reason: str | None, timestamp: int | None) -> None: ...

    def stream_reset(self, conn: Any) -> None:
        """A stream was reset: by us (deadline, cancel) or by the server (RST_STREAM)."""

    def goaway(self, conn: Any, reason: str | None) -> None:
        """A GOAWAY frame arrived; ``reason`` from its debug data (free-form, may be None)."""

    def auth_failure(self, reason: str | None) -> None:
        """APNs answered 403, or 429 TooManyProviderTokenUpdates."""

    def limiter_wait(self, seconds: float) -> None:
        """A push waited ``seconds`` in the limiter's token buckets / global pause."""

    def wrong_environment_found(self, accepted_by: str) -> None:
        """APNs called a token BadDeviceToken and the other environment (``accepted_by``)
        took the push (:class:`fanout.teams.Teams` with ``retry_wrong_environment``)."""


class MultiEvents(Events):
    """Fans every hook out to several backends."""

    def __init__(self, *backends: Events) -> None:
        self._backends = backends

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name not in Events.__dict__:
            return object.__getattribute__(self, name)
        backends = object.__getattribute__(self, "_backends")
        methods = [getattr(b, name) for b in backends]

        def call(*args: Any) -> None:
            for m in methods:
                m(*args)
        return call
