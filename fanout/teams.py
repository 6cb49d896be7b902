"""Many apps under several Apple developer teams from one process: a routing layer.

APNs binds a connection to one team on its first push, so each team gets a
:class:`~fanout.client.Client` of its own (its connections, its JWT schedule, its
limiter), and a push goes to the team that serves its topic (the bundle id without a
push-type suffix) in its environment. One team's failures (a revoked key, 403s) never
slow the others: its client stops with ``config_error`` results, the rest go on. A team's
client is opened on its first push and closed after ``idle_timeout`` seconds unused.

    teams = [Team("acme", TokenAuth.from_file(...), {"com.acme.app", "com.acme.pos"}),
             Team("beta", CertAuth(...), {"com.beta.app"}, connections=4)]
    async with Teams(teams) as router:
        async for r in router.send_many(notifications):   # any mix of topics
            print(r.team, r.outcome)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from .client import Client
from .errors import ConfigError
from .outcome import Outcome, Result
from .payload import Notification, Prepared

log = logging.getLogger("fanout.teams")

QUEUE = 1024  # pushes waiting per team inside send_many (bounded memory)
_SUFFIXES = (".voip", ".complication", ".pushkit.fileprovider")


def bundle_of(topic: str) -> str:
    """The bundle id a topic belongs to (``com.x.app.voip`` -> ``com.x.app``)."""
    topic = topic.split(".push-type.")[0]
    for suffix in _SUFFIXES:
        if topic.endswith(suffix):
            return topic[: -len(suffix)]
    return topic


@dataclass
class Team:
    """One Apple developer team: its credentials and the bundle ids it serves. ``client``
    holds extra :class:`Client` arguments for its pool (``host``, ``port``, ``ca_file``,
    ``rate`` ...)."""

    name: str
    auth: Any
    topics: set[str]
    connections: int = 2
    environments: tuple[str, ...] = ("production", "sandbox")
    client: dict[str, Any] = field(default_factory=dict)


class _Open:
    """A team's client, held open by a task in the router's nursery until closed."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.ready = trio.Event()
        self.stop = trio.Event()
        self.closed = trio.Event()
        self.busy = 0
        self.last_used = trio.current_time()


class Teams:
    def __init__(self, teams: Iterable[Team], *, environment: str = "production",
                 idle_timeout: float = 300.0, **client_kw: Any) -> None:
        self.teams = list(teams)
        self.environment = environment
        self.idle_timeout = idle_timeout
        self._client_kw = client_kw
        self._by_bundle: dict[str, Team] = {}
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
        self._cm: Any = None

    async def __aenter__(self) -> Teams:
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        self._nursery.start_soon(self._closer)
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        for held in self._open.values():
            held.stop.set()
        self._nursery.cancel_scope.cancel()
        return await self._cm.__aexit__(*exc)

    # ----------------------------------------------------------------- routing

    def team_for(self, topic: str | None) -> Team | None:
        return self._by_bundle.get(bundle_of(topic)) if topic else None

    async def client_for(self, team: Team, environment: str | None = None) -> Client:
        """The team's client for ``environment``, opened on first use."""
        env = environment or self.environment
        if env not in team.environments:
            raise ConfigError(f"team {team.name} does not send to {env}")
        key = (team.name, env)
        held = self._open.get(key)
        if held is None or held.stop.is_set():
            kw = {**self._client_kw, **team.client}
            client = Client(auth=team.auth, connections=team.connections, environment=env,
                            **kw)
            held = self._open[key] = _Open(client)
            self._nursery.start_soon(self._hold, key, held)
            log.info("team %s (%s): opening its connections", team.name, env)
        await held.ready.wait()
        held.last_used = trio.current_time()
        return held.client

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
        return [k for k, held in self._open.items() if not held.stop.is_set()]

    # ----------------------------------------------------------------- sending

    @staticmethod
    def _refused(item: Any, error: str, team: str | None = None) -> Result:
        """The result of a push no team's client will take."""
        return Result(outcome=Outcome.CONFIG_ERROR, id=getattr(item, "id", None),
                      token=getattr(item, "token", None), error=error, team=team)

    def _unrouted(self, item: Any, topic: str | None) -> Result:
        return self._refused(item, f"no team serves topic {topic!r}")

    async def send(self, notification: Notification | Prepared,
                   environment: str | None = None) -> Result:
        team = self.team_for(_topic(notification))
        if team is None:
            return self._unrouted(notification, _topic(notification))
        client = await self.client_for(team, environment)
        held = self._open[(team.name, environment or self.environment)]
        held.busy += 1
        try:
            result = await client.send(notification)
        finally:
            held.busy -= 1
            held.last_used = trio.current_time()
        result.team = team.name
        return result

    def send_many(
        self, notifications: Iterable[Notification | Prepared]
        | AsyncIterable[Notification | Prepared], environment: str | None = None,
    ) -> AsyncIterator[Result]:
        """One result per notification, any mix of topics, in completion order; each team's
        pushes go through its own client (a stalled team fills only its own queue)."""
        if self._nursery is None:
            raise RuntimeError("use the router inside 'async with Teams(...)'")
        return self._send_many(notifications, environment)

    async def _send_many(self, notifications: Any, environment: str | None
                         ) -> AsyncIterator[Result]:
        out_send, out_recv = trio.open_memory_channel[Result](QUEUE)
        scope = trio.CancelScope()
        failed: list[BaseException] = []

        async def run_team(team: Team, recv: trio.MemoryReceiveChannel[Any],
                           out: trio.MemorySendChannel[Result]) -> None:
            async with recv, out:
                try:
                    client = await self.client_for(team, environment)
                except ConfigError as exc:
                    async for item in recv:
                        await out.send(self._refused(item, str(exc), team.name))
                    return
                held = self._open[(team.name, environment or self.environment)]
                held.busy += 1
                try:
                    async for result in client.send_many(recv):
                        result.team = team.name
                        await out.send(result)
                finally:
                    held.busy -= 1
                    held.last_used = trio.current_time()

        async def feed() -> None:
            # a task of the router's nursery (not of this generator): the team tasks
            # live in its nursery, and the generator's exit cancels it through `scope`
            queues: dict[str, trio.MemorySendChannel[Any]] = {}
            with scope:
                async with trio.open_nursery() as nursery, out_send:
                    try:
                        async for item in _aiter(notifications):
                            topic = _topic(item)
                            team = self.team_for(topic)
                            if team is None:
                                await out_send.send(self._unrouted(item, topic))
                                continue
                            queue = queues.get(team.name)
                            if queue is None:
                                queue, recv = trio.open_memory_channel[Any](QUEUE)
                                queues[team.name] = queue
                                nursery.start_soon(run_team, team, recv, out_send.clone())
                            await queue.send(item)
                    except Exception as exc:  # the caller's iterable failed: surface it
                        failed.append(exc)
                    finally:
                        for queue in queues.values():
                            await queue.aclose()

        self._nursery.start_soon(feed)
        try:
            async with out_recv:
                async for result in out_recv:
                    yield result
            if failed:
                raise failed[0]
        finally:
            scope.cancel()


