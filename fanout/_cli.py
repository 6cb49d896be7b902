"""Command line: ``fanout demo``, ``send``, ``check``, ``channels``, ``enqueue``; ``run``
(:mod:`fanout._daemon.command`), ``serve`` (:mod:`fanout._serve.command`) and ``mock``
(:mod:`fanout.testing.command`) register themselves. APNs settings come from
:mod:`fanout.config`."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ._exits import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_FORCED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    exit_code,
    is_unreachable,
    most_serious,
)
from .config import add_settings_args, check, load_settings, make_client
from .errors import ConfigError, FanoutError, TransportError, ValidationError

if TYPE_CHECKING:
    pass

log = logging.getLogger("fanout")

_Subcommands = argparse._SubParsersAction  # what add_subparsers() returns


# --------------------------------------------------------------------------- progress

class Progress:
    """Counts results; draws a live line on a TTY (stderr), stays quiet otherwise."""

    def __init__(self, total: int | None, stream: Any = sys.stderr) -> None:
        self.total = total
        self.counts: dict[str, int] = {}
        self.latencies: list[float] = []
        self.done = 0
        self.resent = 0        # sent again after a timeout or lost connection: maybe twice
        self.unreachable = 0   # ended because APNs could not be reached
        self.last_error: str | None = None
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self._stream = stream
        self._tty = stream.isatty()
        self._last_draw = 0.0

    def add(self, result: Any) -> None:
        key = str(result.outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.done += 1
        if result.latency_ms is not None:
            self.latencies.append(result.latency_ms)
        if result.resent:
            self.resent += 1
        if key != "delivered" and key != "invalid_token":
            self.last_error = result.error or result.reason or key
            if is_unreachable(result):
                self.unreachable += 1
        if self._tty and self.done & 255 == 0:
            now = time.perf_counter()
            if now - self._last_draw > 0.2:
                self._last_draw = now
                self.draw(now)

    def draw(self, now: float | None = None) -> None:
        now = now or time.perf_counter()
        rate = self.done / max(now - self.start, 1e-9)
        total = f"/{self.total:,}" if self.total else ""
        counts = " ".join(f"{k}={v:,}" for k, v in sorted(self.counts.items()))
        self._stream.write(f"\r{self.done:,}{total} pushes  {rate:,.0f}/s  {counts}\x1b[K")
        self._stream.flush()

    def summary(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.start
        cpu = time.process_time() - self.cpu_start
        if self._tty:
            self.draw()
            self._stream.write("\n")
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None
        return {
            "pushes": self.done,
            "counts": dict(sorted(self.counts.items())),
            "resent": self.resent,
            "seconds": round(seconds, 3),
            "pushes_per_s": round(self.done / seconds, 1) if seconds else None,
            "client_cpu_us_per_push": round(cpu / self.done * 1e6, 1) if self.done else None,
            "latency_ms_p50": pct(0.50),
            "latency_ms_p99": pct(0.99),
        }


# --------------------------------------------------------------------------- send

def _payload_from_args(args: argparse.Namespace) -> Any:
    if args.payload:
        data = sys.stdin.buffer.read() if args.payload == "-" else Path(args.payload).read_bytes()
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ValidationError("payload", f"{args.payload} is not JSON: {exc}") from None
    aps: dict[str, Any] = {}
    if args.title or args.body:
        aps["alert"] = {k: v for k, v in (("title", args.title), ("body", args.body)) if v}
    if args.badge is not None:
        aps["badge"] = args.badge
    if args.sound:
        aps["sound"] = args.sound
    if args.content_available:
        aps["content-available"] = 1
    for key, value in (("category", args.category), ("thread-id", args.thread_id),
                       ("interruption-level", args.interruption_level)):
        if value:
            aps[key] = value
    if args.mutable_content:
        aps["mutable-content"] = 1
    if not aps:
        raise ValidationError("payload", "give --payload FILE or --title/--body/--badge/--sound"
                                         "/--content-available")
    return {"aps": aps}


def _background_only(args: argparse.Namespace) -> bool:
    """``--content-available`` with nothing a user sees: a background push (Apple: push
    type background, priority 5; priority 10 is refused for it)."""
    return bool(args.content_available and not args.payload and not (
        args.title or args.body or args.sound or args.badge is not None or args.category
        or args.mutable_content or args.interruption_level))


class TokenLines:
    """The tokens of a file (or stdin), one per line; a line that is not UTF-8 is reported
    by its number and skipped (the pushes around it go on), never a traceback."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.skipped = 0

    def __iter__(self) -> Iterator[str]:
        where = "stdin" if self.path == "-" else self.path
        stream = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")  # noqa: SIM115
        with stream:
            for number, raw in enumerate(stream, 1):
                try:
                    token = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    self.skipped += 1
                    print(f"fanout send: {where} line {number}: not UTF-8 text; skipped",
                          file=sys.stderr, flush=True)
                    continue
                if token and not token.startswith("#"):
                    yield token


