"""``fanout mock`` and ``fanout mock-credentials``: the mock APNs as a command, one flag per
:class:`~fanout.testing.mock.MockConfig` field, its stats (``GET /stats``, ``--stats-file``,
a line at exit), and throwaway credentials for tests in any language (docs/mock.md).
Kept apart from :mod:`fanout._cli`, as the daemon's and the server's commands are."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._exits import EXIT_FORCED, EXIT_OK
from ..errors import ConfigError
from ..payload import ENVIRONMENTS

if TYPE_CHECKING:
    from .mock import MockConfig, MockStats


def _mock_config(args: argparse.Namespace) -> MockConfig:
    """The :class:`MockConfig` of ``fanout mock``'s flags (a flag not given: MockConfig's
    default). Inconsistent flags are a :class:`ConfigError` (exit 2)."""
    import re

    from ..auth import TokenAuth
    from .mock import MockConfig

    paths, ids = args.key_path or [], args.key_id or []
    if len(paths) > len(ids):
        path = paths[len(ids)]
        named = re.fullmatch(r"AuthKey_([A-Za-z0-9]+)\.p8", Path(path).name)
        hint = f"; its file name says --key-id {named[1]}" if named else ""
        raise ConfigError(
            f"--key-path {path} needs its --key-id (the key's id, as in AuthKey_<KEYID>.p8):"
            f" without it no JWT can be verified{hint}")
    if len(ids) > len(paths):
        raise ConfigError(f"--key-id {ids[len(paths)]} needs its --key-path (the .p8 key"
                          " whose public half verifies the JWTs)")
    keys = {}
    for path, key_id in zip(paths, ids, strict=True):
        auth = TokenAuth.from_file(path, key_id, args.team_id or "TEAM000000")
        keys[auth.key_id] = auth.public_key()
    if args.goaway_last_stream_low and args.goaway_after is None:
        raise ConfigError("--goaway-last-stream-low needs --goaway-after (when to send it)")
    given: dict[str, Any] = {
        name: value for name, value in (
            ("topics", _topics(args.topics)), ("token_max_age", args.token_max_age),
            ("token_update_min_interval", args.token_update_min_interval),
            ("initial_max_streams", args.initial_max_streams),
            ("retry_after", args.retry_after),
            ("unregistered", _token_set(args.unregistered_tokens)),
            ("token_topic", args.token_topic), ("goaway_reason", args.goaway_reason),
            ("never_answer", args.never_answer), ("seed", args.seed),
            ("max_channels", args.max_channels), ("stop_reading_after", args.stop_reading_after),
            ("server_ping_interval", args.server_ping_interval),
            ("initial_window_size", args.initial_window_size),
            ("expire_token_once_after", args.expire_token_once_after),
        ) if value is not None
    }
    return MockConfig(team_id=args.team_id, keys=keys, validate=not args.accept_all,
                      latency=args.latency, jitter=args.jitter,
                      unregistered_fraction=args.unregistered_fraction,
                      bad_token_fraction=args.bad_token_fraction,
                      penalty_accepts=args.penalty_accepts,
                      environment=args.environment,
                      sandbox_token_fraction=args.sandbox_token_fraction,
                      p429=args.p429, p500=args.p500, p503=args.p503,
                      goaway_after=args.goaway_after, close_after=args.close_after,
                      max_streams=args.max_streams,
                      bind_key_to_connection=not args.allow_key_change,
                      drop_to_one_on_reject=not args.keep_limit_on_reject,
                      goaway_last_stream_low=args.goaway_last_stream_low,
                      expired_token_wedge=args.expired_token_wedge,
                      alpn=not args.no_alpn, broadcast_enabled=not args.no_broadcast,
                      path="fast" if args.fast else args.path, **given)


def _topics(values: list[str] | None) -> set[str] | None:
    """``--topics a,b --topics c``: {a, b, c}."""
    if values is None:
        return None
    topics = {t.strip() for value in values for t in value.split(",") if t.strip()}
    if not topics:
        raise ConfigError("--topics needs at least one bundle id")
    return topics


def _token_set(path: str | None) -> set[str] | None:
    """The device tokens of a file, one a line (blank lines skipped)."""
    if path is None:
        return None
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}


async def _mock_main(args: argparse.Namespace) -> int:
    from .devcerts import ensure_pki
    from .mock import MockAPNs

    config = _mock_config(args)
    pki = ensure_pki(Path(args.pki_dir))
    mock = MockAPNs(config, pki)
    code = EXIT_OK
    try:
        # SIGTERM and SIGINT stop serving cleanly (and the stats file is written); a
        # KeyboardInterrupt before they are caught here goes through the finally too
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(mock.serve, args.host, args.port)
                if args.port_file:
                    tmp = Path(args.port_file + ".tmp")
                    tmp.write_text(str(port))
                    tmp.replace(args.port_file)
                print(f"mock APNs listening on {args.host}:{port} (CA {pki.ca_file};"
                      " GET /stats for what it saw)", file=sys.stderr, flush=True)
                async for signum in signals:
                    code = EXIT_FORCED if signum == signal.SIGINT else EXIT_OK
                    break
                nursery.cancel_scope.cancel()
    finally:
        if args.stats_file:
            _write_mock_stats(args.stats_file, mock.stats)
        if mock.port:  # it listened
            paths = ", ".join(f"{n} on its {path} path" for path, n in sorted(mock.paths.items()))
            print(f"fanout mock: {_mock_summary_line(mock.stats)}"
                  + (f" (connections: {paths})" if paths else ""), file=sys.stderr, flush=True)
    return code


def _mock_summary_line(stats: MockStats) -> str:
    """``3 connections, 120 requests, 118 delivered, 1 JWT; status 200: 118, 410: 2;
    Unregistered: 2`` (and the faults that happened)."""
    s = stats.summary()
    line = (f"{_plural(s['connections'], 'connection')}, {_plural(s['requests'], 'request')}, "
            f"{s['delivered']} delivered, {_plural(s['jwts'], 'JWT')}")
    if s["by_status"]:
        line += "; status " + ", ".join(f"{k}: {n}" for k, n in s["by_status"].items())
    if s["by_reason"]:
        line += "; " + ", ".join(f"{k}: {n}" for k, n in s["by_reason"].items())
    faults = [f"{s[k]} {k.replace('_', ' ')}" for k in
              ("never_answered", "goaways_sent", "closes", "protocol_errors") if s[k]]
    return line + ("; " + ", ".join(faults) if faults else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _write_mock_stats(path: str, stats: MockStats) -> None:
    """``path`` (atomically: ``path``.tmp, then a rename) as JSON: what the mock saw, in
    numbers (:meth:`MockStats.summary`, the body of ``GET /stats``; JWT digests counted,
    never written)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(stats.summary()) + "\n")
    tmp.replace(path)


