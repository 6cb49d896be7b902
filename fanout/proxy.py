"""HTTP CONNECT proxies for the push connections (servers whose only way out is a proxy).

A proxy comes from ``Client(proxy=...)`` / ``--proxy`` / ``APNS_PROXY``, or else from the
usual environment: ``HTTPS_PROXY`` then ``ALL_PROXY`` (either case), with ``NO_PROXY``
honoured (comma-separated hosts or domain suffixes, ``*`` for all). ``proxy="none"``
turns the environment off. The tunnel is plain ``CONNECT host:port`` with optional basic
auth from the URL's user and password; TLS and HTTP/2 then run inside it, end to end with
APNs (the proxy sees neither the JWT nor the pushes). The password never appears in a log
or an error.
"""

from __future__ import annotations

import base64
import os
from urllib.parse import unquote, urlsplit

import trio

from .errors import ConfigError, TransportError

MAX_RESPONSE_HEAD = 16 * 1024


class Proxy:
    __slots__ = ("host", "port", "username", "password")

    def __init__(self, host: str, port: int, username: str | None = None,
                 password: str | None = None) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.password = password

    @classmethod
    def parse(cls, url: str) -> Proxy:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"proxy must be http://[USER:PASSWORD@]HOST:PORT, not "
                              f"{_redact_url(url)!r} (SOCKS is not supported yet)")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 8080)
        except ValueError:
            raise ConfigError(f"proxy {_redact_url(url)!r}: bad port") from None
        if parts.scheme == "https":
            raise ConfigError("an https:// proxy (TLS to the proxy itself) is not supported; "
                              "use http:// (the tunnel to APNs is TLS end to end anyway)")
        return cls(parts.hostname, port, unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)

    def __repr__(self) -> str:
        who = f"{self.username}:***@" if self.username else ""
        return f"Proxy(http://{who}{self.host}:{self.port})"

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
    if url.lower().startswith(("socks5://", "socks5h://", "socks4://")):
        raise ConfigError(f"proxy from the environment is SOCKS ({_redact_url(url)!r}): not "
                          "supported yet; set an http:// proxy or proxy='none'")
    return Proxy.parse(url)


async def open_tunnel(proxy: Proxy, host: str, port: int) -> trio.SocketStream:
    """A TCP stream to ``host:port`` through ``proxy`` (CONNECT), ready for TLS."""
    try:
        stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    except OSError as exc:
        raise TransportError(f"connect to proxy {proxy} failed: {exc}") from None
    try:
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
            return stream
        what = f"proxy {proxy} refused the tunnel to {host}:{port}: {status_line[:200]}"
        if code == 407:
            raise ConfigError(what + (" (the proxy's credentials were refused)"
                                      if proxy.username else
                                      " (it wants credentials: http://USER:PASSWORD@...)"))
        if code in (401, 403):
            raise ConfigError(what)
        raise TransportError(what)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await stream.aclose()
        raise TransportError(f"proxy {proxy}: {exc}") from None
    except BaseException:
        await stream.aclose()
        raise
