"""``fanout serve``: its flags, the checks a network port needs before it opens, and the
run (hypercorn on trio beside the engine, SIGTERM drains)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .._exits import EXIT_CONFIG, EXIT_FORCED, EXIT_OK
from ..errors import ConfigError
from ..metrics import is_loopback
from .app import App, Limits
from .keys import ApiKeys, hash_key
from .options import add_options, resolve

log = logging.getLogger("fanout.serve")

ENV_KEYS = "FANOUT_API_KEYS"
PROBE_RETRY = 5.0  # seconds between start-up probes until one is answered


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                     settings_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("serve", help="an authenticated HTTP API for pushes (any language)")
    settings_args(p)
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--hash-key", metavar="KEY",
                   help="print the line an --api-keys file holds for KEY, and exit")
    p.add_argument("--teams", metavar="FILE", help="[[team]] tables: pushes routed by topic")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines as text (default) or JSON (event, ts, level, logger)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                   help="least severe level logged (default info)")
    add_options(p)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging on stderr")
    p.set_defaults(run_main=serve_main)


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_exposure(host: str, keys: ApiKeys, tls: bool, behind_proxy: bool) -> None:
    """Refuse to open a port that lets in who does not belong."""
    if is_loopback(host):
        return
    if not keys:
        raise ConfigError(f"no API keys (--api-keys FILE or {ENV_KEYS}): fanout serve binds "
                          f"only a loopback address without them, not {host}")
    if not tls and not behind_proxy:
        raise ConfigError(f"binding {host} needs TLS (--tls-cert and --tls-key), or "
                          f"--behind-tls-proxy when a proxy in front terminates it")


async def serve_main(args: argparse.Namespace) -> int:
    """Run ``fanout serve`` until SIGTERM or SIGINT; its exit code."""
    if args.hash_key:
        print(hash_key(args.hash_key))
        return EXIT_OK
    from ..config import add_teams_file, load_settings, make_engine
    from ..liveactivity import ActivityTracker
    from ..metrics import Metrics

    try:
        resolve(args)
        settings = load_settings(args)
        if args.teams:
            add_teams_file(settings, args.teams)
        host, port = _host_port(args.listen)
        keys = ApiKeys.load(args.api_keys, os.environ.get(ENV_KEYS))
        cert, key_file = args.tls_cert, args.tls_key
        if bool(cert) != bool(key_file):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        check_exposure(host, keys, bool(cert), args.behind_tls_proxy)
        limits = Limits(max_body=args.max_body, max_stream_body=args.max_stream_body,
                        max_line=args.max_line, max_tokens=args.max_tokens,
                        max_requests=args.max_requests,
                        max_connections=args.max_connections,
                        body_timeout=args.body_timeout, push_timeout=args.push_timeout)
        metrics = Metrics(daemon=False)
        queue = None
        if args.to:
            from .durable import RedisQueue

            queue = RedisQueue(args.to, args.max_backlog)
            engine: Any = None
        else:
            engine = make_engine(settings, events=metrics)
    except ConfigError as exc:
        print(f"fanout serve: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    app = App(engine, default_topic=settings.topic, environment=settings.environment,
              teams=bool(settings.team), keys=keys if keys else None, limits=limits,
              registry=metrics.registry,
              sample=(lambda: metrics.sample(engine)) if engine is not None else None,
              tracker=ActivityTracker(args.la_budget, over_budget="lower"), queue=queue)
    try:
        from hypercorn.trio import serve
    except ImportError:
        print("fanout serve: error: needs hypercorn: pip install 'fanout[serve]'",
              file=sys.stderr)
        return EXIT_CONFIG
    config = _hypercorn_config(host, port, cert, key_file, args)
    count_connections(app.connections)
    topics = [settings.topic] if not settings.team else \
        [spec.topics[0] for spec in settings.team if spec.topics]
    forced = False
    async with engine if engine is not None else queue:  # type: ignore[union-attr]
        async with trio.open_nursery() as nursery:
            if engine is not None:
                nursery.start_soon(_probe, app, engine, [t for t in topics if t])
            stop = trio.Event()

            async def run_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                await serve(app, config, shutdown_trigger=stop.wait,  # type: ignore[arg-type]
                            task_status=task_status)

            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                binds = await nursery.start(run_server)
                bound = _bound_port(binds, port)
                if args.port_file:
                    tmp = Path(args.port_file + ".tmp")
                    tmp.write_text(str(bound))
                    tmp.replace(args.port_file)
                scheme = "https" if cert else "http"
                print(f"fanout serve: listening on {scheme}://{host}:{bound} "
                      f"({len(keys)} API key{'s' if len(keys) != 1 else ''})",
                      file=sys.stderr, flush=True)
                async for signum in signals:
                    if not stop.is_set():
                        log.warning("%s: draining (requests in flight get %g s)",
                                    signal.Signals(signum).name, args.drain_timeout)
                        app.stopping.set()
                        stop.set()
                        nursery.start_soon(_until_drained, nursery, app, args.drain_timeout)
                    else:
                        forced = True
                        nursery.cancel_scope.cancel()
                        break
    return EXIT_FORCED if forced else EXIT_OK


ANSWER_GRACE = 5.0  # seconds the requests get, after the drain deadline, to answer


async def _until_drained(nursery: trio.Nursery, app: App, timeout: float) -> None:
    """After a stop: end the run once every request has ended. At the drain deadline the
    pushes still out are ended (those in flight ``maybe_delivered``, the others as not
    sent) and answered to their requests, which then get ANSWER_GRACE to write them."""
    with trio.move_on_after(timeout):
        while app.in_flight_requests:
            await trio.sleep(0.05)
    if app.in_flight_requests:
        aborted = app.pushes.abort("the server stopped before APNs answered")
        log.warning("drain deadline: %d request(s) still open, %d push(es) in flight ended "
                    "maybe_delivered; the rest answered as not sent", app.in_flight_requests,
                    aborted)
        with trio.move_on_after(ANSWER_GRACE):
            while app.in_flight_requests:
                await trio.sleep(0.05)
    nursery.cancel_scope.cancel()


async def _probe(app: App, engine: Any, topics: list[str]) -> None:
    """``/readyz``'s start-up probe: a background push to the all-zero token (as ``fanout
    check``) for each topic; APNs' 400 BadDeviceToken says the credentials are good."""
    from ..config import CHECK_TOKEN
    from ..payload import Notification, PushType

    pending = list(topics)
    if not pending:
        app.ready.probed = True
        return
    while pending:
        topic = pending[0]
        result = await engine.send(Notification(
            token=CHECK_TOKEN, payload={"aps": {"content-available": 1}}, topic=topic,
            push_type=PushType.BACKGROUND, priority=5, expiration=0))
        if result.status == 200 or result.status == 410 or \
                (result.status == 400 and result.reason == "BadDeviceToken"):
            pending.pop(0)
            continue
        app.ready.why = (f"start-up probe for {topic}: " + (
            f"APNs answered {result.status} {result.reason or ''}".rstrip()
            if result.status else result.error or str(result.outcome)))
        await trio.sleep(PROBE_RETRY)
    app.ready.probed = True