async def _mock_credentials_main(args: argparse.Namespace) -> int:
    """``fanout mock-credentials DIR``: a fresh ``AuthKey_<KEYID>.p8`` and the mock's PKI
    (kept if DIR has one), described as one JSON line."""
    import secrets
    import string

    from .devcerts import ensure_pki, make_signing_key

    alphabet = string.ascii_uppercase + string.digits
    ids = {}
    for field in ("key_id", "team_id"):
        value = getattr(args, field) or "".join(secrets.choice(alphabet) for _ in range(10))
        if not (value.isascii() and value.isalnum()):
            raise ConfigError(f"--{field.replace('_', '-')} must be letters and digits,"
                              f" got {value!r}")
        ids[field] = value
    directory = Path(args.directory).resolve()
    pki = ensure_pki(directory)
    key = make_signing_key(directory, ids["key_id"], ids["team_id"])
    print(json.dumps({"key_id": key.key_id, "team_id": key.team_id, "key_path": str(key.path),
                      "ca_file": str(pki.ca_file), "pki_dir": str(directory),
                      "mock_args": ["--pki-dir", str(directory), "--key-path", str(key.path),
                                    "--key-id", key.key_id, "--team-id", key.team_id]}),
          flush=True)
    return EXIT_OK


# --------------------------------------------------------------------------- main