async def _send_main(args: argparse.Namespace) -> int:
    from .config import add_teams_file, refuse_lone_retry

    settings = load_settings(args)
    if args.teams:
        add_teams_file(settings, args.teams)
    if not settings.team:
        refuse_lone_retry(settings)
    payload = _payload_from_args(args)
    progress = Progress(None)
    push_type, priority = args.push_type, args.priority
    if _background_only(args):
        push_type = push_type or "background"
        priority = priority if priority is not None else 5
    options = {k: v for k, v in (("push_type", push_type), ("priority", priority),
                                 ("expiration", args.expiration),
                                 ("collapse_id", args.collapse_id)) if v is not None}
    invalid_out = open(args.invalid_tokens, "a", encoding="utf-8") if args.invalid_tokens else None  # noqa: SIM115
    sent: dict[str, Any] = {}

    def on_invalid(token: str, reason: str | None, timestamp: int | None) -> None:
        if invalid_out:
            invalid_out.write(json.dumps({"token": token, "reason": reason,
                                          "timestamp": timestamp}) + "\n")

    try:
        if settings.team:  # [[team]] tables: through the team serving --topic
            sent = await _send_teams(args, settings, payload, options, progress, on_invalid)
        else:
            async with make_client(settings, on_invalid_token=on_invalid) as client:
                if args.channel:  # a broadcast to every device subscribed to the channel
                    _broadcast_result(progress, await client.broadcast(
                        args.channel, payload, priority=args.priority or 10,
                        expiration=0 if args.expiration is None else args.expiration))
                else:
                    lines = TokenLines(args.tokens)
                    async for result in client.fan_out(payload, lines, **options):
                        progress.add(result)
                    sent["skipped_lines"] = lines.skipped
                sent["config_error"] = client.config_error
    finally:
        if invalid_out:
            invalid_out.close()
    summary = progress.summary()
    summary.update((k, v) for k, v in sent.items() if v or k == "wrong_environment")
    print(json.dumps(summary), flush=True)
    return _exit(args, progress, sent.get("config_error"))


async def _send_teams(args: argparse.Namespace, settings: Any, payload: Any,
                      options: dict[str, Any], progress: Progress,
                      on_invalid: Callable[[str, str | None, int | None], None]
                      ) -> dict[str, Any]:
    """``fanout send`` with ``[[team]]`` tables: the team serving ``--topic`` sends, in
    ``--environment`` (and, with ``--retry-wrong-environment``, a BadDeviceToken is tried
    in its other one); what the summary adds: team, environment, skipped lines, the
    team's configuration error, and with retries the count of ``wrong_environment``."""
    import msgspec

    from .payload import bundle_of
    from .teams import Team, Teams, make_teams_engine

    # routing first, over every table (no credentials read): only the chosen team's are
    routes = Teams([Team(spec.name, None, set(spec.topics), environments=tuple(
        spec.environments)) for spec in settings.team])
    topic, env = settings.topic, settings.environment
    if not topic:
        raise ConfigError("with [[team]] tables, send needs --topic (the app's bundle id: it "
                          f"picks the team; served: {routes.served_topics()})")
    chosen = routes.team_for(topic)
    if chosen is None:
        raise ConfigError(f"no [[team]] serves topic {topic!r} (--topic); served: "
                          f"{routes.served_topics()}")
    if env not in chosen.environments:
        raise ConfigError(f"team {chosen.name} does not send to {env} (its environments: "
                          f"{', '.join(chosen.environments)})")
    spec = next(spec for spec in settings.team if spec.name == chosen.name)
    router = make_teams_engine(msgspec.structs.replace(settings, team=[spec]),
                               on_invalid_token=on_invalid)
    team = router.teams[0]
    out: dict[str, Any] = {"team": team.name, "environment": env}
    async with router:
        if args.channel:
            client = await router.client_for(team, env)
            result = await client.broadcast(
                args.channel, payload, bundle_id=bundle_of(topic),
                priority=args.priority or 10,
                expiration=0 if args.expiration is None else args.expiration)
            result.team, result.environment = team.name, env
            _broadcast_result(progress, result)
        else:
            lines = TokenLines(args.tokens)
            wrong = 0
            async for result in router.fan_out(payload, lines, topic=topic, environment=env,
                                               **options):
                progress.add(result)
                wrong += result.wrong_environment
            out["skipped_lines"] = lines.skipped
            if router._retries(team):
                out["wrong_environment"] = wrong
        out["config_error"] = next((c.config_error for c in router.clients_by_team()[team.name]
                                    if c.config_error), None)
    return out


