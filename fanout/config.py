"""One configuration layer for every command: ``send``, ``check`` and the ``run`` daemon.

Each :class:`Settings` field can come from four places; the first one that sets it wins:

1. a command-line flag (``--connections 4``; :func:`add_settings_args` adds one per field),
2. an ``APNS_*`` environment variable (:data:`ENV`; a variable set to ``""`` counts as unset),
3. the TOML file named by ``--config`` (or ``APNS_CONFIG``), keys at top level or under an
   ``[apns]`` table (not both), relative paths resolved against the file's directory,
4. the defaults below.

Precedence is per field: ``topic_rates`` given on the command line replaces the whole table
from the environment or the file, it is not merged topic by topic. The whole file is checked
(unknown keys, types) even where flags override it; an environment variable is parsed only
when no flag overrides it.

Every problem raises :class:`fanout.errors.ConfigError` with a message naming where the bad
value came from. Nothing here reads, logs or prints key material or a JWT.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from typing import Any

import msgspec
import trio

from .auth import CertAuth, TokenAuth
from .errors import ConfigError, FanoutError
from .payload import ENVIRONMENTS

__all__ = [
    "CHECK_TOKEN",
    "ENV",
    "FLAGS",
    "Settings",
    "add_settings_args",
    "check",
    "load_settings",
    "make_auth",
    "make_client",
    "add_teams_file",
    "make_engine",
    "read_teams_file",
    "team_settings",
]


class TeamSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One ``[[team]]`` table (config file or ``--teams FILE``): an Apple developer team,
    its credentials and the bundle ids it serves (:class:`fanout.teams.Team`). Paths are
    relative to the file; host/port/ca_file point one team at a mock."""

    name: str
    topics: list[str]
    key_path: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    cert: str | None = None
    cert_key: str | None = None
    connections: int = 2
    environments: list[str] = msgspec.field(default_factory=lambda: list(ENVIRONMENTS))
    rate: float | None = None  # pushes/s for this team (default: the shared rate)
    host: str | None = None
    port: int | None = None
    ca_file: str | None = None
    sandbox_host: str | None = None  # the sandbox's mock, when both environments are mocked
    sandbox_port: int | None = None


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything needed to talk to APNs; see the module docstring for where values come from."""

    key_path: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    cert: str | None = None  # certificate (mTLS) auth instead of a key
    cert_key: str | None = None
    topic: str | None = None
    environment: str = "production"  # production | sandbox
    host: str | None = None
    port: int = 443
    ca_file: str | None = None
    connections: int = 2
    timeout: float = 10.0
    connect_timeout: float = 10.0
    unavailable_timeout: float = 30.0  # no usable connection this long: APNs is unreachable
    ping_timeout: float = 5.0  # a PING unanswered (or writes stuck) this long: connection dead
    topic_guard: int = 100  # refusals in a row for one topic, none delivered: wrong topic
    rate: float | None = None  # pushes/s, all topics
    topic_rates: dict[str, float] = {}  # pushes/s per topic
    max_attempts: int = 5
    delivery: str = "at_least_once"  # at_least_once | at_most_once
    max_in_flight: int = 8192
    refresh_after: float = 3000.0  # JWT age at which it is renewed (s)
    insecure: bool = False  # turn TLS verification off (a warning is logged)
    proxy: str | None = None  # http://[user:password@]host:port; "none": ignore HTTPS_PROXY
    retry_wrong_environment: bool = False  # teams: BadDeviceToken -> try the other environment
    team_idle_timeout: float = 300.0  # teams: close a team's connections after this idle (s)
    team: list[TeamSpec] = []  # [[team]] tables: several teams, routed by topic (file only)


# Settings given by flag, APNS_* variable or file; ``team`` only by file (or --teams FILE)
_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings) if f.name != "team"}

#: Settings field -> environment variable.
ENV: dict[str, str] = {name: "APNS_" + name.upper() for name in _FIELDS}
#: Environment variable naming the config file when ``--config`` is not given.
CONFIG_ENV = "APNS_CONFIG"

#: Settings field -> command-line flag.
FLAGS: dict[str, str] = {name: "--" + name.replace("_", "-") for name in _FIELDS}
FLAGS["topic_rates"] = "--topic-rate"

_PATHS = ("key_path", "cert", "cert_key", "ca_file")
_DELIVERIES = ("at_least_once", "at_most_once")

_HELP = {
    "key_path": ".p8 signing key for token auth",
    "key_id": "key id of the .p8 key (10 characters)",
    "team_id": "Apple developer team id",
    "cert": "client certificate PEM: certificate (mTLS) auth instead of a key",
    "cert_key": "private key of --cert, if not in the same file",
    "topic": "bundle id (default apns-topic)",
    "environment": "production (default) or sandbox",
    "host": "override the APNs host (a mock)",
    "port": "APNs port (default 443)",
    "ca_file": "CA bundle to verify the server with (a mock)",
    "connections": "HTTP/2 connections (default 2)",
    "timeout": "per-push deadline, seconds (default 10)",
    "connect_timeout": "connect + TLS handshake deadline, seconds (default 10)",
    "unavailable_timeout": "seconds without a usable connection after which APNs counts as "
                           "unreachable: waiting pushes fail together (fanout run: input "
                           "pauses instead, see --on-unavailable) (default 30)",
    "ping_timeout": "a PING unanswered, or writes that cannot drain, for this many seconds "
                    "close the connection (PINGs follow 2 s of silence with pushes in "
                    "flight) (default 5)",
    "topic_guard": "BadDeviceToken/DeviceTokenNotForTopic answers in a row for one topic with "
                   "none delivered that stop the topic with config_error instead of calling "
                   "the tokens dead (wrong topic or environment); 0: off (default 100)",
    "rate": "global limit, pushes/s (default none)",
    "topic_rates": "per-topic limit, pushes/s; repeatable",
    "max_attempts": "attempts per push for 429/5xx/transport failures (default 5)",
    "delivery": "at_least_once (default) or at_most_once",
    "max_in_flight": "pushes in flight or unconsumed per stream of results (default 8192)",
    "refresh_after": "JWT age in seconds at which it is renewed (default 3000)",
    "insecure": "turn TLS certificate verification OFF (testing only; logs a warning)",
    "proxy": "HTTP CONNECT proxy http://[USER:PASSWORD@]HOST:PORT (default: HTTPS_PROXY / "
             "ALL_PROXY minus NO_PROXY; 'none' for a direct connection)",
    "retry_wrong_environment": "with [[team]] tables: a token APNs calls BadDeviceToken is "
                               "tried in the other environment, reported wrong_environment "
                               "if accepted there",
    "team_idle_timeout": "with [[team]] tables: close a team's connections after this many "
                         "seconds unused (default 300)",
}


# --------------------------------------------------------------------------- argparse


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus one flag per :class:`Settings` field, all ``default=None``."""
    g = parser.add_argument_group(
        "APNs settings (precedence: flag > APNS_* environment variable > --config file > default)"
    )
    g.add_argument("--config", metavar="FILE", default=None,
                   help=f"TOML settings file, top level or [apns] table ({CONFIG_ENV})")
    for name, field in _FIELDS.items():
        help_ = f"{_HELP[name]} ({ENV[name]})"
        if name == "topic_rates":
            g.add_argument(FLAGS[name], dest=name, action="append", default=None,
                           metavar="TOPIC=RATE", help=help_)
            continue
        kind = _base_type(field.type)
        if kind is bool:
            g.add_argument(FLAGS[name], dest=name, action="store_const", const=True,
                           default=None, help=help_)
            continue
        metavar = {"environment": "{production,sandbox}",
                   "delivery": "{at_least_once,at_most_once}"}.get(name)
        if kind in (int, float):
            g.add_argument(FLAGS[name], dest=name, type=kind, default=None, metavar=metavar,
                           help=help_)
        else:
            g.add_argument(FLAGS[name], dest=name, default=None, metavar=metavar, help=help_)


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; other types unchanged."""
    args = getattr(tp, "__args__", None)
    if args is not None and type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return tp


def _expected(tp: Any) -> str:
    base = _base_type(tp)
    if base is int:
        return "an integer"
    if base is float:
        return "a number"
    if base is str:
        return "a string"
    return "a table of topic = pushes/s" if getattr(base, "__origin__", None) is dict else str(tp)


# --------------------------------------------------------------------------- loading


def _convert(name: str, value: Any, source: str, *, strict: bool) -> Any:
    tp = _FIELDS[name].type
    try:
        return msgspec.convert(value, tp, strict=strict)
    except msgspec.ValidationError as exc:
        detail = str(exc)
        if name == "topic_rates" and "$[" in detail:
            detail = f"every rate must be a number ({detail})"
        else:
            detail = f"expected {_expected(tp)}, got {value!r}"
        raise ConfigError(f"{source}: {detail}") from None


def _parse_topic_rates(items: list[str], source: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    for item in items:
        topic, sep, rate = item.strip().rpartition("=")
        topic = topic.strip()
        if not sep or not topic:
            raise ConfigError(
                f"{source}: expected TOPIC=RATE (pushes/s), e.g. com.example.app=100, got {item!r}"
            )
        try:
            rates[topic] = msgspec.convert(rate.strip(), float, strict=False)
        except msgspec.ValidationError:
            raise ConfigError(
                f"{source}: rate of topic {topic!r} must be a number, got {rate.strip()!r}"
            ) from None
    return rates


def _load_toml(path: str, where: str) -> dict[str, Any]:
    """The TOML file at ``path``; ConfigError naming ``where`` and what is wrong."""
    import tomllib  # only with a settings file: ~2 ms of start-up otherwise (issue 19)

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{where} is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{where} is not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not valid TOML: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or type(exc).__name__}") from None
    return data


def _read_file(path: str) -> dict[str, Any]:
    where = f"config file {path}"
    data = _load_toml(path, where)

    if "apns" in data:
        table = data["apns"]
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: 'apns' must be a table ([apns]), got {table!r}")
        others = [k for k in data if k not in ("apns", "serve")]
        if others:
            known = [k for k in others if k in _FIELDS]
            if known:
                raise ConfigError(
                    f"{where}: settings are both at top level ({', '.join(known)}) and under "
                    f"[apns]; use one or the other")
            _unknown(where, others[0])
        data = table
    for key in data:
        if key not in _FIELDS and key not in ("team", "serve"):  # [serve]: fanout serve's
            _unknown(where, key)

    values: dict[str, Any] = {}
    base = os.path.dirname(os.path.abspath(path))
    for key, raw in data.items():
        if key == "serve":
            continue
        if key == "team":
            values["team"] = team_specs(raw, where, base)
            continue
        value = _convert(key, raw, f"{where}: {key}", strict=True)
        if key in _PATHS and value:
            value = _in_dir(base, value)
        values[key] = value
    return values


def _unknown(where: str, key: str) -> None:
    import difflib

    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{where}: unknown key {key!r} ({hint}known: {', '.join(_FIELDS)})")


def load_settings(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    """Merge command-line flags > ``APNS_*`` environment > ``--config`` TOML > defaults.

    ``args`` may lack any of the flags (they then count as not given). Raises ConfigError.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    config = getattr(args, "config", None) or environ.get(CONFIG_ENV) or None
    if config:
        where = f"config file {config}"
        for name, value in _read_file(config).items():
            values[name], sources[name] = value, where

    for name, var in ENV.items():
        raw = environ.get(var)
        if raw is None or raw == "" or getattr(args, name, None) is not None:
            continue  # unset, or overridden by a flag (then not even parsed)
        if name == "topic_rates":
            value = _parse_topic_rates(raw.replace(",", " ").split(), var)
        else:
            value = _convert(name, raw, var, strict=False)
            if name in _PATHS:
                value = os.path.expanduser(value)
        values[name], sources[name] = value, var

    for name, flag in FLAGS.items():
        raw = getattr(args, name, None)
        if raw is None:
            continue
        if name == "topic_rates":
            value = _parse_topic_rates(list(raw), flag)
        else:
            value = _convert(name, raw, flag, strict=False)
        values[name], sources[name] = value, flag

    settings = Settings(**values)
    _validate(settings, sources)
    return settings