def count_connections(connections: Any) -> None:
    """Have hypercorn's connections report their opening and closing to ``connections``
    (:class:`fanout._serve.app.Connections`): its trio worker builds one ``TCPServer`` per
    connection, and has no connection cap of its own."""
    import hypercorn.trio.run as hypercorn_run
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.utils import parse_socket_addr

    base = getattr(hypercorn_run, "_fanout_base", None) or TCPServer

    class CountedTCPServer(base):  # type: ignore[misc, valid-type]
        async def run(self) -> None:
            stream = self.stream
            sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
            try:
                client = parse_socket_addr(sock.family, sock.getpeername()) if sock else None
            except OSError:  # gone already
                client = None
            if client is not None:
                connections.opened(client)
            try:
                await super().run()
            finally:
                if client is not None:
                    connections.closed(client)

    setattr(hypercorn_run, "_fanout_base", base)  # noqa: B010  # installed once
    setattr(hypercorn_run, "TCPServer", CountedTCPServer)  # noqa: B010  # not exported


def _hypercorn_config(host: str, port: int, cert: str | None, key: str | None,
                      args: argparse.Namespace) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.keep_alive_timeout = args.header_timeout
    config.graceful_timeout = args.drain_timeout + ANSWER_GRACE + 1.0  # ours ends first
    config.h2_max_concurrent_streams = args.max_streams
    # hypercorn's default (1,000) sends GOAWAY after 1,000 requests on a connection, and
    # clients that do not retry on a new one (httpx) fail the next request: keep them open
    config.keep_alive_max_requests = 2**31 - 1
    config.accesslog = None
    config.errorlog = logging.getLogger("fanout.serve.http")
    if cert:
        config.certfile, config.keyfile = cert, key
        config.alpn_protocols = ["h2", "http/1.1"]
    return config


def _bound_port(binds: list[str] | None, asked: int) -> int:
    for bind in binds or []:
        try:
            return int(bind.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            continue
    return asked
