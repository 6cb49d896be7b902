"""``fanout serve``'s HTTP API: an ASGI application run by hypercorn on trio, in the same
trio run as the engine (a :class:`fanout.Client`, or :class:`fanout.teams.Teams`).

Pushes arrive in the daemon's line format (:class:`fanout._daemon.lines.PushLine`) and end
as its result lines (:class:`~fanout._daemon.lines.ResultLine`): ``POST /v1/push`` waits
for one push's answer; ``POST /v1/pushes`` and ``POST /v1/fanout`` stream results back as
NDJSON while the body still arrives. Every bound is explicit: body and line sizes, tokens
per request, the wait for each piece of a body, the wait for APNs. The response's writer
sets the pace: a client that reads slowly fills a small channel, which stops the pushes
being fed to the engine, which stops the body being read.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any, cast

import msgspec
import trio

from .._daemon.core import line_template, line_tokens, prepare_single, single_payload
from .._daemon.lines import LineError, PushLine, ResultLine, decode_line, result_encoder
from .._flow import drain
from ..errors import ConfigError, ValidationError
from ..outcome import Result
from ..payload import Prepared
from .keys import ApiKey, ApiKeys

log = logging.getLogger("fanout.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

NDJSON = b"application/x-ndjson"
JSON = b"application/json"
OUT_CHANNEL = 64   # result lines waiting for a slow reader before intake pauses
IN_CHANNEL = 256   # prepared pushes waiting for the engine


class Limits(msgspec.Struct, kw_only=True):
    """What one request may ask for (``fanout serve --max-...``)."""

    max_body: int = 1 << 20
    """Bytes of a whole body (``/v1/push``, ``/v1/fanout``, channels, ``/api/push``)."""
    max_stream_body: int = 1 << 30
    """Bytes of a ``/v1/pushes`` body (read as it arrives)."""
    max_line: int = 1 << 20
    """Bytes of one NDJSON line."""
    max_tokens: int = 100_000
    """Pushes one request may hold (a fan-out's tokens, a stream's pushes)."""
    body_timeout: float = 30.0
    """Seconds the server waits for the next piece of a body."""
    push_timeout: float = 30.0
    """Seconds ``/v1/push`` waits for APNs by default (``?timeout=`` lowers it)."""


class HttpError(Exception):
    """An answer of the app itself: ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or []


class FanOutRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/fanout``: one payload, many tokens, encoded once."""

    payload: dict[str, Any]
    tokens: list[str]
    id: Any = None
    push_type: str | None = None
    topic: str | None = None
    priority: int | None = None
    expiration: int | None = None
    collapse_id: str | None = None
    environment: str | None = None


class BroadcastRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/channels/{id}/broadcast``."""

    payload: dict[str, Any]
    id: Any = None
    priority: int | None = None
    expiration: int | None = None
    apns_id: str | None = None
    topic: str | None = None


class ChannelCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    storage_policy: int = 0


class Tag:
    """A push's ``id`` in the engine: the caller's id and its line in the request."""

    __slots__ = ("id", "line")

    def __init__(self, id: Any, line: int) -> None:
        self.id, self.line = id, line


def result_line(result: Result) -> ResultLine:
    tag = result.id
    return ResultLine.from_result(result, id=tag.id, line=tag.line, input=None)


