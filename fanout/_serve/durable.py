"""``fanout serve --to redis://HOST:PORT/STREAM``: accepted pushes go to a fleet's Redis
Stream (``fanout run --source``) instead of a local engine, so HTTP producers get the
fleet's at-least-once delivery. A push is checked here as the daemon would check it
(a bad one is a 400, never an entry), then added as one entry (field ``push``); the
answer is its entry id. While the stream holds more than ``max_backlog`` entries, adding
waits (the fleet's daemons delete what they acked), up to the request's deadline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from .._daemon.fleet import FIELD, connect

BACKLOG_POLL = 0.2  # seconds between two looks at a full stream's length


class BacklogFull(Exception):
    """The stream stayed over its backlog for the whole deadline."""


class RedisQueue:
    """The fleet's stream, as ``fanout serve`` adds to it."""

    def __init__(self, url: str, max_backlog: int) -> None:
        self.url = url
        self.max_backlog = max_backlog
        self.redis, self.stream = connect(url)

    async def __aenter__(self) -> RedisQueue:
        await self.redis.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.redis.__aexit__(*exc)

    async def ping(self) -> str | None:
        """None when the stream can be written, else why not."""
        try:
            with trio.fail_after(5.0):
                await self.redis.ping()
        except Exception as exc:  # noqa: BLE001  # any failure means not ready
            return f"Redis at {self.url.rsplit('/', 1)[0]}: {type(exc).__name__}: {exc}"
        return None

    async def add(self, lines: Sequence[bytes], deadline: float) -> list[str]:
        """Add ``lines`` as entries, in one pipeline; their entry ids. Waits while the
        backlog is full, until ``deadline`` (trio time): then BacklogFull."""
        while await self.redis.xlen(self.stream) + len(lines) > self.max_backlog:
            if trio.current_time() + BACKLOG_POLL > deadline:
                raise BacklogFull(f"the stream {self.stream} holds over {self.max_backlog} "
                                  f"entries: the fleet is behind")
            await trio.sleep(BACKLOG_POLL)
        async with self.redis.pipeline(transaction=False) as pipe:
            requests = [pipe.xadd(self.stream, {FIELD: data}) for data in lines]
        return [_text(await request) for request in requests]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
