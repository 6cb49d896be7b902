"""``fanout serve``'s own options, each from (first found) its flag, its ``FANOUT_*``
variable, the ``[serve]`` table of the ``--config`` file, or its default; like the APNs
settings (:mod:`fanout.config`), a wrong value is a ConfigError naming where it came from.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .http import Limits

_D = Limits()


class Option:
    __slots__ = ("name", "kind", "default", "help", "metavar", "env")

    def __init__(self, name: str, kind: type, default: Any, help: str,
                 metavar: str | None = None, env: str | None = None) -> None:
        self.name, self.kind, self.default, self.help = name, kind, default, help
        self.metavar = metavar
        self.env = env or "FANOUT_" + name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: list[Option] = [
    Option("listen", str, "127.0.0.1:8080", "address to serve on", "HOST:PORT"),
    Option("api_keys", str, None, "API keys, one per line: the key or sha256:HEX "
           "(--hash-key), then name=, rate= (pushes/s), topics= (keys also from "
           "FANOUT_API_KEYS)", "FILE", env="FANOUT_API_KEYS_FILE"),
    Option("tls_cert", str, None, "serve TLS (h2 chosen by ALPN) with this certificate",
           "FILE"),
    Option("tls_key", str, None, "the certificate's private key", "FILE"),
    Option("behind_tls_proxy", bool, False, "bind a non-loopback address without TLS: a "
           "proxy in front terminates it"),
    Option("max_body", int, _D.max_body, "largest whole body", "BYTES"),
    Option("max_stream_body", int, _D.max_stream_body, "largest /v1/pushes body", "BYTES"),
    Option("max_line", int, _D.max_line, "largest NDJSON line", "BYTES"),
    Option("max_tokens", int, _D.max_tokens, "pushes one request may hold"),
    Option("max_requests", int, _D.max_requests, "push and channel requests in progress at "
           "once, all connections together; beyond, 429"),
    Option("max_streams", int, 100, "HTTP/2 streams per connection"),
    Option("max_connections", int, _D.max_connections, "client connections open at once; "
           "requests on one opened beyond are answered 429"),
    Option("body_timeout", float, _D.body_timeout, "wait for each piece of a body (408)",
           "SECONDS"),
    Option("header_timeout", float, 10.0, "a connection idle (or its headers incomplete) "
           "this long is closed", "SECONDS"),
    Option("push_timeout", float, _D.push_timeout, "/v1/push waits this long for APNs (504)",
           "SECONDS"),
    Option("drain_timeout", float, 30.0, "SIGTERM: pushes in flight get this long to be "
           "answered", "SECONDS"),
    Option("to", str, None, "durable mode: add each accepted push to this Redis Stream "
           "(fanout run --source reads it) and answer 202 with its entry id",
           "redis://HOST:PORT/STREAM"),
    Option("max_backlog", int, 100_000, "--to: while the stream holds more entries, adding "
           "waits up to --push-timeout, then 503", "ENTRIES"),
    Option("la_budget", int, 50, "priority-10 Live Activity pushes per activity per hour"),
]
BY_NAME = {o.name: o for o in OPTIONS}
POSITIVE = ("max_body", "max_stream_body", "max_line", "max_tokens", "max_requests",
            "max_connections",
            "max_streams", "max_backlog", "body_timeout", "header_timeout", "push_timeout")


def add_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "serve options (precedence: flag > FANOUT_* variable > [serve] in --config > default)")
    for o in OPTIONS:
        shown = "" if o.default is None or o.kind is bool else f"; default {o.default:,}" \
            if isinstance(o.default, int) else f"; default {o.default}"
        text = f"{o.help} ({o.env}{shown})"
        if o.kind is bool:
            g.add_argument(o.flag, dest=o.name, action="store_const", const=True,
                           default=None, help=text)
        else:
            g.add_argument(o.flag, dest=o.name, type=o.kind, default=None,
                           metavar=o.metavar or "N", help=text)


def _convert(o: Option, raw: Any, where: str) -> Any:
    if o.kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if o.kind is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: expected a string, got {raw!r}")
        return raw
    if isinstance(raw, bool):
        raise ConfigError(f"{where}: expected a number, got {raw!r}")
    try:
        value = o.kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {'an integer' if o.kind is int else 'a number'}"
                          f", got {raw!r}") from None
    if isinstance(raw, float) and o.kind is int and raw != value:
        raise ConfigError(f"{where}: expected an integer, got {raw!r}")
    return value


def _table(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    from ..config import CONFIG_ENV, _load_toml

    path = getattr(args, "config", None) or environ.get(CONFIG_ENV) or None
    if not path:
        return {}, ""
    where = f"config file {path}"
    table = _load_toml(path, where).get("serve", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: 'serve' must be a table ([serve]), got {table!r}")
    base = os.path.dirname(os.path.abspath(path))
    for key, value in table.items():
        if key not in BY_NAME:
            close = difflib.get_close_matches(key, list(BY_NAME), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: [serve] has no key {key!r} ({hint}known: "
                              f"{', '.join(BY_NAME)})")
        if key in ("api_keys", "tls_cert", "tls_key") and isinstance(value, str):
            table[key] = os.path.join(base, os.path.expanduser(value))
    return table, f"{where} [serve]"


def resolve(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> None:
    """Set every option on ``args``: flag, else variable, else [serve], else default."""
    table, where = _table(args, environ)
    for o in OPTIONS:
        value = getattr(args, o.name, None)
        source = o.flag
        if value is None and environ.get(o.env):
            value, source = _convert(o, environ[o.env], o.env), o.env
        elif value is None and o.name in table:
            value, source = _convert(o, table[o.name], f"{where}: {o.name}"), where
        elif value is None:
            value = o.default
        if o.name in POSITIVE and not value > 0:
            raise ConfigError(f"{o.name} must be more than 0, got {value!r} (from {source})")
        setattr(args, o.name, value)
