"""What many test modules share: the mock APNs in the test process, a client on it, the
daemon as a real process, its input and results, and waiting for a fact instead of a time.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import trio

from fanout.auth import TokenAuth
from fanout.client import Client
from fanout.testing.devcerts import TestPKI, TestSigningKey
from fanout.testing.mock import MockAPNs, MockConfig

from .baseline import back_to_baseline

T = TypeVar("T")

FANOUT = [sys.executable, "-m", "fanout"]
TOPIC = "com.example.app"
PAYLOAD = {"aps": {"alert": {"title": "t", "body": "hello"}}}
MALFORMED = [b"not json at all", b'{"token": 5, "payload": {}}', b'{"payload": {"aps": {}}}',
             b"", b'{"token": "ab", "tokens": ["cd"], "payload": {}}', b'{"token": "ab"',
             b'{"token": "abcd", "payload": {"aps": {}}, "colour": "red"}', b"\xff\xfe{bad utf8"]


def tokens(n: int, prefix: str = "") -> list[str]:
    """``n`` distinct 64-hex-digit device tokens starting with ``prefix``."""
    return [f"{prefix}{i:0{64 - len(prefix)}x}" for i in range(n)]


# ---------------------------------------------------------------- the mock and a client


@contextlib.asynccontextmanager
async def mock_server(pki: TestPKI, key: TestSigningKey, **config: Any) -> AsyncIterator[MockAPNs]:
    """The mock APNs serving on 127.0.0.1 in this event loop, trusting ``key``; ``config``
    is passed to MockConfig."""
    config.setdefault("keys", {key.key_id: key.public_key})
    config.setdefault("team_id", key.team_id)
    mock = MockAPNs(MockConfig(**config), pki)
    async with trio.open_nursery() as nursery:
        await nursery.start(mock.serve)
        yield mock
        nursery.cancel_scope.cancel()


def local_client(pki: TestPKI, port: int, auth: TokenAuth | TestSigningKey | None,
                 **kw: Any) -> Client:
    """A Client for TOPIC on 127.0.0.1:``port`` trusting the test CA; ``auth`` is a
    TokenAuth, or a key to make one from (None: a server that asks for none). A token made
    here is the test's own (``shared=False``): the session's one key must not carry one
    test's refreshes and rotation counts into the next (tests/test_signer.py tests the
    sharing itself)."""
    if isinstance(auth, TestSigningKey):
        auth = TokenAuth.from_file(auth.path, auth.key_id, auth.team_id, shared=False)
    return Client(auth=auth, topic=TOPIC, host="127.0.0.1", port=port,
                  ca_file=str(pki.ca_file), **kw)


@contextlib.asynccontextmanager
async def running(pki: TestPKI, key: TestSigningKey, *, auth: TokenAuth | None = None,
                  client_kw: Mapping[str, Any] | None = None,
                  **config: Any) -> AsyncIterator[tuple[MockAPNs, Client]]:
    """The mock (``config``) and a two-connection Client on it (``client_kw``); once the
    client has closed, descriptors and tasks (the client's and the mock's) are back where
    they were before it opened."""
    async with mock_server(pki, key, **config) as mock:
        kw: dict[str, Any] = {"connections": 2, "timeout": 5.0, **(client_kw or {})}
        async with back_to_baseline():
            async with local_client(pki, mock.port, auth or key, **kw) as client:
                yield mock, client


async def collect(aiter: AsyncIterable[T], timeout: float = 60) -> list[T]:
    """Everything ``aiter`` yields, within ``timeout`` seconds."""
    out = []
    with trio.fail_after(timeout):
        async for r in aiter:
            out.append(r)
    return out


# ---------------------------------------------------------------- the daemon


def write_input(path: Path, n: int, *, malformed_every: int = 0, seed: int = 1) -> dict[int, str]:
    """n lines; returns line number -> token for the push lines."""
    rng = random.Random(seed)
    toks = {}
    with open(path, "wb") as fh:
        for i in range(1, n + 1):
            if malformed_every and i % malformed_every == 0:
                fh.write(rng.choice(MALFORMED) + b"\n")
                continue
            token = f"{i:064x}"
            toks[i] = token
            fh.write(json.dumps({"id": f"p{i}", "token": token, "payload": PAYLOAD}).encode()
                     + b"\n")
    return toks


def daemon_cmd(mock: MockAPNs, pki: TestPKI, key: TestSigningKey, *args: str) -> list[str]:
    """``fanout run`` against ``mock`` for TOPIC, JSON logs, then ``args``."""
    return FANOUT + ["run", "--host", "127.0.0.1", "--port", str(mock.port), "--ca-file",
                     str(pki.ca_file), "--key-path", str(key.path), "--key-id", key.key_id,
                     "--team-id", key.team_id, "--topic", TOPIC,
                     "--log-format", "json", *args]


async def run_daemon(cmd: list[str], *, stdin: bytes | None = None,
                     timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` to its end (within ``timeout``), stdout and stderr captured."""
    with trio.fail_after(timeout):
        return await trio.run_process(cmd, stdin=stdin, capture_stdout=True,
                                      capture_stderr=True, check=False)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The result lines of ``path``."""
    return [json.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def count_lines(path: Path) -> int:
    """Whole lines in ``path`` so far (0 if it does not exist yet): a cheap poll."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def stderr_of(proc: subprocess.Popen[bytes]) -> str:
    """The rest of what ``proc`` (started with ``stderr=PIPE``) wrote to stderr."""
    assert proc.stderr is not None
    return proc.stderr.read().decode()


async def wait_until(fact: Callable[[], bool], timeout: float, what: str,
                     interval: float = 0.02) -> None:
    """Poll ``fact`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    with trio.move_on_after(timeout) as scope:
        while not fact():
            await trio.sleep(interval)
    if scope.cancelled_caught:
        raise AssertionError(f"not within {timeout:g} s: {what}")


async def wait_lines(path: Path, n: int, timeout: float = 60) -> None:
    """Until ``path`` has at least ``n`` whole lines."""
    await wait_until(lambda: count_lines(path) >= n, timeout, f"{n} lines in {path.name}")


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Until ``proc`` has exited; its return code."""
    await wait_until(lambda: proc.poll() is not None, timeout, "the process exited", 0.05)
    return proc.returncode


class SteppedClock:
    """A wall clock for TokenAuth that moves only when a test steps it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