def _broadcast_result(progress: Progress, result: Any) -> None:
    progress.add(result)
    if not result.ok:
        print(f"fanout send: broadcast {result.outcome}: {result.reason or ''} "
              f"{result.error or ''}".rstrip(), file=sys.stderr)


def _exit(args: argparse.Namespace, progress: Progress, config_error: str | None) -> int:
    """The exit code (fanout._exits) and, when it is not 0, a one-line reason on stderr."""
    code = exit_code(progress.counts, unreachable=progress.unreachable,
                     config_error=bool(config_error))
    if code != EXIT_OK:
        failed = ", ".join(f"{k}={v}" for k, v in sorted(progress.counts.items())
                           if k not in ("delivered", "invalid_token"))
        why = config_error if code == EXIT_CONFIG and config_error else progress.last_error
        print(f"fanout {args.command}: {failed} of {progress.done}: {why}", file=sys.stderr,
              flush=True)
    return code


# --------------------------------------------------------------------------- check

async def _check_main(args: argparse.Namespace) -> int:
    from .config import add_teams_file, team_settings

    settings = load_settings(args)
    if args.teams:
        add_teams_file(settings, args.teams)
    # with [[team]] tables: every team, in every environment it sends to, one line each
    targets = [(None, settings)] if not settings.team else [
        (spec.name, team_settings(settings, spec, env))
        for spec in settings.team for env in spec.environments]
    codes: list[int] = []
    for team, one in targets:
        report = await check(one)
        if team is not None:
            report = {"team": team, **report}
        print(json.dumps(report), flush=True)
        if not report["ok"]:
            codes.append(_CHECK_EXIT[report["problem"]])
            who = f"team {team} ({one.environment}): " if team is not None else ""
            print(f"fanout check: not ok: {who}{report['error']}", file=sys.stderr, flush=True)
    return most_serious(codes)


# the exit code of each problem fanout.config.check() names
_CHECK_EXIT = {"usage": EXIT_USAGE, "config": EXIT_CONFIG, "unreachable": EXIT_UNREACHABLE,
               "failed": EXIT_FAILED}


# --------------------------------------------------------------------------- demo

async def _demo_main(args: argparse.Namespace) -> int:
    from .testing.devcerts import make_pki, make_signing_key

    with tempfile.TemporaryDirectory(prefix="fanout-demo-") as tmp:
        tmpdir = Path(tmp)
        pki = make_pki(tmpdir)
        key = make_signing_key(tmpdir)
        port_file = tmpdir / "port"
        cmd = [sys.executable, "-m", "fanout", "mock", "--pki-dir", str(tmpdir),
               "--key-path", str(key.path), "--key-id", key.key_id, "--team-id", key.team_id,
               "--port", "0", "--port-file", str(port_file),
               "--latency", str(args.latency), "--unregistered-fraction", str(args.unregistered),
               "--path", args.mock_path]
        print(f"fanout demo: starting the mock APNs (TLS + HTTP/2 on 127.0.0.1, its "
              f"{args.mock_path} path, {args.latency * 1000:g} ms latency, "
              f"{args.unregistered:.0%} unregistered tokens)", file=sys.stderr)
        mock = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            with trio.fail_after(30):
                while not port_file.exists() or not port_file.read_text().strip():
                    if mock.poll() is not None:
                        raise FanoutError(f"the mock exited with code {mock.returncode}")
                    await trio.sleep(0.05)
            port = int(port_file.read_text())
            progress = Progress(args.count)
            await demo_fan_out(port, str(pki.ca_file), str(key.path), key.key_id, key.team_id,
                               args.count, args.connections, progress=progress)
            summary = progress.summary()
        finally:
            mock_cpu = _stop_child(mock)
    summary["mock_path"] = args.mock_path
    if mock_cpu is not None and progress.done:  # the mock's own CPU, its start-up included
        summary["mock_cpu_us_per_push"] = round(mock_cpu / progress.done * 1e6, 1)
    print(json.dumps(summary), flush=True)
    return _exit(args, progress, None)


