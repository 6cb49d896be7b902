"""``fanout serve``'s ASGI application: routing, API keys, the service endpoints
(``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``) and per-endpoint metrics. It
runs under hypercorn on trio, in the same trio run as the engine (a
:class:`fanout.Client`, or :class:`fanout.teams.Teams`); the pushes are
:mod:`fanout._serve.pushes`, the channels :mod:`fanout._serve.channels`."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from importlib import resources
from typing import Any, cast

import trio

from .._daemon.seams import engine_ready
from .channels import ChannelsApi
from .http import Exchange, HttpError, Limits, Receive, Scope, Send, error_body, lifespan
from .keys import ApiKey, ApiKeys
from .pushes import Pushes

SERVICE_ENDPOINTS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


class Connections:
    """The client connections open now, for ``--max-connections``. hypercorn has no cap of
    its own: :func:`fanout._serve.command.count_connections` has each of its connections
    report here when it opens and closes. One opened past the limit is refused: every
    request on it is answered 429 with ``Connection: close``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live: dict[Any, bool] = {}  # client address -> refused

    def opened(self, client: Any) -> None:
        self.live[client] = len(self.live) >= self.limit

    def closed(self, client: Any) -> None:
        self.live.pop(client, None)

    def refused(self, client: Any) -> bool:
        return self.live.get(client, False)


class Readiness:
    """``/readyz``: APNs answered the start-up probe with the credentials accepted, and
    the engine has no configuration error and a way to APNs now."""

    def __init__(self) -> None:
        self.probed = False
        self.why = "the start-up probe has not been answered yet"

    def state(self, engine: Any) -> tuple[bool, str]:
        if not self.probed:
            return False, self.why
        return engine_ready(engine)