def _topic(item: Any) -> str | None:
    if isinstance(item, Prepared):
        return item.topic.decode() if item.topic else None
    return getattr(item, "topic", None)


async def _aiter(items: Any) -> AsyncIterator[Any]:
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


__all__ = ["Team", "Teams", "bundle_of"]


# --------------------------------------------------------------------------- fanout run --teams

class TeamSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One ``[[team]]`` table of a ``--teams`` file."""

    name: str
    topics: list[str]
    key_path: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    cert: str | None = None
    cert_key: str | None = None
    connections: int = 2
    environments: list[str] = msgspec.field(default_factory=lambda: ["production", "sandbox"])
    host: str | None = None      # a mock, for tests
    port: int | None = None
    ca_file: str | None = None


def load_teams(path: str) -> list[Team]:
    """``[[team]]`` tables from a TOML file: name, topics, key_path + key_id + team_id (or
    cert [+ cert_key]), connections, environments. Paths are relative to the file."""
    import tomllib
    from pathlib import Path

    from .auth import CertAuth, TokenAuth

    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--teams {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--teams {path}: not TOML: {exc}") from None
    unknown = set(raw) - {"team"}
    if unknown or not raw.get("team"):
        raise ConfigError(f"--teams {path}: want [[team]] tables only"
                          + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
    base = Path(path).parent
    teams = []
    for i, table in enumerate(raw["team"]):
        try:
            spec = msgspec.convert(table, TeamSpec)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"--teams {path}: team #{i + 1}: {exc}") from None

        def rel(p: str | None) -> str | None:
            return None if p is None else str(base / p)
        if spec.cert:
            auth: Any = CertAuth(rel(spec.cert), rel(spec.cert_key))
        elif spec.key_path and spec.key_id and spec.team_id:
            auth = TokenAuth.from_file(rel(spec.key_path), spec.key_id, spec.team_id)
        else:
            raise ConfigError(f"--teams {path}: team {spec.name}: needs key_path, key_id and "
                              "team_id, or cert")
        client = {k: v for k, v in (("host", spec.host), ("port", spec.port),
                                     ("ca_file", rel(spec.ca_file))) if v is not None}
        teams.append(Team(spec.name, auth, set(spec.topics), spec.connections,
                          tuple(spec.environments), client))
    return teams


class _PoolView:
    def __init__(self, engine: TeamsEngine) -> None:
        self._engine = engine

    @property
    def in_flight(self) -> int:
        return sum(h.client.pool.in_flight for h in self._engine._open.values()
                   if h.ready.is_set())


class TeamsEngine(Teams):
    """What ``fanout run`` needs of its engine (``send_many``, ``abort_in_flight``,
    ``config_error``, ``pool.in_flight``), over a client per team. A team's configuration
    error ends its own pushes with ``config_error`` results; the daemon goes on."""

    config_error: str | None = None

    @property
    def pool(self) -> _PoolView:
        return _PoolView(self)

    def abort_in_flight(self, why: str) -> list[Result]:
        out = []
        for (name, _env), held in self._open.items():
            if held.ready.is_set():
                for result in held.client.abort_in_flight(why):
                    result.team = name
                    out.append(result)
        return out


def make_teams_engine(path: str, settings: Any, **extra: Any) -> TeamsEngine:
    """``fanout run --teams FILE``: the settings give what every team shares (timeouts,
    rate, delivery, environment ...); the file gives each team's credentials and topics."""
    if extra.get("events") is not None:
        raise ConfigError("--metrics with --teams is not supported yet")
    extra.pop("events", None)
    shared = {"timeout": settings.timeout, "connect_timeout": settings.connect_timeout,
              "max_attempts": settings.max_attempts, "delivery": settings.delivery,
              "max_in_flight": settings.max_in_flight, "rate": settings.rate,
              "proxy": settings.proxy, "insecure": settings.insecure}
    if settings.host is not None:
        shared |= {"host": settings.host, "port": settings.port}
    if settings.ca_file is not None:
        shared["ca_file"] = settings.ca_file
    return TeamsEngine(load_teams(path), environment=settings.environment, **shared, **extra)
