"""Push connections through an HTTP CONNECT proxy (issue 9): a real proxy run by the test
(trio, raw sockets: it reads the CONNECT head, checks basic auth, then pipes bytes both
ways), the mock behind it; refusals give a clear error; HTTPS_PROXY / NO_PROXY."""

from __future__ import annotations

import base64

import pytest
import trio

from fanout._engine.proxy import Proxy, bypassed, resolve
from fanout.auth import TokenAuth
from fanout.client import Client
from fanout.errors import ConfigError

from .helpers import mock_server

PAYLOAD = {"aps": {"alert": "through the proxy"}}


class ConnectProxy:
    def __init__(self, *, user: str | None = None, password: str | None = None,
                 refuse: int | None = None, tap: bytearray | None = None) -> None:
        self.user, self.password, self.refuse = user, password, refuse
        self.tap = tap  # every byte from the client after CONNECT, if given
        self.tunnels: list[str] = []
        self.refused: list[str] = []
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = await client.receive_some(4096)
                if not data:
                    return
                head += data
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].decode().split(" ")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.decode().partition(":") for line in lines[1:] if line)}
            if method != "CONNECT":
                await client.send_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            if self.user is not None:
                want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
                if headers.get("proxy-authorization") != want:
                    self.refused.append(target)
                    await client.send_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                          b"Proxy-Authenticate: Basic realm=\"t\"\r\n\r\n")
                    return
            if self.refuse:
                self.refused.append(target)
                await client.send_all(b"HTTP/1.1 %d Forbidden\r\n\r\n" % self.refuse)
                return
            host, port = target.rsplit(":", 1)
            upstream = await trio.open_tcp_stream(host, int(port))
            self.tunnels.append(target)
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            async with upstream:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope, self.tap)
                    nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope, None)


async def _pipe(src, dst, scope, tap: bytearray | None) -> None:
    try:
        while data := await src.receive_some(65536):
            if tap is not None:
                tap.extend(data)
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _send(mock, pki, key, n: int, **kw) -> list:
    auth = TokenAuth.from_file(key.path, key.key_id, key.team_id)
    async with Client(auth=auth, topic="com.example.app", host="127.0.0.1", port=mock.port,
                      ca_file=str(pki.ca_file), unavailable_timeout=2.0, **kw) as client:
        with trio.fail_after(30):
            return [r async for r in client.fan_out(PAYLOAD, (f"{i:064x}" for i in range(n)))]


async def test_pushes_go_through_the_proxy_with_basic_auth(pki, signing_key):
    proxy = ConnectProxy(user="fan", password="s3cr:t")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with mock_server(pki, signing_key) as mock:
            results = await _send(mock, pki, signing_key, 500,
                                  proxy=f"http://fan:s3cr%3At@127.0.0.1:{port}")
        nursery.cancel_scope.cancel()
    assert [r.outcome for r in results] == ["delivered"] * 500
    assert proxy.tunnels and set(proxy.tunnels) == {f"127.0.0.1:{mock.port}"}
    assert len(mock.stats.delivered) == 500 and mock.stats.connections == len(proxy.tunnels)


@pytest.mark.parametrize(("proxy_kw", "url_auth", "needle"), [
    ({"refuse": 403}, "", "refused the tunnel"),
    ({"user": "fan", "password": "right"}, "", "wants credentials"),
    ({"user": "fan", "password": "right"}, "fan:wrong@", "credentials were refused"),
])
async def test_a_refused_tunnel_is_a_clear_config_error(pki, signing_key, proxy_kw, url_auth,
                                                        needle, caplog):
    proxy = ConnectProxy(**proxy_kw)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with mock_server(pki, signing_key) as mock:
            results = await _send(mock, pki, signing_key, 3,
                                  proxy=f"http://{url_auth}127.0.0.1:{port}")
        nursery.cancel_scope.cancel()
    assert {r.outcome for r in results} == {"config_error"}
    assert all(needle in r.error and f"127.0.0.1:{mock.port}" in r.error for r in results)
    assert proxy.refused and not proxy.tunnels and mock.stats.requests == 0
    assert "wrong" not in caplog.text and "right" not in caplog.text  # no password logged