async def demo_fan_out(port: int, ca_file: str, key_path: str, key_id: str, team_id: str,
                       count: int, connections: int, *, progress: Progress | None = None,
                       quiet: bool = False) -> dict[str, Any]:
    """The demo's fan-out: one payload to ``count`` random tokens at 127.0.0.1:``port``;
    returns its summary (``quiet``: no start line). bench/demo_rate.py runs it against
    nginx beside ``fanout demo``."""
    from .auth import TokenAuth
    from .client import Client

    auth = TokenAuth.from_file(key_path, key_id, team_id)
    if progress is None:
        progress = Progress(count)  # draws only on a TTY
    tokens = (os.urandom(32).hex() for _ in range(count))
    if not quiet:
        print(f"fanout demo: {count:,} pushes over {connections} connections "
              f"to 127.0.0.1:{port}", file=sys.stderr)
    async with Client(auth=auth, topic="com.example.fanout.demo", host="127.0.0.1",
                      port=port, ca_file=ca_file, connections=connections) as client:
        async for result in client.fan_out({"aps": {"alert": {"title": "fanout",
                                                              "body": "Hello!"}}}, tokens):
            progress.add(result)
    return progress.summary()


async def _channels_main(args: argparse.Namespace) -> int:
    from .channels import ChannelError
    from .config import make_auth

    settings = load_settings(args)
    from .channels import Channels

    if not settings.topic:
        raise ConfigError("channels need --topic (the app's bundle id)")
    custom = settings.host is not None
    async with Channels(auth=make_auth(settings), bundle_id=settings.topic,
                        environment=settings.environment,
                        host=args.manage_host or (settings.host if custom else None),
                        port=args.manage_port or (settings.port if custom else None),
                        ca_file=settings.ca_file, proxy=settings.proxy) as channels:
        try:
            if args.action == "create":
                ch = await channels.create(args.policy)
                out: Any = {"channel_id": ch.channel_id,
                            "message_storage_policy": ch.message_storage_policy}
            elif args.action == "list":
                out = {"channels": await channels.list()}
            elif args.action == "show":
                ch = await channels.read(args.channel_id)
                out = {"channel_id": ch.channel_id,
                       "message_storage_policy": ch.message_storage_policy,
                       "push_type": ch.push_type}
            else:
                await channels.delete(args.channel_id)
                out = {"deleted": args.channel_id}
        except ChannelError as exc:
            print(f"fanout channels {args.action}: {exc}", file=sys.stderr)
            return EXIT_CONFIG if exc.status == 403 else EXIT_FAILED
    print(json.dumps(out), flush=True)
    return 0


#: Commands whose parser lives in (and imports) a package of its own: registered in full
#: only when asked for, so that ``fanout send`` does not import the daemon, serve and the mock.
_HEAVY = {"mock": "mock", "mock-credentials": "mock", "run": "run", "serve": "serve"}

