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
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .auth import TokenAuth
from .client import Client
from .events import AnyConnection, Events
from .outcome import REASONS, Outcome, Result
from .payload import PushType

__all__ = ["DaemonMetrics", "Metrics", "LATENCY_BUCKETS", "health_app", "parse_listen",
           "reason_label", "serve"]

log: logging.Logger = logging.getLogger("fanout.metrics")

#: Buckets of ``fanout_push_latency_seconds``: APNs answers in milliseconds, a stall in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
#: ``push_type`` label values (anything else is ``other``: labels stay bounded).
PUSH_TYPES = frozenset(t.value for t in PushType)
#: ``cause`` label values of ``fanout_retries_total`` (anything else is ``other``).
RETRY_CAUSES = frozenset({"unprocessed", "lost", "timeout", "429", "5xx", "auth", "reconnect"})
#: ``cause`` label values of ``fanout_connections_closed_total``.
CLOSE_CAUSES = ("goaway", "reset", "idle", "error", "closed")


class ClientsByTeam(Protocol):
    """What :meth:`Metrics.sample` reads of a :class:`fanout.teams.Teams` router."""

    def clients_by_team(self) -> dict[str, list[Client]]:
        """Each team's clients (one per environment in use)."""
        ...


def reason_label(reason: str | None) -> str:
    """A bounded label value: a known APNs reason, ``none`` or ``other``."""
    if reason is None:
        return "none"
    return reason if reason in REASONS else "other"


def _multiprocess() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


