"""Many apps under several Apple developer teams from one process: a routing layer.

APNs binds a connection to one team on its first push, so each team gets a
:class:`~fanout.client.Client` per environment (its connections, its JWT schedule, its
limiter), and a push goes to the team that serves its topic (the bundle id without a
push-type suffix) in the environment it names (``Notification.environment``, else the
router's). One team's failures (a revoked key, 403s) never slow the others: its client
stops with ``config_error`` results, the rest go on. A team's client is opened on its
first push and closed after ``idle_timeout`` seconds unused.

    teams = [Team("acme", TokenAuth.from_file(...), {"com.acme.app", "com.acme.pos"}),
             Team("beta", CertAuth(...), {"com.beta.app"}, connections=4)]
    async with Teams(teams, retry_wrong_environment=True) as router:
        async for r in router.send_many(notifications):   # any mix of topics
            print(r.team, r.environment, r.outcome)

``retry_wrong_environment``: APNs answers 400 BadDeviceToken both for a dead token and for a
token of the other environment. With the option on, such a push is sent once more to the
team's other environment; if that one accepts it the result is ``delivered`` with
``wrong_environment`` set (store the token's environment, do not delete it), otherwise it is
the first ``invalid_token`` answer. Until the second answer, nothing calls the token dead:
``on_invalid_token`` and the metrics hear of it only then.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import msgspec
import trio

from ._flow import drain, put
from .client import Client
from .errors import ConfigError, ValidationError
from .events import Events
from .outcome import Outcome, Result
from .payload import (
    ENVIRONMENTS,
    Environment,
    Notification,
    Payload,
    Prepared,
    PushTemplate,
    PushType,
    bundle_of,
)

log: logging.Logger = logging.getLogger("fanout.teams")

QUEUE = 1024  # pushes waiting per team inside send_many, beyond what its clients hold
_OTHER = {"production": "sandbox", "sandbox": "production"}


@dataclass
class Team:
    """One Apple developer team: its credentials and the bundle ids it serves. ``client``
    holds extra :class:`Client` arguments for its pools (``host``, ``port``, ``ca_file``,
    ``rate`` ...); ``per_environment`` more of them for one environment only (a sandbox
    mock's ``host`` and ``port``)."""

    name: str
    auth: Any
    topics: set[str]
    connections: int = 2
    environments: tuple[str, ...] = ENVIRONMENTS
    client: dict[str, Any] = field(default_factory=dict)
    per_environment: dict[str, dict[str, Any]] = field(default_factory=dict)


class _Open:
    """A team's client, held open by a task in the router's nursery until closed."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.ready = trio.Event()
        self.stop = trio.Event()
        self.closed = trio.Event()
        self.busy = 0
        self.last_used = trio.current_time()


class _Routed:
    """The id a push carries through a team's client while a wrong-environment retry is
    possible: the caller's id, the push (a copy carrying this id, to send it again) and
    the first answer."""

    __slots__ = ("item", "id", "first")

    def __init__(self, item: Any) -> None:
        self.id = getattr(item, "id", None)
        self.item = _with_id(item, self)
        self.first: Result | None = None


class _Holding(Events):
    """A team client's events while wrong-environment retries are on: a BadDeviceToken
    result and invalidation wait for the other environment's answer (the router reports
    the final one). Every other hook goes straight through."""

    def __init__(self, inner: Events) -> None:
        for name in Events.__dict__:
            if not name.startswith("_") and name not in ("push_finished", "invalid_token"):
                setattr(self, name, getattr(inner, name))
        self._finished = inner.push_finished
        self._invalid = inner.invalid_token

    def push_finished(self, result: Any, push_type: bytes, latency_s: float | None) -> None:
        if not _held(result):
            self._finished(result, push_type, latency_s)

    def invalid_token(self, token: str, reason: str | None, timestamp: int | None) -> None:
        if reason != "BadDeviceToken":
            self._invalid(token, reason, timestamp)


def _label(result: Result, team: str, environment: str) -> _Routed | None:
    """Stamp ``result`` with the team and environment that answered, and give it back the
    caller's id; returns the routing wrapper it carried, if any."""
    result.team, result.environment = team, environment
    routed = result.id
    if type(routed) is _Routed:
        result.id = routed.id
        return routed
    return None


def _held(result: Result) -> bool:
    return result.outcome is Outcome.INVALID_TOKEN and result.reason == "BadDeviceToken"