class App:
    """The ASGI application."""

    def __init__(self, engine: Any, *, default_topic: str | None, environment: str,
                 teams: bool, keys: ApiKeys | None, limits: Limits, registry: Any = None,
                 sample: Callable[[], None] | None = None, tracker: Any = None,
                 queue: Any = None) -> None:
        self.engine = engine
        self.default_topic = default_topic
        self.environment = environment
        self.teams = teams
        self.keys = keys
        self.limits = limits
        self.registry = registry
        self._sample = sample
        self.tracker = tracker
        self.ready = Readiness()
        self.stopping = trio.Event()
        self.in_flight_requests = 0
        self.connections = Connections(limits.max_connections)
        self._metrics = _ServeMetrics(registry) if registry is not None else None
        self._openapi: bytes | None = None
        self.pushes = Pushes(engine, default_topic=default_topic, environment=environment,
                             teams=teams, limits=limits, tracker=tracker,
                             stopping=self.stopping, queue=queue)
        self.queue = queue
        self.channels = ChannelsApi(engine, default_topic=default_topic, teams=teams,
                                    limits=limits, durable=queue is not None)

    # ------------------------------------------------------------ ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        ex = Exchange(scope, receive, send, self.limits)
        raw = scope.get("raw_path") or scope["path"].encode()
        path = raw.split(b"?", 1)[0].decode("latin-1")  # still quoted: an id may hold "/"
        endpoint, handler, args = self._route(scope["method"], path)
        started = time.perf_counter()
        counted = endpoint not in SERVICE_ENDPOINTS  # a busy server still says how it is
        if counted:
            self.in_flight_requests += 1
        try:
            if counted and self.connections.refused(scope.get("client")):
                raise HttpError(429, "too_many_connections",
                                f"{self.limits.max_connections} client connections are open "
                                f"already (--max-connections)",
                                [(b"retry-after", b"1"), (b"connection", b"close")])
            if handler is None:
                raise args[0]
            if endpoint != "/healthz":
                key = self._authenticate(ex)
                args = (key, *args)
            if counted and self.in_flight_requests > self.limits.max_requests:
                raise HttpError(429, "too_many_requests",
                                f"{self.limits.max_requests} requests are in progress "
                                f"already (--max-requests)", [(b"retry-after", b"1")])
            await handler(ex, *args)
        except HttpError as exc:
            if exc.status == 499:
                ex.status = 499
            elif not ex.started:
                headers = exc.headers
                if ex.unread and scope.get("http_version") in ("1.0", "1.1") and \
                        all(name != b"connection" for name, _ in headers):
                    # the rest of the body is not read: this connection cannot carry another
                    headers = [*headers, (b"connection", b"close")]
                await ex.json(exc.status, error_body(exc.code, exc.message), headers)
            else:  # the stream has begun: its last line says why it ends
                await ex.write(error_body(exc.code, exc.message) + b"\n", more=False)
        finally:
            if counted:
                self.in_flight_requests -= 1
            if self._metrics is not None:
                self._metrics.observe(endpoint, ex.status, time.perf_counter() - started)

    def _route(self, method: str, path: str) -> tuple[str, Any, tuple[Any, ...]]:
        fixed: dict[str, dict[str, Any]] = {
            "/healthz": {"GET": self._healthz}, "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics_text}, "/openapi.json": {"GET": self._openapi_doc},
            "/v1/push": {"POST": self.pushes.push}, "/v1/pushes": {"POST": self.pushes.pushes},
            "/v1/fanout": {"POST": self.pushes.fanout},
            "/v1/channels": {"GET": self.channels.list, "POST": self.channels.create},
            "/api/push": {"POST": self.pushes.gorush},
        }
        endpoint, params = path, cast(tuple[Any, ...], ())
        methods = fixed.get(path)
        if methods is None and path.startswith("/v1/channels/"):
            rest = path[len("/v1/channels/"):].split("/")
            channel_id = urllib.parse.unquote(rest[0])
            if len(rest) == 1 and rest[0]:
                endpoint, params = "/v1/channels/{id}", (channel_id,)
                methods = {"GET": self.channels.read, "DELETE": self.channels.delete}
            elif len(rest) == 2 and rest[0] and rest[1] == "broadcast":
                endpoint, params = "/v1/channels/{id}/broadcast", (channel_id,)
                methods = {"POST": self.pushes.broadcast}
        if methods is None:
            return "other", None, (HttpError(404, "not_found",
                                             f"no endpoint {urllib.parse.unquote(path)}"),)
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(sorted(methods)).encode()
            return endpoint, None, (HttpError(405, "method_not_allowed",
                                              f"{method} is not allowed on {endpoint}",
                                              [(b"allow", allow)]),)
        return endpoint, handler, params

    def _authenticate(self, ex: Exchange) -> ApiKey | None:
        if self.keys is None:  # no keys: refused at start unless bound to loopback only
            return None
        value = ex.header(b"authorization") or b""
        scheme, _, presented = value.decode("latin-1").partition(" ")
        key = self.keys.find(presented.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise HttpError(401, "unauthorized",
                            "a valid API key is needed: Authorization: Bearer KEY",
                            [(b"www-authenticate", b'Bearer realm="fanout"')])
        return key

    # ------------------------------------------------------------ service endpoints

    async def _healthz(self, ex: Exchange) -> None:
        await ex.json(200, {"status": "ok"})

    async def _readyz(self, ex: Exchange, key: ApiKey | None) -> None:
        if self.queue is not None:  # --to: ready when the stream can be written
            problem = await self.queue.ping()
            ok, why = problem is None, problem or "ready"
        else:
            ok, why = self.ready.state(self.engine)
        if self.stopping.is_set():
            ok, why = False, "shutting down"
        await ex.json(200 if ok else 503, {"status": "ready"} if ok else
                      {"status": "not_ready", "reason": why})

    async def _metrics_text(self, ex: Exchange, key: ApiKey | None) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.registry is None:
            raise HttpError(404, "not_found", "metrics are off")
        if self._sample is not None:
            self._sample()
        await ex.start(200, CONTENT_TYPE_LATEST.encode())
        await ex.write(generate_latest(self.registry), more=False)

    async def _openapi_doc(self, ex: Exchange, key: ApiKey | None) -> None:
        if self._openapi is None:
            self._openapi = resources.files(__package__).joinpath("openapi.json").read_bytes()
        await ex.json(200, self._openapi)


class _ServeMetrics:
    """Per-endpoint request counts and latency, in the engine's registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("fanout_serve_requests_total", "HTTP requests answered",
                                ["endpoint", "status"], registry=registry)
        self.seconds = Histogram("fanout_serve_request_seconds", "HTTP request to response end",
                                 ["endpoint"], registry=registry,
                                 buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5,
                                          10, 30))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.seconds.labels(endpoint).observe(seconds)


__all__ = ["App", "HttpError", "Limits"]