#: The one-line help of each command this module registers (``fanout -h`` lists them).
_HELP = {
    "demo": "fan out to the embedded mock APNs (no Apple account)",
    "send": "one payload to a file of tokens",
    "channels": "broadcast channels (iOS 18): create, list, show, delete",
    "check": "one harmless push: are the credentials, topic and path good?",
    "enqueue": "feed NDJSON push lines into a Redis Stream for a fleet",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``fanout`` command line: one subcommand per ``_add_<command>_parser``.

    Given ``argv`` naming a command, every other command gets a bare parser (its name and
    help line only): start-up cost is what the command needs (issue 19); the heavy ones
    would import their packages, the light ones cost their arguments (~3 ms)."""
    command = next((a for a in argv or () if not a.startswith("-")), None)
    only = _HEAVY.get(command or "", command) if command else None

    def full(group: str) -> bool:
        return only is None or only == group

    parser = argparse.ArgumentParser(prog="fanout", description="High-volume APNs sender")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    parser.add_argument("--version", action=_VersionAction)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, help="the command to run")

    def light(name: str, add: Callable[[], None]) -> None:
        if full(name):
            add()
        else:
            sub.add_parser(name, help=_HELP[name])

    light("demo", lambda: _add_demo_parser(sub, common))
    light("send", lambda: _add_send_parser(sub, common))
    if full("mock"):
        from .testing.command import add_mock_parser

        add_mock_parser(sub, common)
    else:
        sub.add_parser("mock")
        sub.add_parser("mock-credentials")
    light("channels", lambda: _add_channels_parser(sub, common))
    light("check", lambda: _add_check_parser(sub, common))
    # `run` registers itself: set_defaults(run_main=<async fn(args) -> int>), see main()
    if full("run"):
        from ._daemon.command import add_run_parser

        add_run_parser(sub, settings_args=add_settings_args)
    else:
        sub.add_parser("run")
    light("enqueue", lambda: _add_enqueue_parser(sub))
    if full("serve"):
        from ._serve.command import add_serve_parser

        add_serve_parser(sub, settings_args=add_settings_args)
    else:
        sub.add_parser("serve")
    return parser


def _version() -> str:
    """The installed package's version (``fanout.__version__``: a test keeps them equal)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fanout")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``, with the version looked up only when asked (importlib.metadata costs
    about 10 ms of start-up)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"fanout {_version()}", flush=True)  # stdout, as argparse's own version action
        parser.exit()