async def test_https_proxy_from_the_environment_and_no_proxy(pki, signing_key, monkeypatch):
    proxy = ConnectProxy()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with mock_server(pki, signing_key) as mock:
            monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            assert [r.ok for r in await _send(mock, pki, signing_key, 20)] == [True] * 20
            through = len(proxy.tunnels)
            monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
            assert [r.ok for r in await _send(mock, pki, signing_key, 20)] == [True] * 20
            assert len(proxy.tunnels) == through  # bypassed
            monkeypatch.delenv("NO_PROXY")
            assert [r.ok for r in await _send(mock, pki, signing_key, 20, proxy="none")] \
                == [True] * 20
            assert len(proxy.tunnels) == through  # turned off explicitly
        nursery.cancel_scope.cancel()
    assert through >= 1


def test_resolution_rules():
    env = {"HTTPS_PROXY": "http://p.corp:3128", "NO_PROXY": ".internal, example.org ,"}
    assert str(resolve(None, "api.push.apple.com", env)) == "p.corp:3128"
    assert resolve(None, "redis.internal", env) is None
    assert resolve(None, "a.example.org", env) is None and resolve(None, "example.org", env) is None
    assert str(resolve(None, "badexample.org", env)) == "p.corp:3128"
    assert resolve("none", "api.push.apple.com", env) is None
    assert str(resolve(None, "x", {"all_proxy": "http://q:1"})) == "q:1"
    assert resolve(None, "x", {}) is None
    assert bypassed("anything", "*")
    p = Proxy.parse("http://user:p%40ss@proxy:8080")
    assert (p.username, p.password, p.port) == ("user", "p@ss", 8080)
    assert "p@ss" not in repr(p) and "p%40ss" not in repr(p)
    for bad in ("ftp://u:pw@x:1", "http://", "https://u:pw@p:3128", "socks4://u:pw@s:1"):
        with pytest.raises(ConfigError) as info:
            resolve(bad, "x")
        assert "pw" not in str(info.value)
    s = resolve(None, "x", {"ALL_PROXY": "socks5h://u:pw@s"})
    assert (s.scheme, s.port) == ("socks5h", 1080) and "pw" not in repr(s)


async def test_the_proxy_sees_only_tls(pki, signing_key):
    """The tunnel is TLS end to end: the proxy's bytes hold no JWT, token or payload."""
    seen = bytearray()
    proxy = ConnectProxy(tap=seen)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with mock_server(pki, signing_key) as mock:
            results = await _send(mock, pki, signing_key, 5, proxy=f"http://127.0.0.1:{port}")
        nursery.cancel_scope.cancel()
    assert all(r.ok for r in results) and len(seen) > 1000
    assert b"eyJ" not in seen and f"{1:064x}".encode() not in seen and b"aps" not in seen


async def test_channel_management_goes_through_the_proxy_too(pki, signing_key):
    """httpx (HTTP/2 inside the CONNECT tunnel) for the channel-management host: create,
    then broadcast on the push connections, both through the proxy."""
    proxy = ConnectProxy(user="fan", password="pw")
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with mock_server(pki, signing_key) as mock:
            async with Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                              port=mock.port, ca_file=str(pki.ca_file), connections=1,
                              proxy=f"http://fan:pw@127.0.0.1:{port}") as client:
                with trio.fail_after(20):
                    channel = await client.channels.create(storage_policy=0)
                    result = await client.broadcast(channel.channel_id, PAYLOAD)
        nursery.cancel_scope.cancel()
    assert result.ok, result
    assert len(proxy.tunnels) == 2  # the one push connection and the management client
    assert mock.stats.connections == 2


