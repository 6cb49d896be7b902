"""Memory-channel helpers that skip trio's checkpoint when they can.

``await channel.send()`` and ``await channel.receive()`` each yield to the scheduler, even
when the item could pass at once: a pass per push costs more than the push's own HTTP/2
frames. These take or put what the buffer allows without one, and wait (a checkpoint)
only when they must, so a whole batch goes through in one scheduler turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import trio

T = TypeVar("T")


async def drain(recv: trio.MemoryReceiveChannel[T]) -> AsyncIterator[T]:
    """The channel's items until it is closed, taking whatever is buffered without a
    checkpoint."""
    while True:
        try:
            item = recv.receive_nowait()
        except trio.WouldBlock:
            try:
                item = await recv.receive()
            except trio.EndOfChannel:
                return
        except trio.EndOfChannel:
            return
        yield item


async def put(send: trio.MemorySendChannel[T], item: T) -> None:
    """``send.send(item)``, without a checkpoint while the buffer has room."""
    try:
        send.send_nowait(item)
    except trio.WouldBlock:
        await send.send(item)