class Exchange:
    """One request and its response: body reading with the limits, JSON and NDJSON out."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, limits: Limits) -> None:
        self.scope, self._receive, self._send, self.limits = scope, receive, send, limits
        self.started = False
        self.status = 0
        self.disconnected = False
        headers = dict(scope["headers"])
        self._more = bool(headers.get(b"transfer-encoding")) or \
            headers.get(b"content-length", b"0").strip() not in (b"0", b"") or \
            scope.get("http_version") == "2"

    @property
    def unread(self) -> bool:
        """Whether part of the request body was never read."""
        return self._more

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return bytes(value)
        return None

    def query(self, name: str) -> str | None:
        values = urllib.parse.parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        return values[name][-1] if name in values else None

    def media_type(self) -> bytes:
        return (self.header(b"content-type") or b"").split(b";")[0].strip().lower()

    async def chunks(self, limit: int) -> AsyncIterator[bytes]:
        """The body as it arrives; HttpError 413 past ``limit`` bytes, 408 when a piece
        takes longer than ``body_timeout``."""
        seen = 0
        while self._more:
            with trio.move_on_after(self.limits.body_timeout) as waited:
                message = await self._receive()
            if waited.cancelled_caught:
                raise HttpError(408, "body_timeout",
                                f"no body data for {self.limits.body_timeout:g} s")
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self._more = False
                raise HttpError(499, "disconnected", "the client went away")
            self._more = bool(message.get("more_body"))
            data = message.get("body", b"")
            seen += len(data)
            if seen > limit:
                raise HttpError(413, "payload_too_large",
                                f"the body is over {limit} bytes")
            if data:
                yield data

    async def body(self) -> bytes:
        return b"".join([c async for c in self.chunks(self.limits.max_body)])

    async def lines(self) -> AsyncIterator[bytes]:
        """The NDJSON lines of the body (``max_line`` each, ``max_stream_body`` in all)."""
        pending = b""
        async for chunk in self.chunks(self.limits.max_stream_body):
            pending += chunk
            *whole, pending = pending.split(b"\n")
            for line in whole:
                if line.strip():
                    yield line
            if len(pending) > self.limits.max_line:
                raise HttpError(413, "payload_too_large",
                                f"a line is over {self.limits.max_line} bytes")
        if pending.strip():
            yield pending

    async def start(self, status: int, content_type: bytes = JSON,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.started, self.status = True, status
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", content_type), *(headers or [])]})

    async def write(self, data: bytes, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, body: Any,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        await self.start(status, JSON, headers)
        await self.write(data, more=False)

    async def empty(self, status: int) -> None:
        self.started, self.status = True, status
        await self._send({"type": "http.response.start", "status": status, "headers": []})
        await self.write(b"", more=False)


def error_body(code: str, message: str) -> bytes:
    return msgspec.json.encode({"error": {"code": code, "message": message}})


class Readiness:
    """``/readyz``: APNs answered the start-up probe with the credentials accepted, and
    the engine has no configuration error and a way to APNs now."""

    def __init__(self) -> None:
        self.probed = False
        self.why = "the start-up probe has not been answered yet"

    def state(self, engine: Any) -> tuple[bool, str]:
        if not self.probed:
            return False, self.why
        if engine.config_error:
            return False, f"configuration error: {engine.config_error}"
        down = engine.unavailable_for()
        if down > 0:
            return False, f"APNs unreachable for {down:.0f} s"
        return True, "ready"


class App:
    """The ASGI application."""

    def __init__(self, engine: Any, *, default_topic: str | None, environment: str,
                 teams: bool, keys: ApiKeys | None, limits: Limits, registry: Any = None,
                 sample: Callable[[], None] | None = None, tracker: Any = None) -> None:
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
        self._metrics = _ServeMetrics(registry) if registry is not None else None
        self._openapi: bytes | None = None

    # ------------------------------------------------------------ ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        ex = Exchange(scope, receive, send, self.limits)
        raw = scope.get("raw_path") or scope["path"].encode()
        path = raw.split(b"?", 1)[0].decode("latin-1")  # still quoted: an id may hold "/"
        endpoint, handler, args = self._route(scope["method"], path)
        started = time.perf_counter()
        self.in_flight_requests += 1
        try:
            if handler is None:
                raise args[0]
            if endpoint != "/healthz":
                key = self._authenticate(ex)
                args = (key, *args)
            await handler(ex, *args)
        except HttpError as exc:
            if exc.status == 499:
                ex.status = 499
            elif not ex.started:
                headers = exc.headers
                if ex.unread and scope.get("http_version") in ("1.0", "1.1"):
                    # the rest of the body is not read: this connection cannot carry another
                    headers = [*headers, (b"connection", b"close")]
                await ex.json(exc.status, error_body(exc.code, exc.message), headers)
            else:  # the stream has begun: its last line says why it ends
                await ex.write(error_body(exc.code, exc.message) + b"\n", more=False)
        finally:
            self.in_flight_requests -= 1
            if self._metrics is not None:
                self._metrics.observe(endpoint, ex.status, time.perf_counter() - started)

    def _route(self, method: str, path: str) -> tuple[str, Any, tuple[Any, ...]]:
        fixed: dict[str, dict[str, Any]] = {
            "/healthz": {"GET": self._healthz}, "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics_text}, "/openapi.json": {"GET": self._openapi_doc},
            "/v1/push": {"POST": self._push}, "/v1/pushes": {"POST": self._pushes},
            "/v1/fanout": {"POST": self._fanout},
            "/v1/channels": {"GET": self._channel_list, "POST": self._channel_create},
            "/api/push": {"POST": self._gorush},
        }
        endpoint, params = path, cast(tuple[Any, ...], ())
        methods = fixed.get(path)
        if methods is None and path.startswith("/v1/channels/"):
            rest = path[len("/v1/channels/"):].split("/")
            channel_id = urllib.parse.unquote(rest[0])
            if len(rest) == 1 and rest[0]:
                endpoint, params = "/v1/channels/{id}", (channel_id,)
                methods = {"GET": self._channel_read, "DELETE": self._channel_delete}
            elif len(rest) == 2 and rest[0] and rest[1] == "broadcast":
                endpoint, params = "/v1/channels/{id}/broadcast", (channel_id,)
                methods = {"POST": self._broadcast}
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

    # ------------------------------------------------------------ pushes

    def _refuse_while_stopping(self) -> None:
        if self.stopping.is_set():
            raise HttpError(503, "shutting_down", "the server is stopping",
                            [(b"retry-after", b"1")])

    def _check_key(self, key: ApiKey | None, topic: str | None) -> None:
        topic = topic or self.default_topic
        if key is not None and not key.allows(topic):
            raise HttpError(403, "forbidden_topic",
                            f"API key {key.name!r} may not send to {topic or 'the default topic'}")

    def _check_environment(self, push: PushLine) -> None:
        env = push.environment
        if env is not None and env != self.environment and not self.teams:
            raise HttpError(400, "bad_request",
                            f"environment {env}: this server sends to {self.environment} "
                            f"only (give [[team]] tables to send to both)")

    def _decode(self, data: bytes) -> PushLine:
        try:
            push = decode_line(data)
        except LineError as exc:
            raise HttpError(400, "bad_request", str(exc)) from None
        if push.tokens_file is not None:
            raise HttpError(400, "bad_request",
                            "tokens_file is not taken over HTTP: send tokens (POST /v1/fanout "
                            "or /v1/pushes)")
        self._check_environment(push)
        return push

    async def _prepare_single(self, push: PushLine, tag: Tag) -> Prepared | ResultLine:
        """The prepared push of a one-push line (a token, a broadcast, a Live Activity), or
        its result when it ends here (superseded by a newer Live Activity update)."""
        try:
            if push.live_activity is None and push.channel_id is None:
                assert push.token is not None
                prepared = line_template(push, self.default_topic).for_token(push.token, tag)
            else:
                payload = single_payload(push)
                priority = push.priority if push.priority is not None else 10
                la = push.live_activity
                if la is not None and la.activity_id is not None and self.tracker is not None:
                    decision = self.tracker.decide(
                        la.activity_id, time.time() if la.source_time is None
                        else la.source_time, priority)
                    if decision.superseded:
                        return ResultLine(id=tag.id, line=tag.line, outcome="superseded",
                                          token=push.token, channel_id=push.channel_id,
                                          error="older than the last update sent for "
                                                f"{la.activity_id}")
                    priority = decision.priority
                prepared = prepare_single(push, payload, priority, tag, self.default_topic)
        except (ValidationError, ConfigError) as exc:
            raise HttpError(400, "bad_request", str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise HttpError(400, "bad_request", f"invalid push: {exc}"[:300]) from None
        prepared.environment = push.environment
        return prepared

    async def _one(self, ex: Exchange, key: ApiKey | None, push: PushLine) -> None:
        """Send one push and answer its result (200 whatever APNs said)."""
        self._check_key(key, push.topic)
        if key is not None:
            wait = key.take(1)
            if wait:
                raise HttpError(429, "rate_limited",
                                f"API key {key.name!r} is over its rate of {key.rate:g}/s",
                                [(b"retry-after", str(math.ceil(wait)).encode())])
        prepared = await self._prepare_single(push, Tag(push.id, 1))
        if isinstance(prepared, ResultLine):
            await ex.json(200, result_encoder.encode(prepared))
            return
        timeout = self.limits.push_timeout
        asked = ex.query("timeout")
        if asked is not None:
            try:
                timeout = min(timeout, float(asked))
            except ValueError:
                raise HttpError(400, "bad_request", f"timeout={asked!r}: not a number") from None
            if not timeout > 0:
                raise HttpError(400, "bad_request", "timeout must be more than 0")
        with trio.move_on_after(timeout) as waited:
            result = await self.engine.send(prepared)
        if waited.cancelled_caught:
            raise HttpError(504, "timeout",
                            f"APNs did not answer within {timeout:g} s; the push was "
                            f"cancelled (it may or may not have reached the device)")
        await ex.json(200, result_encoder.encode(result_line(result)))

    async def _push(self, ex: Exchange, key: ApiKey | None) -> None:
        self._refuse_while_stopping()
        push = self._decode(await ex.body())
        if push.tokens is not None:
            raise HttpError(400, "bad_request",
                            "one push takes token or channel_id: send tokens to /v1/fanout "
                            "or /v1/pushes")
        await self._one(ex, key, push)

    async def _broadcast(self, ex: Exchange, key: ApiKey | None, channel_id: str) -> None:
        self._refuse_while_stopping()
        try:
            req = msgspec.json.decode(await ex.body(), type=BroadcastRequest)
        except msgspec.DecodeError as exc:
            raise HttpError(400, "bad_request", f"invalid broadcast: {exc}") from None
        push = PushLine(payload=req.payload, channel_id=channel_id, id=req.id,
                        priority=req.priority, expiration=req.expiration,
                        apns_id=req.apns_id, topic=req.topic)
        await self._one(ex, key, push)

    async def _pushes(self, ex: Exchange, key: ApiKey | None) -> None:
        self._refuse_while_stopping()
        kind = ex.media_type()
        if kind not in (NDJSON, JSON, b"application/jsonl", b""):
            raise HttpError(415, "unsupported_media_type",
                            "send application/x-ndjson (one push per line) or "
                            "application/json (an array of pushes)")
        if kind == JSON:
            try:
                items = msgspec.json.decode(await ex.body())
            except msgspec.DecodeError as exc:
                raise HttpError(400, "bad_request", f"not JSON: {exc}") from None
            if not isinstance(items, list):
                raise HttpError(400, "bad_request", "application/json: an array of pushes")
            if len(items) > self.limits.max_tokens:
                raise HttpError(400, "too_many_tokens",
                                f"{len(items)} pushes: at most {self.limits.max_tokens}")

            async def array_lines() -> AsyncIterator[bytes]:
                for item in items:
                    yield msgspec.json.encode(item)
            source: AsyncIterator[bytes] = array_lines()
        else:
            source = ex.lines()
        await self._stream(ex, key, self._decoded(source))

    async def _fanout(self, ex: Exchange, key: ApiKey | None) -> None:
        self._refuse_while_stopping()
        try:
            req = msgspec.json.decode(await ex.body(), type=FanOutRequest)
        except msgspec.DecodeError as exc:
            raise HttpError(400, "bad_request", f"invalid fan-out: {exc}") from None
        if len(req.tokens) > self.limits.max_tokens:
            raise HttpError(400, "too_many_tokens",
                            f"{len(req.tokens)} tokens: at most {self.limits.max_tokens}")
        push = PushLine(payload=req.payload, tokens=req.tokens, id=req.id,
                        push_type=req.push_type, topic=req.topic, priority=req.priority,
                        expiration=req.expiration, collapse_id=req.collapse_id,
                        environment=req.environment)
        self._check_environment(push)
        self._check_key(key, push.topic)
        try:  # a payload that cannot go fails the request, before any push
            line_template(push, self.default_topic)
        except (ValidationError, ConfigError) as exc:
            raise HttpError(400, "bad_request", str(exc)) from None

        async def one() -> AsyncIterator[PushLine | str]:
            yield push
        await self._stream(ex, key, one())

    async def _decoded(self, lines: AsyncIterator[bytes]) -> AsyncIterator[PushLine | str]:
        """Each line decoded, or the message saying why it cannot be."""
        async for data in lines:
            try:
                push = decode_line(data)
            except LineError as exc:
                yield str(exc)
                continue
            if push.tokens_file is not None:
                yield "tokens_file is not taken over HTTP: give tokens"
                continue
            yield push

    async def _stream(self, ex: Exchange, key: ApiKey | None,
                      pushes: AsyncIterator[PushLine | str]) -> None:
        """Send every push of ``pushes``; one NDJSON result line each, in the order they
        end, written while the body is still read."""
        out_send, out_recv = trio.open_memory_channel[bytes](OUT_CHANNEL)
        in_send, in_recv = trio.open_memory_channel[Prepared](IN_CHANNEL)
        failure: list[HttpError] = []
        await ex.start(200, NDJSON)

        async def feed() -> None:
            async with in_send, out_send:
                try:
                    await self._feed(key, pushes, in_send, out_send)
                except HttpError as exc:  # the body broke off: what was sent still ends
                    failure.append(exc)

        results_out = out_send.clone()

        async def results() -> None:
            async with results_out as out:
                async for result in self.engine.send_many(drain(in_recv)):
                    await out.send(result_encoder.encode(result_line(result)) + b"\n")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            nursery.start_soon(results)
            async with out_recv:
                async for data in out_recv:
                    batch = [data]
                    while len(batch) < OUT_CHANNEL:
                        try:
                            batch.append(out_recv.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await ex.write(b"".join(batch))
        if failure and failure[0].status != 499:
            exc = failure[0]
            await ex.write(error_body(exc.code, exc.message) + b"\n", more=False)
        else:
            await ex.write(b"", more=False)

    async def _feed(self, key: ApiKey | None, pushes: AsyncIterator[PushLine | str],
                    in_send: trio.MemorySendChannel[Prepared],
                    out_send: trio.MemorySendChannel[bytes]) -> None:
        number = 0
        count = 0

        async def end(line: int, outcome: str, error: str, id: Any = None,
                      token: str | None = None) -> None:
            await out_send.send(result_encoder.encode(ResultLine(
                id=id, line=line, outcome=outcome, error=error, token=token)) + b"\n")

        async for push in pushes:
            number += 1
            if self.stopping.is_set():
                raise HttpError(503, "shutting_down",
                                f"the server is stopping: lines from {number} on were not read")
            if isinstance(push, str):
                await end(number, "malformed", push)
                continue
            topic = push.topic or self.default_topic
            if key is not None and not key.allows(topic):
                await end(number, "rejected", f"API key {key.name!r} may not send to {topic}",
                          push.id)
                continue
            env = push.environment
            if env is not None and env != self.environment and not self.teams:
                await end(number, "config_error", f"environment {env}: this server sends to "
                          f"{self.environment} only", push.id)
                continue
            tag = Tag(push.id, number)
            if push.live_activity is not None or push.channel_id is not None:
                try:
                    single = await self._prepare_single(push, tag)
                except HttpError as exc:
                    await end(number, "malformed", exc.message, push.id)
                    continue
                if isinstance(single, ResultLine):
                    await out_send.send(result_encoder.encode(single) + b"\n")
                    continue
                prepared_all: Any = [single]
            else:
                try:
                    template = line_template(push, self.default_topic)
                    tokens = line_tokens(push)
                except (ValidationError, ConfigError) as exc:
                    await end(number, "malformed", str(exc), push.id)
                    continue
                except (TypeError, ValueError) as exc:
                    await end(number, "malformed", f"invalid push: {exc}"[:300], push.id)
                    continue
                prepared_all = _for_tokens(template, tokens, tag, env)
            for prepared in prepared_all:
                if isinstance(prepared, tuple):  # a token the template refused
                    await end(number, "rejected", prepared[1], push.id,
                              prepared[0] if len(prepared[0]) < 600 else None)
                    continue
                count += 1
                if count > self.limits.max_tokens:
                    raise HttpError(400, "too_many_tokens",
                                    f"over {self.limits.max_tokens} pushes in one request")
                if key is not None:
                    wait = key.take(1)
                    if wait:  # a stream is paced, not refused
                        await trio.sleep(wait)
                        key.take(1)
                prepared.environment = env
                await in_send.send(prepared)

    # ------------------------------------------------------------ channels

    def _channels(self) -> Any:
        if self.teams:
            raise HttpError(501, "not_implemented",
                            "channel management with [[team]] tables is not served yet")
        try:
            return self.engine.channels
        except ConfigError as exc:
            raise HttpError(400, "bad_request", str(exc)) from None

    async def _channel_call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        from ..channels import ChannelError

        try:
            with trio.fail_after(self.limits.push_timeout):
                return await fn()
        except ChannelError as exc:
            status = exc.status if exc.status in (400, 403, 404, 410, 429) else 502
            raise HttpError(status, "apns_error", str(exc)) from None
        except trio.TooSlowError:
            raise HttpError(504, "timeout", "APNs did not answer in time") from None

    async def _channel_create(self, ex: Exchange, key: ApiKey | None) -> None:
        self._check_key(key, None)
        raw = await ex.body()
        try:
            req = msgspec.json.decode(raw or b"{}", type=ChannelCreate)
        except msgspec.DecodeError as exc:
            raise HttpError(400, "bad_request", f"invalid channel: {exc}") from None
        if req.storage_policy not in (0, 1):
            raise HttpError(400, "bad_request", "storage_policy is 0 or 1")
        channels = self._channels()
        ch = await self._channel_call(lambda: channels.create(req.storage_policy))
        await ex.json(201, {"channel_id": ch.channel_id,
                            "storage_policy": ch.message_storage_policy})

    async def _channel_list(self, ex: Exchange, key: ApiKey | None) -> None:
        self._check_key(key, None)
        channels = self._channels()
        await ex.json(200, {"channels": await self._channel_call(channels.list)})

    async def _channel_read(self, ex: Exchange, key: ApiKey | None, channel_id: str) -> None:
        self._check_key(key, None)
        channels = self._channels()
        ch = await self._channel_call(lambda: channels.read(channel_id))
        await ex.json(200, {"channel_id": ch.channel_id,
                            "storage_policy": ch.message_storage_policy})

    async def _channel_delete(self, ex: Exchange, key: ApiKey | None, channel_id: str) -> None:
        self._check_key(key, None)
        channels = self._channels()
        await self._channel_call(lambda: channels.delete(channel_id))
        await ex.empty(204)

    # ------------------------------------------------------------ gorush

    async def _gorush(self, ex: Exchange, key: ApiKey | None) -> None:
        """gorush's ``POST /api/push`` (iOS): sent, then answered as gorush's sync mode
        does, ``{"counts", "logs", "success"}`` with a log entry per failed push."""
        from .gorush import (
            GorushError,
            decode_gorush,
            gorush_error,
            gorush_response,
            log_entry,
            refusal_logs,
        )

        self._refuse_while_stopping()
        try:
            req = decode_gorush(await ex.body(), max_tokens=self.limits.max_tokens,
                                environments=None if self.teams else (self.environment,))
        except GorushError as exc:
            await ex.json(400, gorush_error(str(exc)))
            return
        logs: list[dict[str, Any]] = [e for r in req.refused for e in refusal_logs(r)]
        prepared: list[Prepared] = []
        for number, (push, index) in enumerate(zip(req.pushes, req.indexes, strict=True)):
            topic = push.topic or self.default_topic
            if key is not None and not key.allows(topic):
                await ex.json(403, gorush_error(
                    f"API key {key.name!r} may not send to {topic}", 403))
                return
            try:
                template = line_template(push, self.default_topic)
            except (ValidationError, ConfigError) as exc:
                await ex.json(400, gorush_error(f"notifications[{index}]: {exc}"))
                return
            for item in _for_tokens(template, line_tokens(push), Tag(push.id, number), None):
                if isinstance(item, tuple):
                    logs.append({"type": "failed-push", "platform": "ios", "token": item[0],
                                 "message": req.messages[number], "error": item[1]})
                    continue
                item.environment = push.environment
                prepared.append(item)
        if key is not None and prepared:
            wait = key.take(len(prepared))
            if wait:
                raise HttpError(429, "rate_limited",
                                f"API key {key.name!r} is over its rate of {key.rate:g}/s",
                                [(b"retry-after", str(math.ceil(wait)).encode())])
        with trio.move_on_after(self.limits.push_timeout) as waited:
            async for result in self.engine.send_many(prepared):
                tag = result.id
                entry = log_entry(result, notif_id=tag.id, message=req.messages[tag.line])
                if entry is not None:
                    logs.append(entry)
        if waited.cancelled_caught:
            raise HttpError(504, "timeout", f"APNs did not answer every push within "
                            f"{self.limits.push_timeout:g} s")
        await ex.json(200, gorush_response(req.counts, logs))


def _for_tokens(template: Any, tokens: Any, tag: Tag, env: str | None) -> Any:
    """The prepared push of each token, or ``(token, error)`` for one the template
    refuses."""
    for token in tokens:
        try:
            yield template.for_token(token, tag)
        except ValidationError as exc:
            yield (token, str(exc))


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


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