class Socks5Proxy:
    """RFC 1928 CONNECT with no auth or RFC 1929 user/password; resolves names itself."""

    def __init__(self, *, user: str | None = None, password: str | None = None,
                 reply: int = 0) -> None:
        self.user, self.password, self.reply = user, password, reply
        self.tunnels: list[tuple[int, str]] = []  # (address type, target)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        async def exactly(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = await client.receive_some(n - len(data))
                if not chunk:
                    raise trio.BrokenResourceError
                data += chunk
            return data

        async with client:
            try:
                _, n = await exactly(2)
                methods = await exactly(n)
                want = 2 if self.user is not None else 0
                if want not in methods:
                    await client.send_all(b"\x05\xff")
                    return
                await client.send_all(bytes([5, want]))
                if want == 2:
                    _, ulen = await exactly(2)
                    user = (await exactly(ulen)).decode()
                    plen = (await exactly(1))[0]
                    password = (await exactly(plen)).decode()
                    ok = (user, password) == (self.user, self.password)
                    await client.send_all(b"\x01\x00" if ok else b"\x01\x01")
                    if not ok:
                        return
                _, cmd, _, atyp = await exactly(4)
                if atyp == 3:
                    host = (await exactly((await exactly(1))[0])).decode()
                else:
                    import ipaddress
                    host = str(ipaddress.ip_address(await exactly(4 if atyp == 1 else 16)))
                port = int.from_bytes(await exactly(2), "big")
                if self.reply:
                    await client.send_all(bytes([5, self.reply, 0, 1]) + bytes(6))
                    return
                upstream = await trio.open_tcp_stream(host, port)
                self.tunnels.append((atyp, f"{host}:{port}"))
                await client.send_all(b"\x05\x00\x00\x01" + bytes(6))
            except trio.BrokenResourceError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope, None)
                nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope, None)


@pytest.mark.parametrize(("scheme", "host", "atyp"), [("socks5", "localhost", 1),
                                                      ("socks5h", "localhost", 3)])
async def test_pushes_go_through_a_socks5_proxy(pki, signing_key, scheme, host, atyp):
    """socks5://: the name is resolved here (the proxy gets an address); socks5h://: the
    proxy gets the name. User and password per RFC 1929."""
    proxy = Socks5Proxy(user="fan", password="pw")
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with mock_server(pki, signing_key) as mock:
            async with Client(auth=auth, topic="com.example.app", host=host, port=mock.port,
                              ca_file=str(pki.ca_file),
                              proxy=f"{scheme}://fan:pw@127.0.0.1:{port}") as client:
                with trio.fail_after(30):
                    results = [r async for r in client.fan_out(
                        PAYLOAD, (f"{i:064x}" for i in range(200)))]
        nursery.cancel_scope.cancel()
    assert all(r.ok for r in results) and len(mock.stats.delivered) == 200
    assert proxy.tunnels and {a for a, _ in proxy.tunnels} == {atyp}


@pytest.mark.parametrize(("proxy_kw", "url_auth", "needle", "outcome"), [
    ({"user": "fan", "password": "pw"}, "fan:nope@", "refused the user and password",
     "config_error"),
    ({"user": "fan", "password": "pw"}, "", "none of our methods", "config_error"),
    ({"reply": 2}, "", "not allowed by ruleset", "config_error"),
    ({"reply": 5}, "", "connection refused", "retries_exhausted"),
])
async def test_socks5_refusals_are_clear(pki, signing_key, proxy_kw, url_auth, needle,
                                         outcome, caplog):
    proxy = Socks5Proxy(**proxy_kw)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with mock_server(pki, signing_key) as mock:
            results = await _send(mock, pki, signing_key, 2, max_attempts=2,
                                  proxy=f"socks5://{url_auth}127.0.0.1:{port}")
        nursery.cancel_scope.cancel()
    assert {str(r.outcome) for r in results} == {outcome}, [r.error for r in results]
    assert all(needle in r.error for r in results) and mock.stats.requests == 0
    assert "nope" not in caplog.text