def close_cause(conn: AnyConnection) -> str:
    """Why a connection closed, as one of :data:`CLOSE_CAUSES`."""
    if conn.goaway_last_id is not None:
        return "goaway"
    error = conn.error
    if error is not None:
        text = str(error)
        if "closed by the server" in text or "reset" in text.lower():
            return "reset"
        return "error"
    if "IdleTimeout" in conn.retire_reason:
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
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        self.interval = interval
        self._multiprocess = _multiprocess()
        r = self.registry
        T = ["team"]  # every engine metric: "" outside fanout.teams (the same as no label)
        self.pushes: Counter = Counter("fanout_pushes_total", "pushes finished",
                              [*T, "push_type", "outcome", "reason"], registry=r)
        self.latency: Histogram = Histogram("fanout_push_latency_seconds", "send to answer",
                                 [*T, "push_type", "outcome"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.in_flight: Gauge = Gauge("fanout_in_flight", "pushes sent, not yet answered", T,
                               registry=r, multiprocess_mode="livesum")
        self.queue_depth: Gauge = Gauge("fanout_queue_depth",
                                 "pushes waiting for a stream slot or a token bucket", T,
                                 registry=r, multiprocess_mode="livesum")
        self.stream_limit: Gauge = Gauge("fanout_connection_stream_limit",
                                  "server's current SETTINGS_MAX_CONCURRENT_STREAMS",
                                  [*T, "connection"], registry=r, multiprocess_mode="livesum")
        self.streams_open: Gauge = Gauge("fanout_connection_streams_open", "streams open now",
                                  [*T, "connection"], registry=r, multiprocess_mode="livesum")
        self.connections_opened: Counter = Counter("fanout_connections_opened_total",
                                          "connections that became ready", T, registry=r)
        self.connections_closed: Counter = Counter("fanout_connections_closed_total",
                                          "connections closed", [*T, "cause"], registry=r)
        self.connection_failures: Counter = Counter("fanout_connection_failures_total",
                                           "connection attempts that failed", T, registry=r)
        self.goaways: Counter = Counter("fanout_goaways_total", "GOAWAY frames received",
                               [*T, "reason"], registry=r)
        self.streams_reset: Counter = Counter("fanout_streams_reset_total", "streams reset", T,
                                     registry=r)
        self.retries: Counter = Counter("fanout_retries_total", "resends", [*T, "cause"], registry=r)
        self.limiter_wait_seconds: Counter = Counter(
            "fanout_limiter_wait_seconds_total",
            "seconds pushes waited in token buckets / global pause", T, registry=r)
        self.invalid_tokens: Counter = Counter("fanout_invalid_tokens_total",
                                      "tokens invalidated (each once)", T, registry=r)
        # livemax: the age of the oldest token among the workers (a sum means nothing)
        self.jwt_age: Gauge = Gauge("fanout_jwt_age_seconds", "age of the provider token in use", T,
                             registry=r, multiprocess_mode="livemax")
        self.jwt_rotations: Counter = Counter("fanout_jwt_rotations_total", "provider tokens minted", T,
                                     registry=r)
        self.auth_failures: Counter = Counter("fanout_auth_failures_total", "403/429 auth answers",
                                     [*T, "reason"], registry=r)
        self.wrong_environment: Counter = Counter(
            "fanout_wrong_environment_total",
            "pushes APNs refused as BadDeviceToken and the other environment accepted",
            [*T, "accepted_by"], registry=r)
        self.resent: Counter = Counter(
            "fanout_pushes_resent_total",
            "pushes sent again after an attempt timed out or its connection was lost (they "
            "may arrive twice)", T, registry=r)
        self.unreachable: Gauge = Gauge(
            "fanout_apns_unreachable_seconds",
            "seconds without a usable connection to APNs (0 while one is up)", T,
            registry=r, multiprocess_mode="livemax")
        self.daemon: DaemonMetrics | None = DaemonMetrics(r) if daemon else None
        self._views: dict[str, Metrics] = {"": self}
        self._bind("")

    def for_team(self, team: str) -> Metrics:
        """The listener of one team's clients (:class:`fanout.teams.Teams`): the same
        metrics, labelled ``team``. Team names come from the configuration (bounded)."""
        view = self._views.get(team)
        if view is None:
            view = object.__new__(type(self))
            view.__dict__.update({k: v for k, v in self.__dict__.items()
                                  if not k.startswith("_") or k in ("_multiprocess", "_views")})
            view._bind(team)
            self._views[team] = view
        return view

    def _bind(self, team: str) -> None:
        """This view's label children (created up front: every series exists from the
        start)."""
        self.team = team
        self._push_children: dict[tuple[bytes, Outcome, str | None], tuple[Counter, Histogram]] = {}
        self._retry_children = {c: self.retries.labels(team, c) for c in sorted(RETRY_CAUSES)}
        self._closed_children = {c: self.connections_closed.labels(team, c)
                                 for c in CLOSE_CAUSES}
        self._goaway_children: dict[str, Counter] = {}
        self._auth_children: dict[str, Counter] = {}
        self._conn_children: dict[str, tuple[Gauge, Gauge]] = {}
        self._opened = self.connections_opened.labels(team)
        self._failures = self.connection_failures.labels(team)
        self._reset_inc = self.streams_reset.labels(team).inc
        self._waited = self.limiter_wait_seconds.labels(team)
        self._invalid = self.invalid_tokens.labels(team)
        self._in_flight = self.in_flight.labels(team)
        self._queued = self.queue_depth.labels(team)
        self._resent = self.resent.labels(team)
        self._unreachable = self.unreachable.labels(team)
        self._jwt_age = self.jwt_age.labels(team)
        self._rotations = self.jwt_rotations.labels(team)
        self._rotations_seen: dict[int, int] = {}
        self._client: Client | ClientsByTeam | None = None

    # ------------------------------------------------------------------ engine hooks

    def push_finished(self, result: Result, push_type: bytes, latency_s: float | None) -> None:
        """Count the push by type, outcome and reason; observe its latency."""
        reason: str | None = result.reason
        if reason is not None and reason not in REASONS:
            reason = "other"
        key = (push_type, result.outcome, reason)
        children = self._push_children.get(key)
        if children is None:
            children = self._push_child(push_type, result.outcome, reason)
        children[0].inc()
        if latency_s is not None:
            children[1].observe(latency_s)
        if result.resent:
            self._resent.inc()

    def _push_child(self, push_type: bytes, outcome: Outcome,
                    reason: str | None) -> tuple[Counter, Histogram]:
        pt = push_type.decode("ascii", "replace") if isinstance(push_type, bytes) \
            else str(push_type)
        if pt not in PUSH_TYPES:
            pt = "other"
        oc = str(outcome)
        children = (self.pushes.labels(self.team, pt, oc, reason_label(reason)),
                    self.latency.labels(self.team, pt, oc))
        self._push_children[(push_type, outcome, reason)] = children
        return children

    def retry(self, cause: str) -> None:
        """Count a resend by cause (an unknown cause as ``other``)."""
        child = self._retry_children.get(cause)
        if child is None:  # not a known cause: bounded as "other"
            child = self._retry_children.get("other")
            if child is None:
                child = self._retry_children["other"] = self.retries.labels(self.team, "other")
        child.inc()

    def connection_opened(self, conn: AnyConnection) -> None:
        """Count an opened connection."""
        self._opened.inc()

    def connection_closed(self, conn: AnyConnection) -> None:
        """Count a closed connection by cause; drop its slot's series unless replaced."""
        self._closed_children[close_cause(conn)].inc()
        index = conn.index
        if self.team or str(index) not in self._conn_children:
            return  # (a team's clients, one per environment: the sampler drops what closed)
        client = self._client
        if isinstance(client, Client):
            pool = client.pool
            if any(c is not conn and c.index == index for c in (*pool.conns, *pool.draining)):
                return  # the slot's replacement is already up: keep its series
        self._drop_connection(str(index))

    def connection_failed(self, index: int, exc: BaseException) -> None:
        """Count a failed connection attempt."""
        self._failures.inc()

    def invalid_token(self, token: str, reason: str | None, timestamp: int | None) -> None:
        """Count an invalidated token."""
        self._invalid.inc()

    def wrong_environment_found(self, accepted_by: str) -> None:
        """A push the other environment accepted (fanout.teams, retry_wrong_environment)."""
        self.wrong_environment.labels(self.team, accepted_by).inc()

    def stream_reset(self, conn: AnyConnection) -> None:
        """Count a reset stream."""
        self._reset_inc()

    def goaway(self, conn: AnyConnection, reason: str | None) -> None:
        """Count a GOAWAY by (bounded) reason."""
        label = reason_label(reason)
        child = self._goaway_children.get(label)
        if child is None:
            child = self._goaway_children[label] = self.goaways.labels(self.team, label)
        child.inc()

    def auth_failure(self, reason: str | None) -> None:
        """Count a 403 / TooManyProviderTokenUpdates answer by reason."""
        label = reason_label(reason)
        child = self._auth_children.get(label)
        if child is None:
            child = self._auth_children[label] = self.auth_failures.labels(self.team, label)
        child.inc()

    def limiter_wait(self, seconds: float) -> None:
        """Add the seconds a push waited in the limiter."""
        if seconds > 0:
            self._waited.inc(seconds)

    # ------------------------------------------------------------------ sampling

    def attach(self, client: Client, interval: float | None = None) -> None:
        """Sample ``client``'s gauges every ``interval`` s (default ``self.interval``) in the
        client's nursery: call it inside ``async with client``."""
        if not client.running:
            raise RuntimeError("attach the metrics inside 'async with Client(...)', or run "
                               "metrics.run_sampler(client) in a nursery of your own")
        client.start_soon(self.run_sampler, client,
                          self.interval if interval is None else interval)

    async def run_sampler(self, client: Client | ClientsByTeam, interval: float = 1.0) -> None:
        """Sample ``client`` now and every ``interval`` seconds until cancelled."""
        self._client = client
        while True:
            self.sample(client)
            await trio.sleep(interval)

    def sample(self, client: Client | ClientsByTeam) -> None:
        """Set the state gauges from ``client`` now (cheap: a walk over the pool's
        connections). A :class:`fanout.teams.Teams` router is sampled team by team."""
        self._client = client
        if isinstance(client, Client):
            self._sample_clients([client])
            return
        for team, clients in client.clients_by_team().items():
            self.for_team(team)._sample_clients(clients)

    def _sample_clients(self, clients: Sequence[Client]) -> None:
        """A team's view samples its clients of both environments; connection labels of
        its sandbox client are ``sandbox-N``."""
        in_flight = queued = 0
        unreachable = 0.0
        limits: dict[str, int] = {}
        open_: dict[str, int] = {}
        auths: dict[int, TokenAuth] = {}
        for client in clients:
            pool = client.pool
            conns = (*pool.conns, *pool.draining)
            in_flight += sum(len(c.streams) for c in conns)
            queued += client.limiter.waiting + pool.waiting
            unreachable = max(unreachable, pool.unavailable_for())
            prefix = "sandbox-" if self.team and client.environment == "sandbox" else ""
            for c in pool.conns:  # the slot's ready connection sets its limit
                limits[prefix + str(c.index)] = c.stream_limit
            for c in conns:
                label = prefix + str(c.index)
                open_[label] = open_.get(label, 0) + len(c.streams)
                limits.setdefault(label, c.stream_limit)
            auth = client.auth
            if isinstance(auth, TokenAuth):
                auths[auth.signer_id] = auth  # environments and clients share one token
        self._in_flight.set(in_flight)
        self._queued.set(queued)
        self._unreachable.set(unreachable)
        for label, n in open_.items():
            children = self._conn_children.get(label)
            if children is None:
                children = self._conn_children[label] = (
                    self.stream_limit.labels(self.team, label),
                    self.streams_open.labels(self.team, label))
            children[0].set(limits[label])
            children[1].set(n)
        for label in [x for x in self._conn_children if x not in open_]:
            self._drop_connection(label)
        for key, auth in auths.items():
            rotations = auth.rotations
            seen = self._rotations_seen.get(key, 0)
            if rotations > seen:
                self._rotations.inc(rotations - seen)
            self._rotations_seen[key] = rotations
            self._jwt_age.set(max(0.0, auth.age()))

    def _drop_connection(self, label: str) -> None:
        children = self._conn_children.get(label)
        if children is None:
            return
        if self._multiprocess:
            # removal is not implemented in multiprocess mode: the slot reads 0 instead
            children[0].set(0)
            children[1].set(0)
            return
        del self._conn_children[label]
        self.stream_limit.remove(self.team, label)
        self.streams_open.remove(self.team, label)


class DaemonMetrics:
    """``fanout run``'s own counters, fed from the daemon's running totals by
    :meth:`update` (only deltas reach the counters)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.input_lines: Counter = Counter("fanout_input_lines_total", "input lines read", registry=r)
        self.malformed_lines: Counter = Counter("fanout_malformed_lines_total", "malformed input lines",
                                       registry=r)
        self.results_written: Counter = Counter("fanout_results_written_total", "result lines written",
                                       registry=r)
        self.checkpoint_lag: Gauge = Gauge("fanout_checkpoint_lag_lines",
                                    "lines read but not yet covered by the checkpoint",
                                    registry=r, multiprocess_mode="livesum")
        # set by a fleet daemon (fanout/fleet.py) from XINFO GROUPS; the whole group's
        # figures, the same on every daemon of the group (the dashboard takes the max)
        self.stream_lag: Gauge = Gauge("fanout_stream_lag_entries",
                                "Redis Stream entries not yet read by the consumer group",
                                registry=r, multiprocess_mode="max")
        self.stream_pending: Gauge = Gauge("fanout_stream_pending_entries",
                                    "Redis Stream entries read by the group, not yet acked",
                                    registry=r, multiprocess_mode="max")
        self._seen = [0, 0, 0]

    def update(self, lines: int, malformed: int, results: int, lag: int) -> None:
        """Advance the counters to the daemon's running totals; set the checkpoint lag."""
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


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Readiness = Callable[[], tuple[bool, str]]
"""``() -> (ready, why)``: what ``/readyz`` answers."""


def health_app(registry: CollectorRegistry, ready: Readiness | None = None) -> Any:
    """The metrics port's WSGI app: ``/metrics`` (the registry), ``/healthz`` (the process
    serves: 200), ``/readyz`` (200 when ``ready()`` says so, else 503 with the reason;
    200 without ``ready``), 404 for any other path."""
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path in ("/metrics", "/metrics/"):
            return metrics(environ, start_response)
        if path == "/healthz":
            body, status = b'{"status": "ok"}\n', "200 OK"
        elif path == "/readyz":
            ok, why = ready() if ready is not None else (True, "ready")
            body = (json.dumps({"status": "ready"} if ok else
                               {"status": "not_ready", "reason": why}) + "\n").encode()
            status = "200 OK" if ok else "503 Service Unavailable"
        else:
            body = b'{"error": "not found: /metrics, /healthz or /readyz"}\n'
            status = "404 Not Found"
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve(listen: str, registry: CollectorRegistry, ready: Readiness | None = None,
          ) -> tuple[Any, Callable[[], None]]:
    """Serve :func:`health_app` on ``[HOST:]PORT`` in a thread; returns ``(server, stop)``.
    A non-loopback host is allowed (it was asked for) but logged."""
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class _Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
            pass

    host, port = parse_listen(listen)
    if not is_loopback(host):
        log.warning("metrics endpoint on %s:%d is reachable from other hosts", host, port)
    server = make_server(host, port, health_app(registry, ready), _Server, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="fanout-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return server, stop
