"""``fanout serve``'s push endpoints: ``/v1/push``, ``/v1/pushes``, ``/v1/fanout``,
``/v1/channels/{id}/broadcast`` and gorush's ``/api/push``.

Pushes arrive in the daemon's line format (:class:`fanout._daemon.lines.PushLine`) and end
as its result lines (:class:`~fanout._daemon.lines.ResultLine`): ``/v1/push`` waits for
one push's answer; ``/v1/pushes`` and ``/v1/fanout`` stream results back as NDJSON while
the body still arrives. The response's writer sets the pace: a client that reads slowly
fills a small channel, which stops the pushes being fed to the engine, which stops the
body being read.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from .._daemon.core import line_template, line_tokens, prepare_single, single_payload
from .._daemon.lines import LineError, PushLine, ResultLine, decode_line, result_encoder
from .._flow import drain, put
from ..errors import ConfigError, ValidationError
from ..outcome import Result
from ..payload import Prepared, PushTemplate, check_dict_payload, encode_payload
from .http import JSON, NDJSON, Exchange, HttpError, Limits, error_body
from .keys import ApiKey

if TYPE_CHECKING:
    from .durable import RedisQueue

OUT_CHANNEL = 256  # result lines waiting for a slow reader before intake pauses, and the
                   # most one write carries (at 64 the engine ran in smaller batches: +7% CPU)
IN_CHANNEL = 256   # prepared pushes waiting for the engine
TEMPLATES = 64     # one-token lines' templates kept, by their headers (Pushes._token_push)


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


class Tag:
    """A push's ``id`` in the engine: the caller's id, its line in the request, the
    request's :class:`Pending` (for the drain deadline) and, for a Live Activity, the
    priority it goes at (its budget lowers 10 to 5; the result line names it)."""

    __slots__ = ("id", "line", "pending", "priority")

    def __init__(self, id: Any, line: int, pending: Pending | None = None) -> None:
        self.id, self.line, self.pending = id, line, pending
        self.priority: int | None = None


NOT_SENT = "not sent: the server is stopping (safe to send again)"


class Pending:
    """A request's pushes handed to the engine and not yet ended: at the drain deadline
    those in flight end ``maybe_delivered`` (:meth:`Pushes.abort`), the others are
    answered as not sent, so that nothing accepted ends without a word."""

    __slots__ = ("scope", "aborted", "outstanding")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.aborted: list[Result] = []
        self.outstanding: dict[tuple[int, str | None], list[Any]] = {}

    def sent(self, line: int, target: str | None, id: Any) -> None:
        entry = self.outstanding.setdefault((line, target), [0, id])
        entry[0] += 1

    def ended(self, result: Result) -> None:
        key = (result.id.line, result.token or result.channel_id)
        entry = self.outstanding.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del self.outstanding[key]

    def unanswered(self) -> list[ResultLine]:
        """After an abort: the aborted pushes' results, then one ``retries_exhausted``
        line per push that never went out."""
        out = [result_line(r) for r in self.aborted]
        for r in self.aborted:
            self.ended(r)
        for (line, target), (count, id) in self.outstanding.items():
            for _ in range(count):
                out.append(ResultLine(id=id, line=line, outcome="retries_exhausted",
                                      token=target, error=NOT_SENT))
        self.outstanding.clear()
        return out


def _from_result(result: Result) -> ResultLine:
    tag = result.id
    line = ResultLine.from_result(result, id=tag.id, line=tag.line, input=None)
    if tag.priority is not None:
        line.priority = tag.priority
    return line


def _positional(r: Result) -> ResultLine:
    """:meth:`ResultLine.from_result`'s line, built positionally: one per push, and
    keyword construction was most of its cost (2.3 µs against 0.4)."""
    tag, latency = r.id, r.latency_ms
    priority = tag.priority  # a Live Activity's, as the daemon's lines have it
    return ResultLine(tag.id, tag.line, str(r.outcome), r.token, r.channel_id, r.status,
                      r.reason, r.apns_id, r.timestamp, r.attempts,
                      None if latency is None else round(latency, 3), r.error, r.resent,
                      None, None, r.team, r.environment,
                      r.priority if priority is None else priority, r.wrong_environment)


_LAYOUT = ("id", "line", "outcome", "token", "channel_id", "status", "reason", "apns_id",
           "timestamp", "attempts", "latency_ms", "error", "resent", "input", "entry", "team",
           "environment", "priority", "wrong_environment")
_DEFAULTS = dict(zip(reversed(ResultLine.__struct_fields__),
                     reversed(ResultLine.__struct_defaults__), strict=False))
# the positional form only while the two structs have the layout it was written for
result_line = _positional if (
    ResultLine.__struct_fields__ == _LAYOUT and _DEFAULTS["input"] is _DEFAULTS["entry"] is None
    and set(_LAYOUT) - {"id", "line", "outcome", "input", "entry"}
    == set(_LAYOUT) & (set(Result.__struct_fields__) - {"id", "outcome"})) else _from_result


def require_topic(key: ApiKey | None, topic: str | None, default_topic: str | None) -> None:
    """403 unless ``key`` may send to ``topic`` (None: the server's default topic)."""
    topic = topic or default_topic
    if key is not None and not key.allows(topic):
        raise HttpError(403, "forbidden_topic",
                        f"API key {key.name!r} may not send to {topic or 'the default topic'}")


class Pushes:
    """The push endpoints, over one engine (a Client or Teams)."""

    def __init__(self, engine: Any, *, default_topic: str | None, environment: str,
                 teams: bool, limits: Limits, tracker: Any, stopping: trio.Event,
                 queue: RedisQueue | None = None) -> None:
        self.engine = engine
        self.queue = queue
        self.pending: set[Pending] = set()
        self.default_topic = default_topic
        self.environment = environment
        self.teams = teams
        self.limits = limits
        self.tracker = tracker
        self.stopping = stopping
        self._templates: dict[tuple[Any, ...], PushTemplate] = {}

    def _refuse_while_stopping(self) -> None:
        if self.stopping.is_set():
            raise HttpError(503, "shutting_down", "the server is stopping",
                            [(b"retry-after", b"1")])

    def _check_key(self, key: ApiKey | None, topic: str | None) -> None:
        require_topic(key, topic, self.default_topic)

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
                    decision = self.tracker.decide(la.activity_id, la.source_time, priority)
                    if decision.superseded:
                        return ResultLine(id=tag.id, line=tag.line, outcome="superseded",
                                          token=push.token, channel_id=push.channel_id,
                                          error="older than the last update sent for "
                                                f"{la.activity_id}")
                    priority = decision.priority
                if la is not None:
                    tag.priority = priority
                prepared = prepare_single(push, payload, priority, tag, self.default_topic)
        except (ValidationError, ConfigError) as exc:
            raise HttpError(400, "bad_request", str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise HttpError(400, "bad_request", f"invalid push: {exc}"[:300]) from None
        prepared.environment = push.environment
        return prepared

    def abort(self, why: str) -> int:
        """The drain deadline: end the pushes in flight (``maybe_delivered``, each to its
        request) and stop every request waiting on the engine; the pushes aborted."""
        results = self.engine.abort_in_flight(why) if self.engine is not None else []
        for result in results:
            tag = result.id
            if isinstance(tag, Tag) and tag.pending is not None:
                tag.pending.aborted.append(result)
        for pending in list(self.pending):
            pending.scope.cancel()
        return len(results)

    async def _one(self, ex: Exchange, key: ApiKey | None, push: PushLine) -> None:
        """Send one push and answer its result (200 whatever APNs said)."""
        self._check_key(key, push.topic)
        if key is not None:
            wait = key.take(1)
            if wait:
                raise HttpError(429, "rate_limited",
                                f"API key {key.name!r} is over its rate of {key.rate:g}/s",
                                [(b"retry-after", str(math.ceil(wait)).encode())])
        if self.queue is not None:
            self._validate(push)
            entries = await self._enqueue([line_bytes(push)])
            await ex.json(202, {"entry": entries[0], "id": push.id})
            return
        pending = Pending()
        prepared = await self._prepare_single(push, Tag(push.id, 1, pending))
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
        self.pending.add(pending)
        try:
            with pending.scope, trio.move_on_after(timeout) as waited:
                result = await self.engine.send(prepared)
        finally:
            self.pending.discard(pending)
        if pending.scope.cancelled_caught:  # the drain deadline
            line = (result_line(pending.aborted[0]) if pending.aborted else
                    ResultLine(id=push.id, line=1, outcome="retries_exhausted",
                               token=push.token, channel_id=push.channel_id, error=NOT_SENT))
            await ex.json(200, result_encoder.encode(line))
            return
        if waited.cancelled_caught:
            raise HttpError(504, "timeout",
                            f"APNs did not answer within {timeout:g} s; the push was "
                            f"cancelled (it may or may not have reached the device)")
        await ex.json(200, result_encoder.encode(result_line(result)))

    async def push(self, ex: Exchange, key: ApiKey | None) -> None:
        self._refuse_while_stopping()
        push = self._decode(await ex.body())
        if push.tokens is not None:
            raise HttpError(400, "bad_request",
                            "one push takes token or channel_id: send tokens to /v1/fanout "
                            "or /v1/pushes")
        await self._one(ex, key, push)

    async def broadcast(self, ex: Exchange, key: ApiKey | None, channel_id: str) -> None:
        self._refuse_while_stopping()
        try:
            req = msgspec.json.decode(await ex.body(), type=BroadcastRequest)
        except msgspec.DecodeError as exc:
            raise HttpError(400, "bad_request", f"invalid broadcast: {exc}") from None
        push = PushLine(payload=req.payload, channel_id=channel_id, id=req.id,
                        priority=req.priority, expiration=req.expiration,
                        apns_id=req.apns_id, topic=req.topic)
        await self._one(ex, key, push)

    async def pushes(self, ex: Exchange, key: ApiKey | None) -> None:
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

    async def fanout(self, ex: Exchange, key: ApiKey | None) -> None:
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

    # ------------------------------------------------------------ --to redis://

    def _validate(self, push: PushLine) -> int:
        """Check ``push`` as the fleet's daemon will (400 if it cannot go); its pushes."""
        try:
            if push.live_activity is None and push.channel_id is None:
                template = line_template(push, self.default_topic)
                tokens = list(line_tokens(push))
                for token in tokens:
                    template.for_token(token, None)
                return len(tokens)
            prepare_single(push, single_payload(push), 10, None, self.default_topic)
            return 1
        except (ValidationError, ConfigError) as exc:
            raise HttpError(400, "bad_request", str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise HttpError(400, "bad_request", f"invalid push: {exc}"[:300]) from None

    async def _enqueue(self, lines: list[bytes]) -> list[str]:
        from .durable import BacklogFull

        assert self.queue is not None
        try:
            return await self.queue.add(lines, trio.current_time() + self.limits.push_timeout)
        except BacklogFull as exc:
            raise HttpError(503, "backlog_full", str(exc), [(b"retry-after", b"5")]) from None
        except Exception as exc:  # noqa: BLE001  # Redis down: nothing was accepted
            raise HttpError(503, "not_ready",
                            f"the stream cannot be written: {type(exc).__name__}") from None

    async def _stream_to_queue(self, ex: Exchange, key: ApiKey | None,
                               pushes: AsyncIterator[PushLine | str]) -> None:
        """``--to``: each line checked and added as one entry; one NDJSON line each,
        ``{"line", "entry", "id"}`` or the line's ``malformed``/``rejected`` result."""
        await ex.start(202, NDJSON)
        number = count = 0
        try:
            async for push in pushes:
                number += 1
                if self.stopping.is_set():
                    raise HttpError(503, "shutting_down", "the server is stopping: lines "
                                    f"from {number} on were not read")
                if isinstance(push, str):
                    out: Any = ResultLine(id=None, line=number, outcome="malformed",
                                          error=push)
                elif key is not None and not key.allows(push.topic or self.default_topic):
                    out = ResultLine(id=push.id, line=number, outcome="rejected",
                                     error=f"API key {key.name!r} may not send to "
                                           f"{push.topic or self.default_topic}")
                else:
                    try:
                        count += self._validate(push)
                        if count > self.limits.max_tokens:
                            raise HttpError(400, "too_many_tokens",
                                            f"over {self.limits.max_tokens} pushes in one "
                                            f"request")
                        if key is not None and (wait := key.take(1)):
                            await trio.sleep(wait)
                        entry = (await self._enqueue([line_bytes(push)]))[0]
                        out = {"line": number, "entry": entry, "id": push.id}
                    except HttpError as exc:
                        if exc.code not in ("bad_request",):
                            raise
                        out = ResultLine(id=push.id, line=number, outcome="malformed",
                                         error=exc.message)
                await ex.write(msgspec.json.encode(out) + b"\n")
        except HttpError as exc:
            if exc.status == 499:
                raise
            await ex.write(error_body(exc.code, exc.message) + b"\n", more=False)
            return
        await ex.write(b"", more=False)

    # ------------------------------------------------------------ the engine

    async def _stream(self, ex: Exchange, key: ApiKey | None,
                      pushes: AsyncIterator[PushLine | str]) -> None:
        """Send every push of ``pushes``; one NDJSON result line each, in the order they
        end, written while the body is still read."""
        if self.queue is not None:
            await self._stream_to_queue(ex, key, pushes)
            return
        out_send, out_recv = trio.open_memory_channel[ResultLine](OUT_CHANNEL)
        in_send, in_recv = trio.open_memory_channel[Prepared](IN_CHANNEL)
        failure: list[HttpError] = []
        pending = Pending()
        await ex.start(200, NDJSON)

        async def feed() -> None:
            async with in_send, out_send:
                try:
                    await self._feed(key, pushes, in_send, out_send, pending)
                except HttpError as exc:  # the body broke off: what was sent still ends
                    failure.append(exc)

        results_out = out_send.clone()

        async def results() -> None:
            async with results_out as out:
                ended, send_nowait = pending.ended, out.send_nowait
                async for result in self.engine.send_many(drain(in_recv)):
                    ended(result)
                    line = result_line(result)
                    try:  # put(), inline: this runs once per push
                        send_nowait(line)
                    except trio.WouldBlock:
                        await out.send(line)

        self.pending.add(pending)
        try:
            with pending.scope:
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
                            await ex.write(result_encoder.encode_lines(batch))
        finally:
            self.pending.discard(pending)
        if pending.scope.cancelled_caught:  # the drain deadline: every push gets its line
            lines = pending.unanswered()
            await ex.write(result_encoder.encode_lines(lines))
            failure[:] = [HttpError(503, "shutting_down", "the server stopped at its drain "
                                    "deadline: no line after these was read")]
        if failure and failure[0].status != 499:
            exc = failure[0]
            await ex.write(error_body(exc.code, exc.message) + b"\n", more=False)
        else:
            await ex.write(b"", more=False)

    async def _feed(self, key: ApiKey | None, pushes: AsyncIterator[PushLine | str],
                    in_send: trio.MemorySendChannel[Prepared],
                    out_send: trio.MemorySendChannel[ResultLine], pending: Pending) -> None:
        number = 0
        count = 0

        async def end(line: int, outcome: str, error: str, id: Any = None,
                      token: str | None = None) -> None:
            await put(out_send, ResultLine(id=id, line=line, outcome=outcome, error=error,
                                           token=token))

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
            tag = Tag(push.id, number, pending)
            if push.live_activity is not None or push.channel_id is not None:
                try:
                    single = await self._prepare_single(push, tag)
                except HttpError as exc:
                    await end(number, "malformed", exc.message, push.id)
                    continue
                if isinstance(single, ResultLine):
                    await put(out_send, single)
                    continue
                prepared_all: Any = [single]
            else:
                try:
                    if push.token is not None:
                        prepared_all = (self._token_push(push, tag),)
                    else:
                        template = line_template(push, self.default_topic)
                        prepared_all = _for_tokens(template, line_tokens(push), tag, env)
                except (ValidationError, ConfigError) as exc:
                    await end(number, "malformed", str(exc), push.id)
                    continue
                except (TypeError, ValueError) as exc:
                    await end(number, "malformed", f"invalid push: {exc}"[:300], push.id)
                    continue
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
                pending.sent(number, prepared.token or prepared.channel_id, push.id)
                try:  # put(), inline: no scheduler pass per push while there is room
                    in_send.send_nowait(prepared)
                except trio.WouldBlock:
                    await in_send.send(prepared)

    def _token_push(self, push: PushLine, tag: Tag) -> Prepared | tuple[str, str]:
        """A one-token line's push, or ``(token, error)`` when its token is refused; what
        :func:`line_template` raises for the line otherwise.

        A stream's lines mostly share their headers: the template is kept by them, so the
        next such line only checks and encodes its payload (half the cost of a new
        template): the dict's aps keys and types, not empty, the size limit; a payload that
        fails one goes to :func:`line_template`, which raises its error."""
        key = (push.push_type, push.topic, self.default_topic, push.priority,
               push.expiration, push.collapse_id, push.apns_id)
        template = self._templates.get(key)
        if template is None:
            template = line_template(push, self.default_topic)
            if len(self._templates) >= TEMPLATES:
                self._templates.clear()
            self._templates[key] = template
            body = template.body
        else:
            assert push.payload is not None  # decode_line: a payload unless live_activity
            try:
                check_dict_payload(push.payload, template.push_type)  # aps keys and types
                body = encode_payload(push.payload)
            except ValidationError:
                body = b""
            if not body or len(body) > template.limit:
                template = line_template(push, self.default_topic)  # raises its error
                body = template.body
        token = push.token
        assert token is not None
        try:
            prepared = template.for_token(token, tag)
        except ValidationError as exc:
            return (token, str(exc))
        prepared.body = body
        return prepared

    async def gorush(self, ex: Exchange, key: ApiKey | None) -> None:
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
        if self.queue is not None:  # --to: each notification one entry, the fleet sends
            for push in req.pushes:
                require_topic(key, push.topic, self.default_topic)
                self._validate(push)
            if req.pushes:
                await self._enqueue([line_bytes(p) for p in req.pushes])
            await ex.json(200, gorush_response(req.counts, logs))
            return
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


def line_bytes(push: PushLine) -> bytes:
    """``push`` as one line of the daemon's format (its unset fields left out)."""
    fields = {k: v for k, v in msgspec.structs.asdict(push).items() if v is not None}
    return msgspec.json.encode(fields)