def _validate(s: Settings, sources: dict[str, str]) -> None:
    def fail(name: str, message: str) -> None:
        where = sources.get(name)
        raise ConfigError(f"{message} (from {where})" if where else message)

    if s.environment not in ENVIRONMENTS:
        fail("environment", f"environment must be production or sandbox, got {s.environment!r}")
    if s.delivery not in _DELIVERIES:
        fail("delivery", f"delivery must be at_least_once or at_most_once, got {s.delivery!r}")
    if not 1 <= s.port <= 65535:
        fail("port", f"port must be within 1..65535, got {s.port}")
    for name in ("connections", "max_attempts", "max_in_flight"):
        if getattr(s, name) < 1:
            fail(name, f"{name} must be >= 1, got {getattr(s, name)}")
    if s.topic_guard < 0:
        fail("topic_guard", f"topic_guard must be >= 0, got {s.topic_guard}")
    for name in ("timeout", "connect_timeout", "refresh_after", "team_idle_timeout",
                 "unavailable_timeout", "ping_timeout"):
        value = getattr(s, name)
        if not (math.isfinite(value) and value > 0):
            fail(name, f"{name} must be a positive number of seconds, got {value!r}")
    if s.rate is not None and not (math.isfinite(s.rate) and s.rate > 0):
        fail("rate", f"rate must be a positive number of pushes/s, got {s.rate!r}")
    for topic, rate in s.topic_rates.items():
        if not topic:
            fail("topic_rates", "topic_rates: a topic must not be empty")
        if not (math.isfinite(rate) and rate > 0):
            fail("topic_rates",
                 f"topic_rates: rate of {topic!r} must be a positive number of pushes/s, "
                 f"got {rate!r}")
    if s.cert_key and not s.cert:
        fail("cert_key", "cert_key is set but cert is not: certificate auth needs --cert")


