"""Proxies for the push connections (servers whose only way out is a proxy): HTTP CONNECT
and SOCKS5 (RFC 1928, user/password auth per RFC 1929).

A proxy comes from ``Client(proxy=...)`` / ``--proxy`` / ``APNS_PROXY``, or else from the
usual environment: ``HTTPS_PROXY`` then ``ALL_PROXY`` (either case), with ``NO_PROXY``
honoured (comma-separated hosts or domain suffixes, ``*`` for all). ``proxy="none"``
turns the environment off. ``http://`` proxies get ``CONNECT host:port`` with optional
basic auth from the URL's user and password; ``socks5://`` (names resolved here) and
``socks5h://`` (names resolved by the proxy) get a SOCKS5 CONNECT. TLS and HTTP/2 then
run inside the tunnel, end to end with APNs (the proxy sees neither the JWT nor the
pushes). The password never appears in a log or an error.
"""

from __future__ import annotations

import base64
import os
from urllib.parse import unquote, urlsplit

import trio

from ..errors import ConfigError, TransportError

MAX_RESPONSE_HEAD = 16 * 1024


_DEFAULT_PORTS = {"http": 8080, "socks5": 1080, "socks5h": 1080}


class Proxy:
    """A proxy for the push connections (password never in its repr)."""

    __slots__ = ("scheme", "host", "port", "username", "password")

    def __init__(self, host: str, port: int, username: str | None = None,
                 password: str | None = None, scheme: str = "http") -> None:
        self.scheme: str = scheme
        self.host: str = host
        self.port: int = port
        self.username: str | None = username
        self.password: str | None = password

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """``http://``, ``socks5://`` or ``socks5h://[USER:PASSWORD@]HOST[:PORT]``."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        scheme = parts.scheme.lower()
        if scheme == "https":
            raise ConfigError("an https:// proxy (TLS to the proxy itself) is not supported; "
                              "use http:// (the tunnel to APNs is TLS end to end anyway)")
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ConfigError(f"proxy must be http://, socks5:// or socks5h://"
                              f"[USER:PASSWORD@]HOST:PORT, not {_redact_url(url)!r}")
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError:
            raise ConfigError(f"proxy {_redact_url(url)!r}: bad port") from None
        return cls(parts.hostname, port, unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None, scheme)

    def __repr__(self) -> str:
        who = f"{self.username}:***@" if self.username else ""
        return f"Proxy({self.scheme}://{who}{self.host}:{self.port})"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _redact_url(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def bypassed(host: str, no_proxy: str) -> bool:
    """Does ``NO_PROXY`` exempt ``host``? Entries are hosts or domain suffixes (``.x.com``
    or ``x.com`` both match ``api.x.com``); ``*`` exempts everything."""
    host = host.lower().rstrip(".")
    for entry in no_proxy.replace(" ", "").lower().split(","):
        entry = entry.split(":")[0].rstrip(".")  # a port in NO_PROXY: ignore it
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.lstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def resolve(setting: str | None, host: str, environ: dict[str, str] | None = None
            ) -> Proxy | None:
    """The proxy to reach ``host`` through, if any."""
    if setting is not None:
        if setting.strip().lower() in ("", "none", "off", "direct"):
            return None
        return Proxy.parse(setting)
    env = os.environ if environ is None else environ
    url = next((env[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                if env.get(k)), None)
    if not url:
        return None
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy") or ""
    if bypassed(host, no_proxy):
        return None
    return Proxy.parse(url)


async def open_tunnel(proxy: Proxy, host: str, port: int) -> trio.SocketStream:
    """A TCP stream to ``host:port`` through ``proxy``, ready for TLS."""
    try:
        stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    except OSError as exc:
        raise TransportError(f"connect to proxy {proxy} failed: {exc}") from None
    try:
        if proxy.scheme == "http":
            await _connect(stream, proxy, host, port)
        else:
            await _socks5(stream, proxy, host, port)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await stream.aclose()
        raise TransportError(f"proxy {proxy}: {exc}") from None
    except BaseException:
        await stream.aclose()
        raise
    return stream


async def _connect(stream: trio.SocketStream, proxy: Proxy, host: str, port: int) -> None:
    """HTTP ``CONNECT host:port`` (basic auth from the proxy URL)."""
    head = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"]
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode())
        head.append(f"Proxy-Authorization: Basic {token.decode()}")
    await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise TransportError(f"proxy {proxy} closed the connection before answering "
                                 f"CONNECT {host}:{port}")
        data += chunk
        if len(data) > MAX_RESPONSE_HEAD:
            raise TransportError(f"proxy {proxy}: answer to CONNECT too long")
    status_line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if 200 <= code < 300:
        return
    what = f"proxy {proxy} refused the tunnel to {host}:{port}: {status_line[:200]}"
    if code == 407:
        raise ConfigError(what + (" (the proxy's credentials were refused)"
                                  if proxy.username else
                                  " (it wants credentials: http://USER:PASSWORD@...)"))
    if code in (401, 403):
        raise ConfigError(what)
    raise TransportError(what)

_SOCKS_REPLIES = {1: "general failure", 2: "connection not allowed by ruleset",
                  3: "network unreachable", 4: "host unreachable", 5: "connection refused",
                  6: "TTL expired", 7: "command not supported", 8: "address type not supported"}


async def _exactly(stream: trio.SocketStream, n: int, proxy: Proxy) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise TransportError(f"SOCKS proxy {proxy} closed the connection")
        data += chunk
    return data


async def _socks5(stream: trio.SocketStream, proxy: Proxy, host: str, port: int) -> None:
    import ipaddress
    import socket

    methods = b"\x00\x02" if proxy.username is not None else b"\x00"
    await stream.send_all(b"\x05" + bytes([len(methods)]) + methods)
    ver, method = await _exactly(stream, 2, proxy)
    if ver != 5:
        raise TransportError(f"proxy {proxy} does not speak SOCKS5")
    if method == 0xFF:
        raise ConfigError(f"SOCKS proxy {proxy} accepts none of our methods"
                          + ("" if proxy.username else " (it may want a user and password)"))
    if method == 2:
        if proxy.username is None:
            raise ConfigError(f"SOCKS proxy {proxy} wants a user and password")
        user = proxy.username.encode()
        password = (proxy.password or "").encode()
        await stream.send_all(b"\x01" + bytes([len(user)]) + user + bytes([len(password)])
                              + password)
        _, status = await _exactly(stream, 2, proxy)
        if status != 0:
            raise ConfigError(f"SOCKS proxy {proxy} refused the user and password")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
        if proxy.scheme == "socks5":  # names are resolved here; socks5h leaves it to the proxy
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            ip = ipaddress.ip_address(infos[0][4][0])
    if ip is None:
        name = host.encode("idna")
        address = b"\x03" + bytes([len(name)]) + name
    else:
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    await stream.send_all(b"\x05\x01\x00" + address + port.to_bytes(2, "big"))
    ver, rep, _, atyp = await _exactly(stream, 4, proxy)
    if rep != 0:
        what = f"SOCKS proxy {proxy} refused the tunnel to {host}:{port}: " \
               f"{_SOCKS_REPLIES.get(rep, f'reply {rep}')}"
        raise ConfigError(what) if rep == 2 else TransportError(what)
    size = {1: 4, 4: 16}.get(atyp)
    if size is None:  # a name: one length byte first
        size = (await _exactly(stream, 1, proxy))[0]
    await _exactly(stream, size + 2, proxy)  # the bound address and port: not needed
