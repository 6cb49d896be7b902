"""Resource baselines for fault tests: file descriptors, trio tasks, RSS."""

from __future__ import annotations

import contextlib
import os

import trio

from fanout.daemon import _task_count as _tasks  # tasks alive in this trio run


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    import os

    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextlib.asynccontextmanager
async def back_to_baseline():
    """File descriptors and tasks (client's and server's) return to where they were once
    the block's client has closed; waited for, within 5 s."""
    await trio.sleep(0.05)
    fds, tasks = _fds(), _tasks()
    yield
    with trio.fail_after(5):
        while _fds() > fds or _tasks() > tasks:
            await trio.sleep(0.02)
