"""fanout.Client is trio's: used from asyncio (or with no event loop at all) it says which
client to use instead, not an AttributeError from deep inside trio."""

from __future__ import annotations

import asyncio

import pytest
import trio

from fanout.client import Client
from fanout.testing.devcerts import TestPKI

from .helpers import local_client


def _client(pki: TestPKI) -> Client:
    # never connects: every use below is refused before a socket is opened
    return local_client(pki, 9, None)


def test_async_with_under_asyncio_names_the_asyncio_client(pki: TestPKI) -> None:
    async def main() -> None:
        async with _client(pki):
            raise AssertionError("entered a trio client under asyncio")

    with pytest.raises(RuntimeError, match=r"fanout\.asyncio\.Client") as info:
        asyncio.run(main())
    assert "fanout.sync.Client" in str(info.value)


def test_start_soon_under_asyncio_names_the_asyncio_client(pki: TestPKI) -> None:
    async def main() -> None:
        _client(pki).start_soon(trio.sleep, 0)

    with pytest.raises(RuntimeError, match=r"fanout\.asyncio\.Client"):
        asyncio.run(main())


def test_with_no_event_loop_it_says_trio_run_or_the_sync_client(pki: TestPKI) -> None:
    coro = _client(pki).__aenter__()
    with pytest.raises(RuntimeError, match=r"trio\.run") as info:
        coro.send(None)
    assert "fanout.sync.Client" in str(info.value)
    assert "fanout.asyncio" not in str(info.value)


async def test_under_trio_outside_async_with_the_message_is_unchanged(pki: TestPKI) -> None:
    with pytest.raises(RuntimeError, match=r"inside 'async with Client"):
        _client(pki).start_soon(trio.sleep, 0)