def add_mock_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                    common: argparse.ArgumentParser) -> None:
    """Add ``fanout mock`` and ``fanout mock-credentials`` to the subcommands ``sub``."""
    mock = sub.add_parser("mock", parents=[common], help="run the mock APNs server",
                          description="A validating, fault-injecting mock APNs (TLS + HTTP/2) "
                                      "for any client's tests. GET /stats on its port answers "
                                      "what it saw as JSON (DELETE /stats: the same, then "
                                      "reset). See docs/mock.md.")
    mock.set_defaults(func=_mock_main)
    mock.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    mock.add_argument("--port", type=int, default=8443, help="port (default 8443; 0: any free one, see --port-file)")
    mock.add_argument("--port-file", help="write the bound port here once listening")
    mock.add_argument("--pki-dir", default="./mock-pki", help="CA and server cert (made if absent)")
    mock.add_argument("--path", choices=("h2", "fast"), default="h2",
                      help="HTTP/2 implementation: h2 (the h2 library, the default) or fast "
                           "(hand-written, ~10x less CPU per request, same checks, faults and "
                           "stats; a connection opened while --goaway-after, --close-after, "
                           "--stop-reading-after, --server-ping-interval or "
                           "--initial-window-size is set is served by h2)")
    mock.add_argument("--fast", action="store_true", help="the same as --path fast")
    auth = mock.add_argument_group("provider tokens (JWT)")
    auth.add_argument("--key-path", action="append",
                      help=".p8 key whose public half verifies JWTs (needs --key-id; repeat "
                           "both for more keys: they pair in order)")
    auth.add_argument("--key-id", action="append", help="the key id of the --key-path in the same place")
    auth.add_argument("--team-id", help="the team id JWTs must carry (default: any)")
    auth.add_argument("--token-max-age", type=float, metavar="SECONDS",
                      help="a JWT older than this gets 403 ExpiredProviderToken (default 3600)")
    auth.add_argument("--token-update-min-interval", type=float, metavar="SECONDS",
                      help="a new JWT on a connection sooner than this after its previous one "
                           "gets 429 TooManyProviderTokenUpdates (default 0: no limit; APNs: 1200)")
    auth.add_argument("--allow-key-change", action="store_true",
                      help="a connection may switch keys (default: a JWT of another key than "
                           "the connection's first gets 403 UnrelatedKeyIdInToken, as on APNs)")
    auth.add_argument("--expired-token-wedge", action="store_true",
                      help="after an ExpiredProviderToken, every later push on that connection "
                           "gets the same answer")
    auth.add_argument("--expire-token-once-after", type=int, metavar="N",
                      help="after N answers 200 (all connections), the next push with a good "
                           "JWT gets 403 ExpiredProviderToken, once")
    checks = mock.add_argument_group("validation")
    checks.add_argument("--accept-all", action="store_true", help="no validation (benchmarks)")
    checks.add_argument("--topics", action="append", metavar="BUNDLE_IDS",
                        help="allowed bundle ids, comma-separated (repeatable); the push type's "
                             "suffix is required after them (liveactivity: "
                             "<id>.push-type.liveactivity ...), else 400 "
                             "TopicDisallowed/BadTopic (default: any topic)")
    checks.add_argument("--token-topic", metavar="BUNDLE_ID",
                        help="the app every device token belongs to: a push to another topic "
                             "gets 400 DeviceTokenNotForTopic")
    checks.add_argument("--unregistered-tokens", metavar="FILE",
                        help="device tokens (one a line) answered 410 Unregistered")
    checks.add_argument("--unregistered-fraction", type=float, default=0.0, help="fraction of tokens answered 410 Unregistered")
    checks.add_argument("--bad-token-fraction", type=float, default=0.0,
                        help="fraction of tokens answered 400 BadDeviceToken (drops the "
                             "stream limit to 1 until the next 200)")
    checks.add_argument("--environment", choices=ENVIRONMENTS, default="production",
                        help="the environment this mock stands for (see --sandbox-token-fraction)")
    checks.add_argument("--sandbox-token-fraction", type=float, default=0.0,
                        help="fraction of tokens that are sandbox tokens (by hash; 1.0: all); a "
                             "token of the other environment is answered 400 BadDeviceToken")
    checks.add_argument("--no-broadcast", action="store_true",
                        help="the app has no Broadcast Capability: channel management and "
                             "broadcasts get 400 FeatureNotEnabled")
    checks.add_argument("--max-channels", type=int, metavar="N",
                        help="broadcast channels per bundle id (default 10000); one more gets "
                             "400 CannotCreateChannelConfig")
    limits = mock.add_argument_group("stream limits")
    limits.add_argument("--initial-max-streams", type=int, metavar="N",
                        help="SETTINGS_MAX_CONCURRENT_STREAMS at connect, until the first "
                             "authenticated answer (default 1, as APNs)")
    limits.add_argument("--max-streams", type=int, default=1000, help="SETTINGS_MAX_CONCURRENT_STREAMS once authenticated (default 1000)")
    limits.add_argument("--keep-limit-on-reject", action="store_true",
                        help="do not drop the stream limit to 1 after a rejected push "
                             "(default: drop, as APNs)")
    limits.add_argument("--penalty-accepts", type=int, default=1,
                        help="accepted pushes needed before a dropped stream limit is restored")
    limits.add_argument("--initial-window-size", type=int, metavar="BYTES",
                        help="SETTINGS_INITIAL_WINDOW_SIZE, and stream windows are never "
                             "reopened: a request body larger than this never completes")
    faults = mock.add_argument_group("faults")
    faults.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    faults.add_argument("--jitter", type=float, default=0.0, help="up to this many seconds more, at random")
    faults.add_argument("--p429", type=float, default=0.0, help="probability of 429 TooManyRequests per push")
    faults.add_argument("--p500", type=float, default=0.0, help="probability of 500 InternalServerError per push")
    faults.add_argument("--p503", type=float, default=0.0, help="probability of 503 ServiceUnavailable per push")
    faults.add_argument("--retry-after", type=int, metavar="SECONDS",
                        help="429 and 503 answers carry retry-after: SECONDS")
    faults.add_argument("--never-answer", type=float, metavar="FRACTION",
                        help="fraction of pushes never answered (their streams stay open)")
    faults.add_argument("--seed", type=int,
                        help="seed of the random faults (--p429/--p500/--p503, --never-answer, "
                             "--jitter): the same seed replays the same run (default 0)")
    faults.add_argument("--goaway-after", type=int, help="send GOAWAY after this many streams per connection")
    faults.add_argument("--goaway-reason", metavar="REASON",
                        help="the reason in the GOAWAY's debug data (default Shutdown)")
    faults.add_argument("--goaway-last-stream-low", action="store_true",
                        help="the GOAWAY's last-stream-id is below the last streams received "
                             "(up to 10), which are never answered: a client must resend them "
                             "(needs --goaway-after)")
    faults.add_argument("--close-after", type=int, help="drop each connection after this many streams")
    faults.add_argument("--stop-reading-after", type=int, metavar="N",
                        help="each connection stops reading its socket after N requests (0: "
                             "right after the TLS handshake); it still answers and writes")
    faults.add_argument("--server-ping-interval", type=float, metavar="SECONDS",
                        help="send an HTTP/2 PING on every connection every SECONDS")
    faults.add_argument("--no-alpn", action="store_true",
                        help="TLS without ALPN h2 (a correct client refuses to talk)")
    mock.add_argument("--stats-file", metavar="PATH",
                      help="on exit (SIGTERM, SIGINT or the end) write what the mock saw here "
                           "as JSON (what GET /stats answers): requests, delivered, by_status, "
                           "by_reason, jwts (distinct provider tokens), connections ...; "
                           "atomically (PATH.tmp, then a rename)")
    creds = sub.add_parser("mock-credentials", parents=[common],
                           help="write throwaway credentials for the mock: a .p8 key and its CA",
                           description="Write AuthKey_<KEYID>.p8 (a fresh ES256 key, mode 0600) "
                                       "and the mock's CA and server certificate (ca.pem, kept "
                                       "if DIR has them) into DIR, and print the key id, team "
                                       "id, paths and the fanout mock arguments as JSON.")
    creds.add_argument("directory", metavar="DIR", help="where to write them (created if absent)")
    creds.add_argument("--key-id", help="the key id (default: 10 random letters and digits)")
    creds.add_argument("--team-id", help="the team id (default: 10 random letters and digits)")
    creds.set_defaults(func=_mock_credentials_main)
