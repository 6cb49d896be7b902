"""Resource baselines for fault tests: file descriptors, trio tasks, RSS."""

from __future__ import annotations

import collections
import contextlib
import os

import trio


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _tasks() -> int:
    """Tasks alive in this trio run."""
    return sum(_task_names().values())


def _task_names() -> collections.Counter[str]:
    names: collections.Counter[str] = collections.Counter()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        names[task.name] += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


def _fd_targets() -> collections.Counter[str]:
    targets: collections.Counter[str] = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets[os.readlink(f"/proc/self/fd/{fd}").split(":[")[0]] += 1
        except OSError:
            pass
    return targets


@contextlib.asynccontextmanager
async def back_to_baseline(timeout: float = 10):
    """File descriptors and tasks (client's and server's) return to where they were once
    the block's client has closed; waited for, within ``timeout`` seconds. On failure the
    message names the extra tasks and descriptors."""
    await trio.sleep(0.05)
    fds, tasks = _fds(), _tasks()
    names, targets = _task_names(), _fd_targets()
    yield
    with trio.move_on_after(timeout):
        while _fds() > fds or _tasks() > tasks:
            await trio.sleep(0.02)
        return
    extra_tasks = _task_names() - names
    extra_fds = _fd_targets() - targets
    raise AssertionError(
        f"not back to baseline after {timeout} s: fds {fds} -> {_fds()} ({dict(extra_fds)}),"
        f" tasks {tasks} -> {_tasks()} ({dict(extra_tasks)})"
    )
