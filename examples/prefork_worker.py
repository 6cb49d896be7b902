"""A Celery-style prefork worker: forked pool processes sending through one ``fanout.sync.Client``.

Try it against the mock APNs (from the repository root)::

    python -m fanout mock --port 8443 --pki-dir ./mock-pki --key-path AuthKey.p8 \\
        --key-id KEY0000000 --team-id TEAM000000 --latency 0.2 &
    export FANOUT_HOST=127.0.0.1 FANOUT_PORT=8443 FANOUT_CA_FILE=./mock-pki/ca.pem \\
        FANOUT_KEY_PATH=AuthKey.p8 FANOUT_KEY_ID=KEY0000000 FANOUT_TEAM_ID=TEAM000000 \\
        FANOUT_TOPIC=com.example.app
    python -m examples.prefork_worker --workers 2 --tasks 4

(``AuthKey.p8``: your own, or a test key from ``fanout.testing.devcerts.make_signing_key``.)
The other settings are in examples/settings.py. It prints a JSON summary.

What it shows:

* The client is built at import, in the parent, as a Celery app's module would. That starts
  nothing (no thread, no socket), so forking afterwards is safe: each pool process starts
  its own engine, with its own connections, on its first push. The ``TokenAuth`` was
  loaded (and its JWT minted) in the parent, so every child sends that same token.
* A task may block on a push (``send``), wait on several (``submit`` and the futures), or
  fire and forget (``submit`` and return). A pool process that exits with pushes still out
  (``maxtasksperchild``, Celery's ``worker_max_tasks_per_child``, or the pool closing) first
  gives them ``close_timeout`` seconds to end: fanout drains them through multiprocessing's
  exit hooks, since a pool process ends with ``os._exit``, past ``atexit``.
* Close the pool with ``close()`` and ``join()``: ``terminate()`` (and ``with Pool()``)
  kills the processes with SIGTERM, pushes out and all.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
from collections import Counter
from typing import Any

import fanout.sync
from fanout import Notification

from .settings import client_options

# the parent builds it; a pool process uses it after fork() and gets its own engine
client = fanout.sync.Client(**client_options())


def note(token: str, task: int) -> Notification:
    return Notification(token=token, payload={"aps": {"alert": {"title": f"task {task}",
                                                                "body": "hello"}}})


def notify(task: int, tokens: list[str], fire: int) -> dict[str, Any]:
    """One task: the first token with a blocking ``send``, the rest but ``fire`` with
    ``submit`` and their futures, and the last ``fire`` fire-and-forget: they are still out
    when the task returns (and maybe when this process exits)."""
    counts: Counter[str] = Counter()
    waited, forgotten = tokens[:len(tokens) - fire], tokens[len(tokens) - fire:]
    if waited:
        counts[client.send(note(waited[0], task), timeout=10).outcome] += 1
    futures = [client.submit(note(token, task)) for token in waited[1:]]
    for future in concurrent.futures.as_completed(futures, timeout=30):
        counts[future.result().outcome] += 1
    fired = [client.submit(note(token, task)) for token in forgotten]
    return {"pid": os.getpid(), "task": task, "by_outcome": dict(counts),
            "fired": len(fired), "still_out": sum(not f.done() for f in fired)}


def _run(job: tuple[int, list[str], int]) -> dict[str, Any]:
    return notify(*job)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, default=2, help="pool processes")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--per-task", type=int, default=5, help="pushes per task")
    parser.add_argument("--fire", type=int, default=2,
                        help="of them, submitted without waiting (still out at the task's end)")
    parser.add_argument("--max-tasks-per-child", type=int, default=1,
                        help="a pool process exits after this many tasks (Celery's "
                             "worker_max_tasks_per_child)")
    args = parser.parse_args(argv)
    fire = min(args.fire, args.per_task)
    jobs = [(task, [f"{task:08x}{i:056x}" for i in range(args.per_task)], fire)
            for task in range(args.tasks)]
    pool = multiprocessing.get_context("fork").Pool(args.workers,
                                                    maxtasksperchild=args.max_tasks_per_child)
    try:
        reports = pool.map(_run, jobs, chunksize=1)
        pool.close()
        pool.join()  # each process drains what it fired before it exits
    except BaseException:
        pool.terminate()
        raise
    waited: Counter[str] = Counter()
    for report in reports:
        waited.update(report["by_outcome"])
    print(json.dumps({
        "tasks": len(reports),
        "children": len({r["pid"] for r in reports}),
        "pushes": args.tasks * args.per_task,
        "waited": dict(waited),
        "fired": sum(r["fired"] for r in reports),
        # fired pushes not yet answered when their task returned (its process then exited)
        "still_out_at_return": sum(r["still_out"] for r in reports),
    }), flush=True)


if __name__ == "__main__":
    main()
