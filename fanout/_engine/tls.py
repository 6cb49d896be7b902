"""TLS over a trio socket with batched records (ssl.MemoryBIO).

``trio.SSLStream`` returns one TLS record per read and encrypts each ``send_all`` on its
own, which defeats batching (23-35% of the client's CPU; docs/perf.md, "TLS write
batching"). Here the connection appends plaintext with :meth:`write` (no I/O),
:meth:`flush` sends everything encrypted so far in one socket write, and :meth:`receive`
decrypts every record that has arrived.

One task may call :meth:`receive` while another calls :meth:`flush`; the SSLObject calls are
synchronous, so they never interleave mid-call.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import trio

from ..errors import ConfigError, TransportError

_READ_SIZE = 256 * 1024


class TLSStream:
    """A TLS client session over ``sock``: plaintext in and out, one socket write per flush."""

    def __init__(self, sock: trio.SocketStream, ctx: ssl.SSLContext, server_hostname: str) -> None:
        self._sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=False,
                                 server_hostname=server_hostname)
        self._send_lock = trio.StrictFIFOLock()

    @property
    def alpn(self) -> str | None:
        """The protocol the server chose by ALPN (APNs: ``h2``)."""
        return self._obj.selected_alpn_protocol()

    async def handshake(self) -> None:
        """Run the TLS handshake; a certificate that fails verification is a ConfigError."""
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                data = await self._recv_raw()
                if not data:
                    raise TransportError("connection closed during the TLS handshake") from None
                self._in.write(data)
            except ssl.SSLCertVerificationError as exc:
                raise ConfigError(
                    f"TLS certificate verification failed: {exc.verify_message} (a mock or "
                    f"test server, such as fanout mock? give its CA with --ca-file, "
                    f"APNS_CA_FILE or ca_file=)") from None
            except ssl.SSLError as exc:
                raise TransportError(f"TLS handshake failed: {exc.reason or exc}") from None
        await self.flush()

    def write(self, data: bytes) -> None:
        """Encrypt ``data`` into the outgoing buffer (no I/O)."""
        self._obj.write(data)

    def pending(self) -> int:
        """Encrypted bytes not yet sent."""
        return self._out.pending

    async def flush(self) -> None:
        """Send everything encrypted so far, in one write."""
        async with self._send_lock:
            if self._out.pending:
                data = self._out.read()
                try:
                    await self._sock.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise TransportError(f"send failed: {exc}") from None

    async def flush_chunks(self, chunk: int, progress: Callable[[], None]) -> None:
        """Send what is encrypted, ``chunk`` bytes at a time, calling ``progress`` after
        each: the caller times the chunks (a peer that stopped reading blocks one forever).
        No cancel scope per write: trio's cost ~9 us each, more than a push."""
        async with self._send_lock:
            out = self._out
            while out.pending:
                try:
                    await self._sock.send_all(out.read(chunk))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise TransportError(f"send failed: {exc}") from None
                progress()

    async def _recv_raw(self) -> bytes:
        try:
            return await self._sock.receive_some(_READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportError(f"receive failed: {exc}") from None

    async def receive(self) -> bytes:
        """Plaintext of every record that has arrived; b"" at end of stream."""
        while True:
            data = await self._recv_raw()
            if not data:
                return b""
            self._in.write(data)
            chunks = []
            try:
                while True:
                    chunks.append(self._obj.read(_READ_SIZE))
                    if not chunks[-1]:
                        break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                if any(chunks):
                    return b"".join(chunks)
                return b""
            except ssl.SSLError as exc:
                raise TransportError(f"TLS error: {exc.reason or exc}") from None
            if self._out.pending:  # a key update or ticket answer to send
                await self.flush()
            out = b"".join(chunks)
            if out:
                return out

    async def aclose(self) -> None:
        """Close the socket (best effort, at most a second, even when cancelled)."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self._sock.aclose()
            except Exception:  # noqa: BLE001 - best effort on close
                pass