def _stop_child(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> float | None:
    """SIGTERM ``proc`` (SIGKILL after ``timeout``), reap it, and return the CPU seconds
    (user + system) it used, or None if it had already been reaped."""
    proc.terminate()
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            deadline = float("inf")
        time.sleep(0.01)


def _add_demo_parser(sub: _Subcommands[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser("demo", parents=[common], help=_HELP["demo"])
    demo.add_argument("--count", type=int, default=100_000, help="pushes to fan out (default 100,000)")
    demo.add_argument("--connections", type=int, default=2, help="HTTP/2 connections (default 2)")
    demo.add_argument("--latency", type=float, default=0.0, help="mock latency, seconds")
    demo.add_argument("--unregistered", type=float, default=0.01,
                      help="fraction of tokens the mock reports unregistered")
    demo.add_argument("--mock-path", choices=["fast", "h2"], default="fast",
                      help="the mock's fast path (default: as fast as the client, so the "
                           "figures are fanout's) or its h2-library path (the oracle the "
                           "tests check the framer against; it sets the pace)")


def _add_send_parser(sub: _Subcommands[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    send = sub.add_parser("send", parents=[common], help=_HELP["send"])
    add_settings_args(send)
    target = send.add_mutually_exclusive_group(required=True)
    target.add_argument("--tokens", help="file with one token per line, or -")
    target.add_argument("--channel", help="broadcast to this channel id (iOS 18) instead")
    send.add_argument("--payload", help="JSON payload file, or - for stdin")
    send.add_argument("--title", help="alert title (instead of --payload)")
    send.add_argument("--body", help="alert body (instead of --payload)")
    send.add_argument("--badge", type=int, help="app icon badge number")
    send.add_argument("--sound", help="sound file name, or default")
    send.add_argument("--content-available", action="store_true",
                      help="content-available: 1 (wake the app); alone, a background push at "
                           "priority 5")
    send.add_argument("--category", help="aps category: the notification's actions")
    send.add_argument("--thread-id", help="aps thread-id: groups notifications")
    send.add_argument("--mutable-content", action="store_true",
                      help="mutable-content: 1 (a notification service extension may change it)")
    send.add_argument("--interruption-level",
                      choices=["passive", "active", "time-sensitive", "critical"],
                      help="aps interruption-level")
    send.add_argument("--push-type", default=None, help="apns-push-type (default alert)")
    send.add_argument("--priority", type=int, help="apns-priority: 10, 5 or 1")
    send.add_argument("--expiration", type=int, help="apns-expiration: epoch seconds (0: now or never)")
    send.add_argument("--collapse-id", help="apns-collapse-id: later pushes with it replace earlier ones")
    send.add_argument("--invalid-tokens", help="append invalidated tokens here as NDJSON")
    send.add_argument("--teams", metavar="FILE",
                      help="send through the team of a TOML file of [[team]] tables (those "
                           "in --config are used without it) that serves --topic")


def _add_channels_parser(sub: _Subcommands[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    channels = sub.add_parser("channels", parents=[common], help=_HELP["channels"])
    channels_sub = channels.add_subparsers(dest="action", required=True, help="what to do")
    for action, text in (("create", "create a channel"), ("list", "list every channel"),
                         ("show", "show one channel"), ("delete", "delete a channel")):
        cp = channels_sub.add_parser(action, help=text)
        add_settings_args(cp)
        cp.add_argument("--manage-host", help="channel management host (default: Apple's)")
        cp.add_argument("--manage-port", type=int, help="the channel management port (a mock)")
        if action == "create":
            cp.add_argument("--policy", type=int, choices=[0, 1], default=0,
                            help="message storage: 0 none (default), 1 most recent")
        if action in ("show", "delete"):
            cp.add_argument("channel_id", help="the channel id (base64)")


def _add_check_parser(sub: _Subcommands[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    check_p = sub.add_parser("check", parents=[common], help=_HELP["check"])
    add_settings_args(check_p)
    check_p.add_argument("--teams", metavar="FILE",
                         help="check every team of a TOML file of [[team]] tables (those in "
                              "--config are checked without it), in each of its environments")


async def _enqueue_main(args: argparse.Namespace) -> int:
    from ._daemon.fleet import enqueue_main  # coredis and the daemon only when used

    return await enqueue_main(args)


def _add_enqueue_parser(sub: _Subcommands[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("enqueue", help=_HELP["enqueue"])
    p.add_argument("inputs", nargs="*", default=["-"], help="NDJSON files; - or nothing: stdin")
    p.add_argument("--to", required=True, metavar="redis://HOST:PORT/STREAM", help="the fleet's stream")
    p.add_argument("--max-backlog", type=int, default=100_000, metavar="ENTRIES",
                   help="wait while the stream holds more entries than this (default 100,000;"
                        " the daemons delete what they acked)")
    p.add_argument("--batch", type=int, default=500, help="entries per pipelined XADD")
    p.add_argument("--max-line-bytes", type=int, default=16 * 1024 * 1024, help="longest line taken (default 16 MiB); longer ones are skipped")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging on stderr")
    p.set_defaults(func=_enqueue_main)


def main(argv: list[str] | None = None) -> int:
    """``fanout ARGS``: run the command; its exit code (:mod:`fanout._exits`).

    Without ``argv`` (the process's own command line: the ``fanout`` script, ``python -m
    fanout``) the objects of the imports are frozen out of the garbage collector (issue
    19): they live as long as the process, and scanning them (at every full collection and
    at exit) cost a small send ~25 ms of CPU."""
    if argv is None:
        gc.freeze()
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top level's: it is the one that was meant
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    from ._logging import configure

    # the services (run, serve) report progress at INFO; one-shot commands only trouble
    configure(getattr(args, "log_format", None) or "text", getattr(args, "log_level", None),
              verbose=bool(getattr(args, "verbose", False)),
              default="info" if args.command in ("run", "serve") else "warning")
    # `run` (fanout/_daemon/command.py) sets run_main; `func` is accepted too, as an async fn(args) -> int
    run_main: Callable[[argparse.Namespace], Awaitable[int]] | None = \
        getattr(args, "run_main", None) or getattr(args, "func", None)
    if run_main is not None:
        # the daemon handles its own signals: no KeyboardInterrupt here
        try:
            return trio.run(run_main, args)
        except (FanoutError, OSError) as exc:
            print(f"fanout {args.command}: error: {exc}", file=sys.stderr)
            return _error_exit(exc)
    runner = {"demo": _demo_main, "send": _send_main, "check": _check_main,
              "channels": _channels_main}[args.command]
    try:
        return trio.run(runner, args)
    except KeyboardInterrupt:
        return EXIT_FORCED
    except (FanoutError, OSError) as exc:
        print(f"fanout {args.command}: error: {exc}", file=sys.stderr)
        return _error_exit(exc)


def _subparser(parser: argparse.ArgumentParser,
               args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand (and sub-subcommand) ``args`` ran."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest or "", None)
            sub = action.choices.get(chosen) if chosen else None
            if sub is not None:
                return _subparser(sub, args)
    return parser


def _error_exit(exc: BaseException) -> int:
    """A command that stopped on an exception: a transport failure (channel management
    that cannot connect) is an unreachable APNs; anything else is usage (settings, files)."""
    return EXIT_UNREACHABLE if isinstance(exc, TransportError) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
