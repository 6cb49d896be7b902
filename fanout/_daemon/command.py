"""``fanout run``: its flags, and the choice of daemon they make (one process, workers, a
Redis fleet, a worker child). Kept apart from the daemons so each imports only downward."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from .._exits import EXIT_CONFIG, EXIT_OUTPUT, EXIT_USAGE
from .._logging import fatal
from ..errors import ConfigError, FanoutError
from . import checkpoint as ckpt
from .core import Daemon
from .files import FileSink, FileSource
from .output import OutputError, Outputs


def add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                   settings_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``fanout run`` to the subcommands ``sub``; ``settings_args`` adds the APNs
    settings' flags (:func:`fanout.config.add_settings_args`)."""
    p = sub.add_parser("run", help="daemon: NDJSON pushes from stdin or files, NDJSON results")
    settings_args(p)
    p.add_argument("inputs", nargs="*", default=["-"],
                   help="NDJSON files or globs; - or nothing for stdin")
    p.add_argument("--follow", action="store_true", help="tail a growing file (like tail -F)")
    p.add_argument("--results", help="append results here (default stdout)")
    p.add_argument("--invalid-tokens", help="append invalidated tokens here as NDJSON")
    p.add_argument("--checkpoint", help="checkpoint file (default: INPUT.checkpoint)")
    p.add_argument("--no-checkpoint", action="store_true", help="read from the start, keep no checkpoint")
    p.add_argument("--checkpoint-interval", type=float, default=0.5, help="seconds between checkpoint writes (default 0.5)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="SIGTERM: seconds the pushes in flight get to finish (default 30)")
    p.add_argument("--on-config-error", choices=["stop", "drain"], default="stop",
                   help="stop reading (default), or mark every remaining line config_error")
    p.add_argument("--on-unavailable", choices=["wait", "fail"], default="wait",
                   help="APNs unreachable for unavailable_timeout: pause the input until a "
                        "connection comes up (default), or end the waiting pushes "
                        "retries_exhausted and go on (exit 4)")
    p.add_argument("--max-line-bytes", type=int, default=16 * 1024 * 1024, help="longest input line (default 16 MiB); longer ones are malformed")
    p.add_argument("--output-buffer", type=float, default=8.0, metavar="MB",
                   help="results held in memory while their reader (a pipe, a FIFO, a slow "
                        "disk) does not take them; past this, input pauses (default 8)")
    p.add_argument("--status-interval", type=float, default=10.0,
                   help="seconds between status log lines when not on a TTY (0: none)")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log and status lines as text (default) or JSON: one object per line "
                        "with event, ts, level and logger")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                   help="least severe level logged (default info: the status lines)")
    p.add_argument("--la-budget", type=int, default=50,
                   help="priority-10 Live Activity pushes per activity per hour")
    p.add_argument("--la-over-budget", choices=["lower", "wait"], default="lower",
                   help="over the budget: send at priority 5 (default) or wait")
    p.add_argument("--workers", type=int, default=1,
                   help="engine processes over one input (one results stream, one checkpoint)")
    p.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics "
                        "(HOST defaults to 127.0.0.1)")
    p.add_argument("--teams", metavar="FILE",
                   help="several Apple developer teams: a TOML file of [[team]] tables (name, "
                        "topics, key_path/key_id/team_id or cert; or put them in --config); "
                        "pushes are routed by topic and environment")
    g = p.add_argument_group("a fleet on a Redis Stream (instead of files)")
    g.add_argument("--source", metavar="redis://HOST:PORT/STREAM",
                   help="consume push jobs (field 'push') from this stream in a consumer group")
    g.add_argument("--group", help="the consumer group (made if missing)")
    g.add_argument("--consumer", help="this daemon's name in the group (default HOST-PID)")
    g.add_argument("--results-stream", metavar="STREAM",
                   help="add results to this stream (field 'result'); with --results too, both")
    g.add_argument("--claim-idle", type=float, default=30.0, metavar="SECONDS",
                   help="take over entries pending this long on another consumer (default 30)")
    g.add_argument("--keep-acked", action="store_true",
                   help="leave acked entries in the stream (default: delete them)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--metrics-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging on stderr")
    p.set_defaults(run_main=run_main)


async def run_main(args: argparse.Namespace) -> int:
    """Start the daemon the flags ask for; its exit code (:mod:`fanout._exits`)."""
    from ..config import add_teams_file, load_settings, make_engine
    from .reader import expand_inputs

    try:
        if args.child:
            import msgspec

            from ..config import Settings
            from .workers import CHILD_SETTINGS_ENV, worker_daemon

            settings = msgspec.json.decode(os.environ[CHILD_SETTINGS_ENV], type=Settings)
            return await worker_daemon(settings, args, make_engine).run()
        settings = load_settings(args)
        if getattr(args, "teams", None):
            add_teams_file(settings, args.teams)
        if getattr(args, "source", None):
            if args.inputs not in ([], ["-"]) or args.follow or args.workers > 1:
                raise ConfigError("--source takes no input files, --follow or --workers "
                                  "(run more daemons in the group instead)")
            from .fleet import run_group

            return await run_group(settings, args, make_engine)
        inputs = expand_inputs(args.inputs or ["-"], missing_ok=args.follow)
        if args.follow and (len(inputs) != 1 or inputs[0] == "-"):
            raise ConfigError("--follow takes exactly one input file")
        if args.checkpoint and len(inputs) != 1:
            raise ConfigError("--checkpoint takes exactly one input file "
                              "(each input otherwise gets INPUT.checkpoint)")
        if args.workers > 1:
            from .workers import Coordinator

            return await Coordinator(settings, args, inputs).run()
        out = Outputs.for_args(args.results, args.invalid_tokens,
                               getattr(args, "output_buffer", 8.0))
        return await Daemon(settings, args, FileSource(inputs, args), FileSink(out),
                            make_engine).run()
    except OutputError as exc:
        fatal("run", str(exc))
        return EXIT_OUTPUT
    except ckpt.CheckpointError as exc:
        fatal("run", str(exc))
        return EXIT_USAGE
    except FanoutError as exc:
        fatal("run", str(exc))
        return EXIT_USAGE if not isinstance(exc, ConfigError) else EXIT_CONFIG
    except OSError as exc:
        fatal("run", str(exc))
        return EXIT_USAGE