class _TeamQueue:
    """One team's pushes inside ``send_many``: a queue per environment, closed when the
    input has ended and every push of the team has its final result (a retry may still
    come back from the other environment until then)."""

    def __init__(self, limit: int) -> None:
        self.queues: dict[str, trio.MemorySendChannel[Any]] = {}
        self.pending = 0
        self.limit = limit
        self.room = trio.Event()
        self.fed = False

    def done(self) -> None:
        self.pending -= 1
        if self.pending < self.limit:
            self.room.set()
        self.close_if_done()

    def close_if_done(self) -> None:
        if self.fed and self.pending <= 0:
            for queue in self.queues.values():
                queue.close()


class Teams:
    """A router over one :class:`Client` per team and environment (see the module's
    docstring). ``client_kw`` go to every client; a :class:`Team`'s own ``client`` and
    ``per_environment`` settings win over them."""

    def __init__(self, teams: Iterable[Team], *, environment: str = "production",
                 idle_timeout: float = 300.0, retry_wrong_environment: bool = False,
                 on_invalid_token: Callable[[str, str | None, int | None], Any] | None = None,
                 events: Events | None = None, **client_kw: Any) -> None:
        self.teams: list[Team] = list(teams)
        self.environment = environment
        self.idle_timeout = idle_timeout
        self.retry_wrong_environment = retry_wrong_environment
        self._on_invalid = on_invalid_token
        self._client_kw = client_kw
        self._events = events
        self._team_events: dict[str, Events] = {}
        self._by_bundle: dict[str, Team] = {}
        names = [team.name for team in self.teams]
        if "" in names or len(set(names)) < len(names):
            raise ConfigError(f"every team needs a name of its own, got {names}")
        for team in self.teams:
            for topic in team.topics:
                bundle = bundle_of(topic)
                other = self._by_bundle.get(bundle)
                if other is not None and other is not team:
                    raise ConfigError(f"bundle id {bundle} is served by two teams: "
                                      f"{other.name} and {team.name}")
                self._by_bundle[bundle] = team
        self._open: dict[tuple[str, str], _Open] = {}
        self._nursery: trio.Nursery | None = None
        self._cm: contextlib.AbstractAsyncContextManager[trio.Nursery] | None = None

    async def __aenter__(self) -> Teams:
        self._cm = trio.open_nursery()
        self._nursery = nursery = await self._cm.__aenter__()
        nursery.start_soon(self._closer)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        assert self._nursery is not None and self._cm is not None, "not entered"
        for held in self._open.values():
            held.stop.set()
        self._nursery.cancel_scope.cancel()
        return await self._cm.__aexit__(exc_type, exc, tb)

    # ----------------------------------------------------------------- routing

    def team_for(self, topic: str | None) -> Team | None:
        """The team serving ``topic`` (any push-type suffix stripped), or None."""
        return self._by_bundle.get(bundle_of(topic)) if topic else None

    def _retries(self, team: Team) -> bool:
        return self.retry_wrong_environment and len(set(team.environments)) == 2

    def events_for(self, team: Team) -> Events | None:
        """The team's listener: ``events.for_team(name)`` when the listener has it (the
        Prometheus metrics: a ``team`` label), else ``events`` itself."""
        if self._events is None:
            return None
        ev = self._team_events.get(team.name)
        if ev is None:
            for_team = getattr(self._events, "for_team", None)
            ev = for_team(team.name) if for_team is not None else self._events
            self._team_events[team.name] = ev
        return ev

    async def client_for(self, team: Team, environment: str | None = None) -> Client:
        """The team's client for ``environment``, opened on first use."""
        env = environment or self.environment
        if env not in team.environments:
            raise ConfigError(f"team {team.name} does not send to {env}")
        key = (team.name, env)
        held = self._open.get(key)
        if held is None or held.stop.is_set():
            kw = {**self._client_kw, **team.client, **team.per_environment.get(env, {})}
            events = self.events_for(team)
            on_invalid: Any = self._on_invalid
            if self._retries(team):
                events = _Holding(events or Events())
                if on_invalid is not None:
                    on_invalid = _skip_bad_token(on_invalid)
            # the Client checks env (a Team may name any environments)
            client = Client(auth=team.auth, connections=team.connections,
                            environment=cast(Environment, env),
                            events=events, on_invalid_token=on_invalid, **kw)
            if self._retries(team):  # BadDeviceToken goes to the other environment instead
                client.guard_reasons = frozenset({"DeviceTokenNotForTopic"})
            held = self._open[key] = _Open(client)
            assert self._nursery is not None, "use the router inside 'async with Teams(...)'"
            self._nursery.start_soon(self._hold, key, held)
            log.info("team %s (%s): opening its connections", team.name, env)
        await held.ready.wait()
        held.last_used = trio.current_time()
        return held.client

    async def channels_for(self, topic: str | None, environment: str | None = None) -> Any:
        """Channel management for ``topic``'s app, through the team that serves it (its
        client opened if need be); ConfigError when no team serves ``topic``."""
        team = self.team_for(topic)
        if team is None or topic is None:
            raise ConfigError(f"no [[team]] serves topic {topic!r}" if topic else
                              "channel management with [[team]] tables needs a topic")
        client = await self.client_for(team, environment)
        return client.channels_for(topic)

    async def _hold(self, key: tuple[str, str], held: _Open) -> None:
        try:
            async with held.client:
                held.ready.set()
                await held.stop.wait()
        finally:
            held.ready.set()
            held.closed.set()
            if self._open.get(key) is held:
                del self._open[key]

    async def _closer(self) -> None:
        """Close the clients of teams idle for ``idle_timeout`` seconds."""
        while True:
            await trio.sleep(max(0.05, min(self.idle_timeout / 4, 10.0)))
            now = trio.current_time()
            for (name, env), held in list(self._open.items()):
                if not held.busy and held.ready.is_set() and \
                        now - held.last_used >= self.idle_timeout:
                    log.info("team %s (%s): idle, closing its connections", name, env)
                    held.stop.set()

    @property
    def open_teams(self) -> list[tuple[str, str]]:
        """(team, environment) of every client open now."""
        return [k for k, held in self._open.items() if not held.stop.is_set()]

    def clients_by_team(self) -> dict[str, list[Client]]:
        """Every team's open clients (an empty list for a team with none open): what the
        metrics sample."""
        out: dict[str, list[Client]] = {team.name: [] for team in self.teams}
        for (name, _env), held in self._open.items():
            if held.ready.is_set() and not held.closed.is_set():
                out[name].append(held.client)
        return out

    # ----------------------------------------------------------------- results

    @staticmethod
    def _refused(item: Any, error: str, team: str | None = None,
                 environment: str | None = None) -> Result:
        """The result of a push no team's client will take."""
        return Result(outcome=Outcome.CONFIG_ERROR, id=getattr(item, "id", None),
                      token=getattr(item, "token", None), error=error, team=team,
                      environment=environment)

    def _unrouted(self, item: Any, topic: str | None) -> Result:
        return self._refused(item, f"no team serves topic {topic!r}")

    def served_topics(self) -> str:
        """Every team's topics, for a message: ``acme: com.acme.app, com.acme.pos; ...``."""
        return "; ".join(f"{team.name}: {', '.join(sorted(team.topics))}"
                         for team in self.teams)

    def _final(self, team: Team, first: Result, second: Result, item: Any) -> Result:
        """The answer to a push tried in both environments."""
        if second.ok:
            second.wrong_environment = True
            events = self.events_for(team)
            if events is not None:
                events.wrong_environment_found(second.environment or "")
            log.debug("team %s: a token for %s was sent to %s (BadDeviceToken there)",
                     team.name, second.environment, first.environment)
            return second
        if not _held(second) and second.outcome is not Outcome.CONFIG_ERROR:
            return second  # the other environment had more to say (Unregistered ...)
        # dead in both: now tell the listener, and the invalid-token hook unless both
        # answers came from the clients' memory of dead tokens (it heard of it then)
        events = self.events_for(team)
        news = first.attempts > 0 or second.attempts > 0
        if events is not None:
            events.push_finished(first, _push_type(item), None)
            if news:
                events.invalid_token(first.token or "", first.reason, first.timestamp)
        if news and self._on_invalid is not None and first.token:
            try:
                self._on_invalid(first.token, first.reason, first.timestamp)
            except Exception:
                log.exception("on_invalid_token callback failed")
        return first

    # ----------------------------------------------------------------- sending

    async def send(self, notification: Notification | Prepared,
                   environment: str | None = None) -> Result:
        """Send one push through its team's client; a topic no team serves ends
        ``config_error`` without I/O."""
        team = self.team_for(_topic(notification))
        if team is None:
            return self._unrouted(notification, _topic(notification))
        env = _env(notification) or environment or self.environment
        try:
            result = await self._send_one(team, env, notification)
        except ConfigError as exc:
            return self._refused(notification, str(exc), team.name, env)
        if self._retries(team) and _held(result):
            other = _OTHER[env]
            second = await self._send_one(team, other, notification)
            result = self._final(team, result, second, notification)
        return result

    @contextlib.contextmanager
    def _in_use(self, team: Team, env: str) -> Iterator[None]:
        """The team's client for ``env`` is busy (not closed as idle) within."""
        held = self._open[(team.name, env)]
        held.busy += 1
        try:
            yield
        finally:
            held.busy -= 1
            held.last_used = trio.current_time()

    async def _send_one(self, team: Team, env: str, item: Any) -> Result:
        client = await self.client_for(team, env)
        with self._in_use(team, env):
            result = await client.send(item)
        _label(result, team.name, env)
        return result

    def send_many(
        self, notifications: Iterable[Notification | Prepared]
        | AsyncIterable[Notification | Prepared], environment: str | None = None,
    ) -> AsyncIterator[Result]:
        """One result per notification, any mix of topics and environments, in completion
        order; each team's pushes go through its own clients (a stalled team fills only its
        own queue)."""
        if self._nursery is None:
            raise RuntimeError("use the router inside 'async with Teams(...)'")
        return self._send_many(notifications, environment)

    def fan_out(
        self,
        payload: Payload | dict[str, Any] | bytes,
        tokens: Iterable[str] | AsyncIterable[str],
        *,
        topic: str,
        environment: str | None = None,
        push_type: PushType | str = PushType.ALERT,
        priority: int | None = None,
        expiration: int | None = None,
        collapse_id: str | None = None,
        apns_id: str | None = None,
    ) -> AsyncIterator[Result]:
        """One payload to many tokens of one app, through the team serving ``topic``: the
        payload is encoded and validated once (as :meth:`Client.fan_out` does), the tokens
        pulled as pushes complete, and each push routed as :meth:`send_many` routes it
        (``environment``, else the router's; with ``retry_wrong_environment`` a
        BadDeviceToken tries the team's other environment).

        Raises ConfigError at once when no team serves ``topic`` (naming the topics served)
        or the team does not send to ``environment``, ValidationError for a bad payload or
        option; a bad token yields a ``rejected`` result and the rest go on."""
        team = self.team_for(topic)
        if team is None:
            raise ConfigError(f"no [[team]] serves topic {topic!r} (served: "
                              f"{self.served_topics()})")
        env = environment or self.environment
        if env not in team.environments:
            raise ConfigError(f"team {team.name} does not send to {env} (its environments: "
                              f"{', '.join(team.environments)})")
        template = PushTemplate(payload, push_type=push_type, topic=topic, priority=priority,
                                expiration=expiration, collapse_id=collapse_id,
                                apns_id=apns_id)
        if self._nursery is None:
            raise RuntimeError("use the router inside 'async with Teams(...)'")
        return self._send_many(_for_tokens(template, tokens, team.name, env), env)

    async def _send_many(self, notifications: Any, environment: str | None
                         ) -> AsyncIterator[Result]:
        assert self._nursery is not None
        call = _SendMany(self, notifications, environment or self.environment)
        # feed runs in the router's nursery (not in this generator): the lanes live in its
        # nursery, and the generator's exit cancels it through `call.scope`
        self._nursery.start_soon(call.feed)
        try:
            async with call.out_recv:
                async for result in drain(call.out_recv):
                    yield result
            if call.failed:
                raise call.failed[0]
        finally:
            call.scope.cancel()


