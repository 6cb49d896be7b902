"""Prometheus metrics: an :class:`~fanout.events.Events` backend (docs/metrics-contract.md).

Counters and the latency histogram are updated by the engine's hooks (one cached label
child per label set: one dict lookup per push, no dict building). Gauges that describe
state (in flight, queue depth, per-connection stream limit and streams open, JWT age) and
the JWT rotation counter are sampled from the client by :meth:`Metrics.sample`, every
``interval`` seconds by :meth:`Metrics.run_sampler`.

Multiprocess mode (``fanout run --workers N``): when ``PROMETHEUS_MULTIPROC_DIR`` is set
before :mod:`prometheus_client` is first imported, every value lives in that directory;
gauges are ``livesum`` (``fanout_jwt_age_seconds``: ``livemax``) and the coordinator
serves the sum through ``prometheus_client.multiprocess.MultiProcessCollector``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .events import Events
from .outcome import REASONS
from .payload import PushType

__all__ = ["DaemonMetrics", "Metrics", "LATENCY_BUCKETS", "parse_listen", "reason_label",
           "serve"]

log = logging.getLogger("fanout.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
PUSH_TYPES = frozenset(t.value for t in PushType)
RETRY_CAUSES = frozenset({"unprocessed", "lost", "timeout", "429", "5xx", "auth", "reconnect"})
CLOSE_CAUSES = ("goaway", "reset", "idle", "error", "closed")


def reason_label(reason: str | None) -> str:
    """A bounded label value: a known APNs reason, ``none`` or ``other``."""
    if reason is None:
        return "none"
    return reason if reason in REASONS else "other"


def _multiprocess() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


def close_cause(conn: Any) -> str:
    """Why a connection closed, as one of :data:`CLOSE_CAUSES`."""
    if getattr(conn, "goaway_last_id", None) is not None:
        return "goaway"
    error = getattr(conn, "error", None)
    if error is not None:
        text = str(error)
        if "closed by the server" in text or "reset" in text.lower():
            return "reset"
        return "error"
    if "IdleTimeout" in (getattr(conn, "retire_reason", "") or ""):
        return "idle"
    return "closed"


class Metrics(Events):
    """Every engine metric of the contract, in ``registry`` (a fresh
    :class:`~prometheus_client.CollectorRegistry` by default).

    Library use::

        registry = prometheus_client.CollectorRegistry()
        metrics = Metrics(registry=registry)
        async with Client(..., events=metrics) as client:
            metrics.attach(client)          # samples the gauges every second
            async for result in client.fan_out(payload, tokens):
                ...

    ``attach`` runs the sampler in the client's own nursery (it stops with the client);
    to run it elsewhere, ``nursery.start_soon(metrics.run_sampler, client, 1.0)``. To
    combine with another listener, ``Client(events=MultiEvents(metrics, other))``.
    Expose ``registry`` with e.g. ``prometheus_client.start_http_server(port,
    registry=registry)``. ``daemon=True`` (default) also registers the ``fanout run``
    counters (:class:`DaemonMetrics`, as ``self.daemon``); they stay at 0 for a library.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, daemon: bool = True,
                 interval: float = 1.0) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.interval = interval
        self._multiprocess = _multiprocess()
        r = self.registry
        self.pushes = Counter("fanout_pushes_total", "pushes finished",
                              ["push_type", "outcome", "reason"], registry=r)
        self.latency = Histogram("fanout_push_latency_seconds", "send to answer",
                                 ["push_type", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("fanout_in_flight", "pushes sent, not yet answered",
                               registry=r, multiprocess_mode="livesum")
        self.queue_depth = Gauge("fanout_queue_depth",
                                 "pushes waiting for a stream slot or a token bucket",
                                 registry=r, multiprocess_mode="livesum")
        self.stream_limit = Gauge("fanout_connection_stream_limit",
                                  "server's current SETTINGS_MAX_CONCURRENT_STREAMS",
                                  ["connection"], registry=r, multiprocess_mode="livesum")
        self.streams_open = Gauge("fanout_connection_streams_open", "streams open now",
                                  ["connection"], registry=r, multiprocess_mode="livesum")
        self.connections_opened = Counter("fanout_connections_opened_total",
                                          "connections that became ready", registry=r)
        self.connections_closed = Counter("fanout_connections_closed_total",
                                          "connections closed", ["cause"], registry=r)
        self.connection_failures = Counter("fanout_connection_failures_total",
                                           "connection attempts that failed", registry=r)
        self.goaways = Counter("fanout_goaways_total", "GOAWAY frames received", ["reason"],
                               registry=r)
        self.streams_reset = Counter("fanout_streams_reset_total", "streams reset", registry=r)
        self.retries = Counter("fanout_retries_total", "resends", ["cause"], registry=r)
        self.limiter_wait_seconds = Counter(
            "fanout_limiter_wait_seconds_total",
            "seconds pushes waited in token buckets / global pause", registry=r)
        self.invalid_tokens = Counter("fanout_invalid_tokens_total",
                                      "tokens invalidated (each once)", registry=r)
        # livemax: the age of the oldest token among the workers (a sum means nothing)
        self.jwt_age = Gauge("fanout_jwt_age_seconds", "age of the provider token in use",
                             registry=r, multiprocess_mode="livemax")
        self.jwt_rotations = Counter("fanout_jwt_rotations_total", "provider tokens minted",
                                     registry=r)
        self.auth_failures = Counter("fanout_auth_failures_total", "403/429 auth answers",
                                     ["reason"], registry=r)
        self.daemon = DaemonMetrics(r) if daemon else None

        self._push_children: dict[tuple, tuple[Any, Any]] = {}
        # fixed label sets: created up front so that every series exists from the start
        self._retry_children = {c: self.retries.labels(c) for c in sorted(RETRY_CAUSES)}
        self._closed_children = {c: self.connections_closed.labels(c) for c in CLOSE_CAUSES}
        self._goaway_children: dict[str, Any] = {}
        self._auth_children: dict[str, Any] = {}
        self._conn_children: dict[int, tuple[Any, Any]] = {}
        self._reset_inc = self.streams_reset.inc
        self._rotations_seen = 0
        self._client: Any = None

    # ------------------------------------------------------------------ engine hooks

    def push_finished(self, result: Any, push_type: bytes, latency_s: float | None) -> None:
        reason = result.reason
        if reason is not None and reason not in REASONS:
            reason = "other"
        key = (push_type, result.outcome, reason)
        children = self._push_children.get(key)
        if children is None:
            children = self._push_child(push_type, result.outcome, reason)
        children[0].inc()
        if latency_s is not None:
            children[1].observe(latency_s)

    def _push_child(self, push_type: bytes, outcome: Any, reason: str | None) -> tuple[Any, Any]:
        pt = push_type.decode("ascii", "replace") if isinstance(push_type, bytes) \
            else str(push_type)
        if pt not in PUSH_TYPES:
            pt = "other"
        oc = str(outcome)
        children = (self.pushes.labels(pt, oc, reason_label(reason)),
                    self.latency.labels(pt, oc))
        self._push_children[(push_type, outcome, reason)] = children
        return children

    def retry(self, cause: str) -> None:
        child = self._retry_children.get(cause)
        if child is None:  # not a known cause: bounded as "other"
            child = self._retry_children.get("other")
            if child is None:
                child = self._retry_children["other"] = self.retries.labels("other")
        child.inc()

    def connection_opened(self, conn: Any) -> None:
        self.connections_opened.inc()

    def connection_closed(self, conn: Any) -> None:
        self._closed_children[close_cause(conn)].inc()
        index = getattr(conn, "index", None)
        if index is None or index not in self._conn_children:
            return
        pool = getattr(self._client, "pool", None)
        if pool is not None and any(c is not conn and c.index == index
                                    for c in (*pool.conns, *pool.draining)):
            return  # the slot's replacement is already up: keep its series
        self._drop_connection(index)

    def connection_failed(self, index: int, exc: BaseException) -> None:
        self.connection_failures.inc()

    def invalid_token(self, token: str, reason: str | None, timestamp: int | None) -> None:
        self.invalid_tokens.inc()

    def stream_reset(self, conn: Any) -> None:
        self._reset_inc()

    def goaway(self, conn: Any, reason: str | None) -> None:
        label = reason_label(reason)
        child = self._goaway_children.get(label)
        if child is None:
            child = self._goaway_children[label] = self.goaways.labels(label)
        child.inc()

    def auth_failure(self, reason: str | None) -> None:
        label = reason_label(reason)
        child = self._auth_children.get(label)
        if child is None:
            child = self._auth_children[label] = self.auth_failures.labels(label)
        child.inc()

    def limiter_wait(self, seconds: float) -> None:
        if seconds > 0:
            self.limiter_wait_seconds.inc(seconds)

    # ------------------------------------------------------------------ sampling

    def attach(self, client: Any, interval: float | None = None) -> None:
        """Sample ``client``'s gauges every ``interval`` s (default ``self.interval``) in the
        client's nursery: call it inside ``async with client``."""
        nursery = getattr(client, "_nursery", None)
        if nursery is None:
            raise RuntimeError("attach the metrics inside 'async with Client(...)', or run "
                               "metrics.run_sampler(client) in a nursery of your own")
        nursery.start_soon(self.run_sampler, client,
                           self.interval if interval is None else interval)

    async def run_sampler(self, client: Any, interval: float = 1.0) -> None:
        """Sample ``client`` now and every ``interval`` seconds until cancelled."""
        self._client = client
        while True:
            self.sample(client)
            await trio.sleep(interval)

    def sample(self, client: Any) -> None:
        """Set the state gauges from ``client`` now (cheap: a walk over the pool's
        connections)."""
        self._client = client
        pool = client.pool
        conns = (*pool.conns, *pool.draining)
        self.in_flight.set(sum(len(c.streams) for c in conns))
        self.queue_depth.set(client.limiter.waiting + len(pool._lot))
        limits: dict[int, int] = {}
        open_: dict[int, int] = {}
        for c in pool.conns:  # the slot's ready connection sets its limit
            limits[c.index] = c.stream_limit
        for c in conns:
            open_[c.index] = open_.get(c.index, 0) + len(c.streams)
            limits.setdefault(c.index, c.stream_limit)
        for index, n in open_.items():
            children = self._conn_children.get(index)
            if children is None:
                label = str(index)
                children = self._conn_children[index] = (self.stream_limit.labels(label),
                                                         self.streams_open.labels(label))
            children[0].set(limits[index])
            children[1].set(n)
        for index in [i for i in self._conn_children if i not in open_]:
            self._drop_connection(index)
        auth = client.auth
        if auth is not None and hasattr(auth, "rotations"):
            rotations = auth.rotations
            if rotations > self._rotations_seen:
                self.jwt_rotations.inc(rotations - self._rotations_seen)
            self._rotations_seen = rotations
            self.jwt_age.set(max(0.0, auth.age()))

    def _drop_connection(self, index: int) -> None:
        children = self._conn_children.get(index)
        if children is None:
            return
        if self._multiprocess:
            # removal is not implemented in multiprocess mode: the slot reads 0 instead
            children[0].set(0)
            children[1].set(0)
            return
        del self._conn_children[index]
        label = str(index)
        self.stream_limit.remove(label)
        self.streams_open.remove(label)


class DaemonMetrics:
    """``fanout run``'s own counters, fed from the daemon's running totals by
    :meth:`update` (only deltas reach the counters)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.input_lines = Counter("fanout_input_lines_total", "input lines read", registry=r)
        self.malformed_lines = Counter("fanout_malformed_lines_total", "malformed input lines",
                                       registry=r)
        self.results_written = Counter("fanout_results_written_total", "result lines written",
                                       registry=r)
        self.checkpoint_lag = Gauge("fanout_checkpoint_lag_lines",
                                    "lines read but not yet covered by the checkpoint",
                                    registry=r, multiprocess_mode="livesum")
        # set by a fleet daemon (fanout/fleet.py) from XINFO GROUPS; the whole group's
        # figures, the same on every daemon of the group (the dashboard takes the max)
        self.stream_lag = Gauge("fanout_stream_lag_entries",
                                "Redis Stream entries not yet read by the consumer group",
                                registry=r, multiprocess_mode="max")
        self.stream_pending = Gauge("fanout_stream_pending_entries",
                                    "Redis Stream entries read by the group, not yet acked",
                                    registry=r, multiprocess_mode="max")
        self._seen = [0, 0, 0]

    def update(self, lines: int, malformed: int, results: int, lag: int) -> None:
        seen = self._seen
        for i, (total, counter) in enumerate(((lines, self.input_lines),
                                              (malformed, self.malformed_lines),
                                              (results, self.results_written))):
            if total > seen[i]:
                counter.inc(total - seen[i])
                seen[i] = total
        self.checkpoint_lag.set(max(0, lag))


# --------------------------------------------------------------------------- exposition

def parse_listen(value: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> ``(host, port)``; the host defaults to 127.0.0.1."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--metrics wants [HOST:]PORT, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"--metrics port out of range: {number}")
    return host, number


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(listen: str, registry: CollectorRegistry) -> tuple[Any, Callable[[], None]]:
    """Start the HTTP exposition of ``registry`` on ``[HOST:]PORT`` in a thread; returns
    ``(server, stop)``. A non-loopback host is allowed (it was asked for) but logged."""
    from prometheus_client import start_http_server

    host, port = parse_listen(listen)
    if not _loopback(host):
        log.warning("metrics endpoint on %s:%d is reachable from other hosts", host, port)
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return server, stop