def _in_dir(base: str, path: str) -> str:
    """A path from a file, relative to that file's directory."""
    return os.path.join(base, os.path.expanduser(path))


def team_specs(raw: Any, where: str, base: str) -> list[TeamSpec]:
    """``[[team]]`` tables -> checked :class:`TeamSpec` list, paths made absolute."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'team' must be [[team]] tables, got {raw!r}"[:300])
    specs: list[TeamSpec] = []
    for i, table in enumerate(raw):
        label = table.get("name", f"#{i + 1}") if isinstance(table, dict) else f"#{i + 1}"
        try:
            spec = msgspec.convert(table, TeamSpec)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{where}: team {label}: {exc}") from None
        if not spec.topics:
            raise ConfigError(f"{where}: team {spec.name}: topics is empty")
        if not spec.cert and not (spec.key_path and spec.key_id and spec.team_id):
            raise ConfigError(f"{where}: team {spec.name}: needs key_path, key_id and "
                              "team_id (token auth), or cert (certificate auth)")
        bad = [e for e in spec.environments if e not in ENVIRONMENTS]
        if bad or not spec.environments:
            raise ConfigError(f"{where}: team {spec.name}: environments must be production "
                              f"and/or sandbox, got {spec.environments!r}")
        if spec.connections < 1:
            raise ConfigError(f"{where}: team {spec.name}: connections must be >= 1")
        if spec.rate is not None and not (math.isfinite(spec.rate) and spec.rate > 0):
            raise ConfigError(f"{where}: team {spec.name}: rate must be a positive number "
                              f"of pushes/s, got {spec.rate!r}")
        for name in _PATHS:  # the same path settings as at top level
            value = getattr(spec, name)
            if value:
                setattr(spec, name, _in_dir(base, value))
        specs.append(spec)
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{where}: two teams are named {sorted(dup)[0]!r}")
    return specs


def team_settings(settings: Settings, spec: TeamSpec, environment: str) -> Settings:
    """One team's view of ``settings`` in ``environment``: its credentials, first topic,
    connections and (mock) host, the rest shared (what ``fanout check`` tries per team)."""
    host, port = spec.host or settings.host, spec.port or settings.port
    if environment == "sandbox" and (spec.sandbox_host or spec.sandbox_port):
        host, port = spec.sandbox_host or host, spec.sandbox_port or port
    return msgspec.structs.replace(
        settings, key_path=spec.key_path, key_id=spec.key_id, team_id=spec.team_id,
        cert=spec.cert, cert_key=spec.cert_key, topic=spec.topics[0], environment=environment,
        host=host, port=port, ca_file=spec.ca_file or settings.ca_file,
        connections=spec.connections, team=[])


def add_teams_file(settings: Settings, path: str) -> None:
    """``--teams FILE``: its ``[[team]]`` tables into ``settings`` (not beside tables of
    the config file)."""
    if settings.team:
        raise ConfigError(f"--teams {path} and [[team]] tables in the config file: give the "
                          "teams in one place")
    settings.team = read_teams_file(path)


def read_teams_file(path: str) -> list[TeamSpec]:
    """``fanout run --teams FILE``: a TOML file of ``[[team]]`` tables only."""
    where = f"--teams {path}"
    data = _load_toml(path, where)
    unknown = set(data) - {"team"}
    if unknown or not data.get("team"):
        raise ConfigError(f"{where}: want [[team]] tables only"
                          + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
    return team_specs(data["team"], where, os.path.dirname(os.path.abspath(path)))


# --------------------------------------------------------------------------- building


def make_auth(settings: Settings) -> TokenAuth | CertAuth:
    """Certificate auth if ``cert`` is set, else token auth from key_path/key_id/team_id."""
    if settings.cert:
        return CertAuth(settings.cert, settings.cert_key)
    key_path, key_id, team_id = settings.key_path, settings.key_id, settings.team_id
    if not (key_path and key_id and team_id):
        missing = [name for name, value in
                   (("key_path", key_path), ("key_id", key_id), ("team_id", team_id))
                   if not value]
        flags = ", ".join(FLAGS[n] for n in missing)
        envs = ", ".join(ENV[n] for n in missing)
        keys = ", ".join(missing)
        raise ConfigError(
            f"token auth needs {flags} (or {envs}, or {keys} in the --config file), "
            f"or --cert for certificate auth")
    return TokenAuth.from_file(key_path, key_id, team_id, refresh_after=settings.refresh_after)


def make_engine(settings: Settings, **extra: Any) -> Any:
    """What ``fanout run`` sends with: a :class:`fanout.teams.TeamsEngine` when the settings
    have ``[[team]]`` tables, else one :class:`fanout.client.Client`."""
    if settings.team:
        from .teams import make_teams_engine

        return make_teams_engine(settings, **extra)
    refuse_lone_retry(settings)
    return make_client(settings, **extra)


def refuse_lone_retry(settings: Settings) -> None:
    """``retry_wrong_environment`` works through [[team]] tables (a team lists the
    environments its apps' tokens may be from); alone it would do nothing: refused."""
    if settings.retry_wrong_environment:
        raise ConfigError(
            "retry_wrong_environment needs [[team]] tables: one team for the app with "
            "environments = [\"production\", \"sandbox\"] (its key, its topics) makes a "
            "BadDeviceToken try the other environment; without them it would do nothing")


def make_client(settings: Settings, **extra: Any) -> Any:
    """A :class:`fanout.client.Client` from ``settings``; ``extra`` adds or overrides kwargs."""
    from .client import Client

    kwargs: dict[str, Any] = {
        "topic": settings.topic,
        "environment": settings.environment,
        "host": settings.host,
        "port": settings.port,
        "ca_file": settings.ca_file,
        "connections": settings.connections,
        "timeout": settings.timeout,
        "connect_timeout": settings.connect_timeout,
        "unavailable_timeout": settings.unavailable_timeout,
        "ping_timeout": settings.ping_timeout,
        "topic_guard": settings.topic_guard,
        "rate": settings.rate,
        "topic_rates": dict(settings.topic_rates) or None,
        "max_attempts": settings.max_attempts,
        "delivery": settings.delivery,
        "max_in_flight": settings.max_in_flight,
        "insecure": settings.insecure,
        "proxy": settings.proxy,
    }
    kwargs.update(extra)
    if "auth" not in kwargs:
        kwargs["auth"] = make_auth(settings)
    return Client(**kwargs)


# --------------------------------------------------------------------------- check

#: The all-zero token: well formed, belongs to no device, so APNs answers 400 BadDeviceToken.
CHECK_TOKEN = "00" * 32
_LIMIT_WAIT = 1.0  # how long to wait for the SETTINGS frame that raises the stream limit


async def check(settings: Settings) -> dict[str, Any]:
    """One background push to :data:`CHECK_TOKEN` over one connection: are the credentials,
    topic and network path good? Never raises for a configuration or transport problem:
    ``ok`` is False and ``error`` says why."""
    from .client import HOSTS
    from .payload import Notification, PushType

    token_auth = not settings.cert
    report: dict[str, Any] = {
        "ok": False,
        "environment": settings.environment,
        "host": settings.host or HOSTS.get(settings.environment),
        "port": settings.port,
        "auth": "token" if token_auth else "certificate",
        "key_id": settings.key_id if token_auth else None,
        "team_id": settings.team_id if token_auth else None,
        "topic": settings.topic,
        "answer": {"status": None, "reason": None, "outcome": None},
        "stream_limit": None,
        "jwt_age_s": None,
        "error": None,
        # what is wrong (fanout._exits): usage (settings, files), config (APNs refused the
        # set-up), unreachable (no connection), failed (another answer); None when ok
        "problem": None,
    }
    if not settings.topic:
        report["error"] = (f"check needs a topic: {FLAGS['topic']} (or {ENV['topic']}, "
                           f"or topic in the --config file)")
        report["problem"] = "usage"
        return report
    try:
        client = make_client(settings, connections=1, max_attempts=1, rate=None,
                             topic_rates=None, unavailable_timeout=settings.connect_timeout)
    except (FanoutError, OSError) as exc:
        report["error"] = str(exc)
        report["problem"] = "usage"
        return report

    client.log_config_errors = False  # the report says it: once, not twice more
    note = Notification(token=CHECK_TOKEN, payload={"aps": {"content-available": 1}},
                        push_type=PushType.BACKGROUND, priority=5, expiration=0)
    budget = settings.connect_timeout + settings.timeout + _LIMIT_WAIT + 5.0
    result = None
    try:
        with trio.fail_after(budget):
            async with client:
                result = await client.send(note)
                status, reason = result.status, result.reason
                ok = status == 200 or (status == 400 and reason == "BadDeviceToken") \
                    or status == 410
                if ok:
                    await _wait_for_limit(client)
                report["stream_limit"] = _stream_limit(client)
    except trio.TooSlowError:
        report["error"] = f"no answer from {report['host']}:{settings.port} within {budget:g} s"
        report["problem"] = "unreachable"
    except (FanoutError, OSError) as exc:
        report["error"] = str(exc)
        report["problem"] = "config" if isinstance(exc, ConfigError) else "unreachable"
    if isinstance(client.auth, TokenAuth):
        report["jwt_age_s"] = round(client.auth.age(), 3)
    if result is None:
        return report
    report["answer"] = {"status": result.status, "reason": result.reason,
                        "outcome": str(result.outcome)}
    if ok:
        report["ok"] = report["error"] is None
    elif report["error"] is None:
        if result.status is not None:
            report["error"] = client.config_error or result.error or \
                f"APNs answered {result.status} {result.reason or ''}".rstrip()
            report["problem"] = "config" if result.outcome == "config_error" or \
                result.status == 403 else "failed"
        else:
            report["error"] = result.error or f"no answer ({result.outcome})"
            report["problem"] = "config" if result.outcome == "config_error" else \
                "unreachable" if result.outcome in ("retries_exhausted", "maybe_delivered") \
                else "failed"
    return report


def _conn(client: Any) -> Any:
    conns = list(client.pool.conns) or list(client.pool.draining)
    return conns[0] if conns else None


def _stream_limit(client: Any) -> int | None:
    conn = _conn(client)
    return conn.remote_max_streams if conn is not None else None


async def _wait_for_limit(client: Any) -> None:
    """After the first authenticated answer APNs raises the limit from 1 with a SETTINGS
    frame that may arrive just after the answer: give it a moment."""
    with trio.move_on_after(_LIMIT_WAIT):
        while True:
            limit = _stream_limit(client)
            if limit is not None and limit > 1:
                return
            await trio.sleep(0.01)