class _SendMany:
    """One ``Teams.send_many`` call: routes each input to its team's queue for its
    environment (a :class:`_Lane` each, opened on a team's first push) and collects every
    lane's results on one channel, in completion order."""

    def __init__(self, router: Teams, notifications: Any, default_env: str) -> None:
        self.router = router
        self.notifications = notifications
        self.default_env = default_env
        self.limit = int(router._client_kw.get("max_in_flight", 8192)) + QUEUE
        self.out_send, self.out_recv = trio.open_memory_channel[Result](QUEUE)
        self.scope = trio.CancelScope()
        self.failed: list[BaseException] = []  # the caller's iterable raised this
        self.states: dict[str, _TeamQueue] = {}

    async def feed(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery, self.out_send:
                try:
                    async for item in _aiter(self.notifications):
                        await self._route(nursery, item)
                except Exception as exc:  # the caller's iterable failed: surface it
                    self.failed.append(exc)
                finally:
                    for state in self.states.values():
                        state.fed = True
                        state.close_if_done()

    async def _route(self, nursery: trio.Nursery, item: Any) -> None:
        router = self.router
        if type(item) is _Answered:  # fan_out: a token that is no token
            await put(self.out_send, item.result)
            return
        topic = _topic(item)
        team = router.team_for(topic)
        if team is None:
            await put(self.out_send, router._unrouted(item, topic))
            return
        env = _env(item) or self.default_env
        if env not in team.environments:
            await put(self.out_send, router._refused(
                item, f"team {team.name} does not send to {env}", team.name, env))
            return
        state = self.states.get(team.name)
        if state is None:
            state = self.states[team.name] = _TeamQueue(self.limit)
            for e in team.environments:
                # unbounded: a retry never waits; `limit` bounds the lot
                queue, recv = trio.open_memory_channel[Any](math.inf)
                state.queues[e] = queue
                lane = _Lane(router, team, e, state, recv, self.out_send.clone())
                nursery.start_soon(lane.run)
        while state.pending >= state.limit:
            state.room = trio.Event()
            await state.room.wait()
        if router._retries(team):
            item = _Routed(item).item
        state.pending += 1
        state.queues[env].send_nowait(item)


class _Lane:
    """One team and environment inside a ``send_many``: its queue in, its client, its
    results out (a push that may belong to the other environment goes there first)."""

    def __init__(self, router: Teams, team: Team, env: str, state: _TeamQueue,
                 recv: trio.MemoryReceiveChannel[Any],
                 out: trio.MemorySendChannel[Result]) -> None:
        self.router = router
        self.team = team
        self.env = env
        self.state = state
        self.recv = recv
        self.out = out

    async def run(self) -> None:
        async with self.recv, self.out:
            try:
                first = await self.recv.receive()  # open the client only when needed
            except trio.EndOfChannel:
                return
            items = _achain(first, self.recv)
            try:
                client = await self.router.client_for(self.team, self.env)
            except ConfigError as exc:
                async for item in items:  # until the team is done
                    await self._refuse(item, str(exc))
                return
            with self.router._in_use(self.team, self.env):
                async for result in client.send_many(self._inputs(client, items)):
                    await self._answer(result)

    async def _inputs(self, client: Client, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        # once APNs refused the team's credentials, its pushes end here: they cost the
        # process (and the teams beside) as little as possible
        events = self.router.events_for(self.team)
        async for item in items:
            error = client.config_error
            if error is None:
                yield item
                continue
            if events is not None:
                events.push_finished(Result(outcome=Outcome.CONFIG_ERROR), _push_type(item),
                                     None)
            await self._refuse(item, error)

    async def _answer(self, result: Result) -> None:
        """Pass on a result of this team and environment, or, for a push that may belong
        to the other environment, send it there first."""
        routed = _label(result, self.team.name, self.env)
        if routed is not None:
            if routed.first is None and _held(result):
                routed.first = result  # try the other environment
                self.state.queues[_OTHER[self.env]].send_nowait(routed.item)
                return
            if routed.first is not None:
                result = self.router._final(self.team, routed.first, result, routed.item)
        await put(self.out, result)
        self.state.done()

    async def _refuse(self, item: Any, error: str) -> None:
        await self._answer(self.router._refused(item, error))


class _Answered:
    """A ``fan_out`` input answered before any client: a malformed token's result."""

    __slots__ = ("result",)

    def __init__(self, result: Result) -> None:
        self.result = result


async def _for_tokens(template: PushTemplate, tokens: Any, team: str, env: str
                      ) -> AsyncIterator[Prepared | _Answered]:
    """``fan_out``'s pushes, one per token as the router pulls them (the body shared)."""
    async for token in _aiter(tokens):
        try:
            yield template.for_token(token)
        except ValidationError as exc:
            yield _Answered(Result(outcome=Outcome.REJECTED,
                                   token=token if isinstance(token, str) else None,
                                   error=str(exc), team=team, environment=env))


def _skip_bad_token(hook: Callable[[str, str | None, int | None], Any]
                    ) -> Callable[[str, str | None, int | None], Any]:
    def call(token: str, reason: str | None, timestamp: int | None) -> Any:
        if reason != "BadDeviceToken":  # that one waits for the other environment
            return hook(token, reason, timestamp)
        return None
    return call


def _topic(item: Any) -> str | None:
    if isinstance(item, Prepared):
        return item.topic.decode() if item.topic else None
    return getattr(item, "topic", None)


def _env(item: Any) -> str | None:
    return getattr(item, "environment", None)


def _push_type(item: Any) -> bytes:
    pt = getattr(item, "push_type", b"alert")
    return pt if isinstance(pt, bytes) else str(pt).encode()


def _with_id(item: Any, new_id: Any) -> Any:
    """A copy of ``item`` carrying ``new_id`` (the caller's object is left alone)."""
    if isinstance(item, Prepared):
        clone = copy.copy(item)
        clone.id = new_id
        return clone
    return msgspec.structs.replace(item, id=new_id)


async def _achain(first: Any, recv: trio.MemoryReceiveChannel[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in drain(recv):
        yield item


async def _aiter(items: Any) -> AsyncIterator[Any]:
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


__all__ = ["Team", "Teams", "TeamsEngine", "bundle_of", "make_teams_engine", "teams_of"]


# --------------------------------------------------------------------------- fanout run

def teams_of(specs: Iterable[Any], refresh_after: float = 3000.0) -> list[Team]:
    """:class:`Team` objects from checked ``[[team]]`` tables (:class:`fanout.config.TeamSpec`)."""
    from .auth import CertAuth, TokenAuth

    teams = []
    for spec in specs:
        if spec.cert:
            auth: Any = CertAuth(spec.cert, spec.cert_key)
        else:
            auth = TokenAuth.from_file(spec.key_path, spec.key_id, spec.team_id,
                                       refresh_after=refresh_after)
        client = {k: v for k, v in (("host", spec.host), ("port", spec.port),
                                     ("ca_file", spec.ca_file), ("rate", spec.rate))
                  if v is not None}
        sandbox = {k: v for k, v in (("host", spec.sandbox_host), ("port", spec.sandbox_port))
                   if v is not None}
        teams.append(Team(spec.name, auth, set(spec.topics), spec.connections,
                          tuple(spec.environments), client,
                          {"sandbox": sandbox} if sandbox else {}))
    return teams


class TeamsEngine(Teams):
    """What ``fanout run`` needs of its engine (``send_many``, ``abort_in_flight``,
    ``config_error``, ``in_flight``, ``last_error``, ``unavailable_for``), over a client per
    team and environment. A team's configuration error ends its own pushes with
    ``config_error`` results; the daemon goes on."""

    config_error: str | None = None

    @property
    def in_flight(self) -> int:
        """Pushes in flight, summed over the open team clients."""
        return sum(h.client.pool.in_flight for h in self._open.values()
                   if h.ready.is_set())

    @property
    def last_error(self) -> BaseException | None:
        """The last connection error of the first open team client without a connection."""
        for h in self._open.values():
            if h.ready.is_set() and h.client.pool.unavailable_for():
                return h.client.pool.last_error
        return None

    def unavailable_for(self) -> float:
        """The longest time any open team client has been without a usable connection."""
        return max((h.client.pool.unavailable_for() for h in self._open.values()
                    if h.ready.is_set()), default=0.0)

    def abort_in_flight(self, why: str) -> list[Result]:
        """End every push in flight in every open client now (the daemon's drain deadline)."""
        out = []
        for (name, env), held in self._open.items():
            if held.ready.is_set():
                for result in held.client.abort_in_flight(why):
                    _label(result, name, env)
                    out.append(result)
        return out


def make_teams_engine(settings: Any, **extra: Any) -> TeamsEngine:
    """``fanout run`` with ``[[team]]`` tables (config file or ``--teams FILE``): the
    settings give what every team shares (timeouts, rate, delivery, environment, proxy ...);
    each table gives a team's credentials, topics and connections."""
    shared = {"timeout": settings.timeout, "connect_timeout": settings.connect_timeout,
              "unavailable_timeout": settings.unavailable_timeout,
              "ping_timeout": settings.ping_timeout, "topic_guard": settings.topic_guard,
              "max_attempts": settings.max_attempts, "delivery": settings.delivery,
              "max_in_flight": settings.max_in_flight, "rate": settings.rate,
              "proxy": settings.proxy, "insecure": settings.insecure}
    if settings.host is not None:
        shared |= {"host": settings.host, "port": settings.port}
    if settings.ca_file is not None:
        shared["ca_file"] = settings.ca_file
    return TeamsEngine(teams_of(settings.team, settings.refresh_after),
                       environment=settings.environment,
                       retry_wrong_environment=settings.retry_wrong_environment,
                       idle_timeout=settings.team_idle_timeout,
                       **shared, **extra)
