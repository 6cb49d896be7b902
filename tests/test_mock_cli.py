"""``fanout mock`` as another language's test suite uses it (issue 18): a process on a port,
every :class:`MockConfig` behaviour behind a flag, ``GET /stats`` on the same TLS + HTTP/2
listener, throwaway credentials from ``fanout mock-credentials``, ES256 signatures in either
encoding (JOSE r||s, or DER as Java's SHA256withECDSA makes them)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fanout.testing.devcerts import TestSigningKey, client_ssl_context
from fanout.testing.mock import MockConfig, is_sandbox_token

FANOUT = [sys.executable, "-m", "fanout"]
TOPIC = "com.example.app"
BODY = b'{"aps":{"alert":"hi"}}'


def tokens(n: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{i:0{64 - len(prefix)}x}" for i in range(n)]


# ---------------------------------------------------------------- the mock as a process


class MockProcess:
    """``fanout mock --port 0`` with the session's key (and ``extra`` flags)."""

    def __init__(self, tmp_path: Path, key: TestSigningKey | None, *extra: str,
                 pki_dir: Path | None = None) -> None:
        self.pki_dir = pki_dir or tmp_path / "pki"
        self.ca = self.pki_dir / "ca.pem"
        port_file = tmp_path / "port"
        port_file.unlink(missing_ok=True)
        self.stderr_path = tmp_path / "mock.stderr"
        creds = [] if key is None else ["--key-path", str(key.path), "--key-id", key.key_id,
                                        "--team-id", key.team_id]
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                FANOUT + ["mock", "--pki-dir", str(self.pki_dir), "--port", "0",
                          "--port-file", str(port_file), *creds, *extra],
                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the mock did not start: {self.stderr()}")
            time.sleep(0.02)
        self.port = int(port_file.read_text())

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def client(self) -> httpx.Client:
        """A new HTTP/2 client (so a new connection) trusting the mock's CA."""
        return httpx.Client(http2=True, verify=client_ssl_context(self.ca),
                            base_url=f"https://localhost:{self.port}", timeout=5)

    def stats(self) -> dict[str, Any]:
        with self.client() as c:
            r = c.get("/stats")
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert r.headers["content-type"] == "application/json"
        out: dict[str, Any] = r.json()
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def start_mock(tmp_path: Path, signing_key: TestSigningKey) -> Iterator[Callable[..., MockProcess]]:
    started: list[MockProcess] = []

    def start(*extra: str, key: TestSigningKey | None = signing_key, **kw: Any) -> MockProcess:
        run_dir = tmp_path / f"mock{len(started)}"
        run_dir.mkdir()
        mock = MockProcess(run_dir, key, *extra, **kw)
        started.append(mock)
        return mock

    yield start
    for mock in started:
        mock.kill()


def make_jwt(key: TestSigningKey, *, iat: float | None = None, kid: str | None = None) -> str:
    claims = {"iss": key.team_id, "iat": int(time.time() if iat is None else iat)}
    return jwt.encode(claims, key.path.read_bytes(), algorithm="ES256",
                      headers={"kid": kid or key.key_id})


def push(client: httpx.Client, key: TestSigningKey, token: str, *, topic: str = TOPIC,
         push_type: str = "alert", bearer: str | None = None) -> httpx.Response:
    headers = {"authorization": f"bearer {bearer or make_jwt(key)}", "apns-topic": topic,
               "apns-push-type": push_type}
    return client.post(f"/3/device/{token}", content=BODY, headers=headers)


def reason(r: httpx.Response) -> str | None:
    return None if r.status_code == 200 else r.json()["reason"]


class RawH2:
    """A blocking HTTP/2 client that shows what httpx hides: SETTINGS, GOAWAY, unanswered
    streams."""

    def __init__(self, mock: MockProcess) -> None:
        raw = socket.create_connection(("127.0.0.1", mock.port), timeout=5)
        self.sock = client_ssl_context(mock.ca).wrap_socket(raw, server_hostname="localhost")
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.status: dict[int, int] = {}
        self.ended: set[int] = set()
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.settings = False
        self.pong = False
        self._buf = b""
        self.conn.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    @property
    def limit(self) -> int:
        return int(self.conn.remote_settings.max_concurrent_streams)

    def request(self, headers: list[tuple[str, str]], body: bytes = b"") -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self._flush()
        return sid

    def ping(self) -> None:
        self.conn.ping(b"behind!!")
        self._flush()

    def push(self, key: TestSigningKey, token: str) -> int:
        return self.request([(":method", "POST"), (":scheme", "https"),
                             (":authority", "localhost"), (":path", f"/3/device/{token}"),
                             ("authorization", f"bearer {make_jwt(key)}"),
                             ("apns-topic", TOPIC), ("apns-push-type", "alert")], BODY)

    def read_until(self, done: Callable[[], bool]) -> None:
        while not done():
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the mock closed the connection")
            self._buf += data
            while len(self._buf) >= 9 and self.goaway is None:  # one frame at a time: h2
                end = 9 + int.from_bytes(self._buf[:3], "big")  # refuses any after a GOAWAY
                if len(self._buf) < end:
                    break
                frame, self._buf = bytes(self._buf[:end]), self._buf[end:]
                self._events(frame)
            self._flush()

    def _events(self, frame: bytes) -> None:
        for event in self.conn.receive_data(frame):
            if isinstance(event, h2.events.ResponseReceived):
                self.status[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.settings = True
            elif isinstance(event, h2.events.PingAckReceived):
                self.pong = True

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- every behaviour has a flag

_NOT_FLAGS = {"record_bodies": "the bodies stay in the process (MockStats.bodies)"}


def test_every_mock_config_field_has_a_flag(tmp_path: Path, signing_key: TestSigningKey) -> None:
    from fanout._cli import build_parser
    from fanout.testing.command import _mock_config

    unregistered = tmp_path / "dead.txt"
    unregistered.write_text("aa" * 32 + "\n\n" + "bb" * 32 + "\n")
    argv = ["mock", "--key-path", str(signing_key.path), "--key-id", signing_key.key_id,
            "--team-id", signing_key.team_id, "--accept-all",
            "--topics", "com.example.app,com.example.b", "--topics", "com.example.c",
            "--token-max-age", "60", "--token-update-min-interval", "1200", "--allow-key-change",
            "--initial-max-streams", "2", "--max-streams", "50", "--keep-limit-on-reject",
            "--penalty-accepts", "3", "--latency", "0.01", "--jitter", "0.005",
            "--p429", "0.1", "--p500", "0.1", "--p503", "0.1", "--retry-after", "7",
            "--unregistered-tokens", str(unregistered), "--unregistered-fraction", "0.1",
            "--bad-token-fraction", "0.1", "--token-topic", "com.example.app",
            "--environment", "sandbox", "--sandbox-token-fraction", "0.2",
            "--goaway-after", "10", "--goaway-reason", "MaintenanceWindow",
            "--goaway-last-stream-low", "--close-after", "20", "--never-answer", "0.1",
            "--expired-token-wedge", "--seed", "42", "--no-alpn", "--no-broadcast",
            "--max-channels", "5", "--stop-reading-after", "30", "--server-ping-interval", "2",
            "--initial-window-size", "1024", "--expire-token-once-after", "100",
            "--path", "fast"]
    args = build_parser().parse_args(argv)
    config = _mock_config(args)
    default = MockConfig()
    unchanged = [f.name for f in dataclasses.fields(MockConfig)
                 if f.name not in _NOT_FLAGS and getattr(config, f.name) == getattr(default, f.name)]
    assert unchanged == [], f"MockConfig fields without a fanout mock flag: {unchanged}"
    assert config.topics == {"com.example.app", "com.example.b", "com.example.c"}
    assert config.unregistered == {"aa" * 32, "bb" * 32}
    assert set(config.keys) == {signing_key.key_id}
    # and no flag means MockConfig's own defaults
    plain = _mock_config(build_parser().parse_args(["mock"]))
    assert plain == default



def test_topics_flag_checks_topics_and_push_type_suffixes(start_mock, signing_key) -> None:
    from fanout.testing._device import topic_reason

    mock = start_mock("--topics", TOPIC)
    token = tokens(1)[0]
    with mock.client() as c:
        ok = push(c, signing_key, token)
        bare = push(c, signing_key, token, push_type="liveactivity")
        suffixed = push(c, signing_key, token, topic=f"{TOPIC}.push-type.liveactivity",
                        push_type="liveactivity")
        other = push(c, signing_key, token, topic="com.other.app")
    assert ok.status_code == 200 and suffixed.status_code == 200
    assert bare.status_code == 400  # before: 200, the CLI mock checked no topic
    assert reason(bare) == topic_reason(TOPIC, "liveactivity", {TOPIC})
    assert (other.status_code, reason(other)) == (400, "TopicDisallowed")


def test_never_answer_flag_leaves_the_stream_open(start_mock, signing_key) -> None:
    mock = start_mock("--never-answer", "1.0")
    raw = RawH2(mock)
    try:
        sid = raw.push(signing_key, tokens(1)[0])
        raw.ping()  # its ACK comes after any answer to the push
        raw.read_until(lambda: raw.pong)
        assert sid not in raw.status
        stats = mock.stats()
        assert stats["requests"] == 1 and stats["never_answered"] == 1
        assert stats["by_status"] == {}
    finally:
        raw.close()


def test_retry_after_flag_goes_on_429(start_mock, signing_key) -> None:
    mock = start_mock("--p429", "1", "--retry-after", "7")
    with mock.client() as c:
        r = push(c, signing_key, tokens(1)[0])
    assert (r.status_code, reason(r), r.headers.get("retry-after")) == (429, "TooManyRequests", "7")


def test_token_max_age_and_expired_token_wedge_flags(start_mock, signing_key) -> None:
    mock = start_mock("--token-max-age", "60", "--expired-token-wedge")
    token = tokens(1)[0]
    with mock.client() as c:
        old = push(c, signing_key, token, bearer=make_jwt(signing_key, iat=time.time() - 120))
        fresh_on_wedged = push(c, signing_key, token)
    with mock.client() as c:  # a new connection is not wedged
        fresh = push(c, signing_key, token)
    assert (old.status_code, reason(old)) == (403, "ExpiredProviderToken")
    assert (fresh_on_wedged.status_code, reason(fresh_on_wedged)) == (403, "ExpiredProviderToken")
    assert fresh.status_code == 200


def test_goaway_last_stream_low_flag(start_mock, signing_key) -> None:
    mock = start_mock("--goaway-after", "2", "--goaway-last-stream-low")
    raw = RawH2(mock)
    try:
        first = raw.push(signing_key, tokens(2)[0])
        raw.read_until(lambda: first in raw.ended)
        held = raw.push(signing_key, tokens(2)[1])
        raw.read_until(lambda: raw.goaway is not None)
        assert raw.status[first] == 200
        assert raw.goaway is not None and raw.goaway.last_stream_id == first < held
        assert held not in raw.status
    finally:
        raw.close()


def test_goaway_last_stream_low_needs_goaway_after(tmp_path: Path) -> None:
    out = subprocess.run(FANOUT + ["mock", "--pki-dir", str(tmp_path), "--port", "0",
                                   "--goaway-last-stream-low"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "unrecognized" not in out.stderr
    assert "--goaway-last-stream-low needs --goaway-after" in out.stderr


def test_seed_flag_replays_the_random_faults(start_mock, signing_key) -> None:
    mock = start_mock("--seed", "7", "--p500", "0.5")
    rng = random.Random(7)  # MockAPNs draws p500 once per push, nothing else here
    expected = [500 if rng.random() < 0.5 else 200 for _ in range(8)]
    with mock.client() as c:
        got = []
        for i, token in enumerate(tokens(8)):
            got.append(push(c, signing_key, token).status_code)
            if i == 3:  # asking for the stats draws nothing
                assert c.get("/stats").status_code == 200
    assert got == expected and 200 in got and 500 in got


def test_cold_start_stream_limit_and_its_flags(start_mock, signing_key) -> None:
    mock = start_mock("--initial-max-streams", "1", "--max-streams", "50")
    raw = RawH2(mock)
    try:
        raw.read_until(lambda: raw.settings)
        assert raw.limit == 1  # until the first authenticated answer
        sid = raw.push(signing_key, tokens(1)[0])
        raw.read_until(lambda: sid in raw.ended and raw.limit == 50)
        assert raw.status[sid] == 200
    finally:
        raw.close()


# ---------------------------------------------------------------- GET /stats, the exit line


def test_stats_endpoint_answers_what_the_mock_saw(start_mock, signing_key, tmp_path) -> None:
    dead = tokens(1, "dead")[0]
    dead_file = tmp_path / "dead.txt"
    dead_file.write_text(dead + "\n")
    mock = start_mock("--unregistered-tokens", str(dead_file))
    bearer = make_jwt(signing_key)  # one JWT for all but the bad one
    with mock.client() as c:
        codes = [push(c, signing_key, t, bearer=bearer).status_code for t in tokens(3)]
        codes.append(push(c, signing_key, dead, bearer=bearer).status_code)
        codes.append(push(c, signing_key, tokens(1)[0], bearer="not.a.jwt").status_code)
    assert codes == [200, 200, 200, 410, 403]
    stats = mock.stats()
    assert stats["requests"] == 5 and stats["delivered"] == 3 and stats["tokens"] == 4
    assert stats["by_status"] == {"200": 3, "403": 1, "410": 1}
    assert stats["by_reason"] == {"InvalidProviderToken": 1, "Unregistered": 1}
    assert stats["jwts"] == 2  # distinct provider tokens (digests, never the tokens)
    assert stats["connections"] == 1  # the connections that asked for /stats are not counted
    assert stats["protocol_errors"] == 0 and stats["goaways_sent"] == 0
    assert mock.stats()["requests"] == 5  # asking is not a request
    # DELETE /stats answers the same and starts counting again
    with mock.client() as c:
        r = c.delete("/stats")
        assert r.status_code == 200 and r.json()["requests"] == 5
        assert c.post("/stats", content=b"{}").status_code == 405
    assert mock.stats()["requests"] == 0
    assert mock.stop() == 0


def test_stats_endpoint_with_curl(start_mock, signing_key) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    mock = start_mock()
    url = f"https://localhost:{mock.port}"
    header_file = mock.pki_dir.parent / "auth.txt"  # the JWT stays off the command line
    header_file.write_text(f"authorization: bearer {make_jwt(signing_key)}\n")
    pushed = subprocess.run(
        [curl, "--http2", "-sS", "--cacert", str(mock.ca), "-o", "/dev/null", "-w",
         "%{http_code} %{http_version}", "-H", f"@{header_file}", "-H", f"apns-topic: {TOPIC}",
         "-H", "apns-push-type: alert", "--data-binary", BODY.decode(),
         f"{url}/3/device/{tokens(1)[0]}"], capture_output=True, text=True, timeout=30)
    assert pushed.stdout == "200 2", pushed.stderr
    got = subprocess.run([curl, "--http2", "-sS", "--cacert", str(mock.ca), f"{url}/stats"],
                         capture_output=True, text=True, timeout=30)
    stats = json.loads(got.stdout)
    assert stats["delivered"] == 1 and stats["by_status"] == {"200": 1}


def test_exit_prints_a_summary_line_and_the_stats_file_has_it_all(start_mock, signing_key,
                                                                  tmp_path) -> None:
    stats_file = tmp_path / "stats.json"
    mock = start_mock("--stats-file", str(stats_file))
    with mock.client() as c:
        assert [push(c, signing_key, t).status_code for t in tokens(2)] == [200, 200]
    assert mock.stop() == 0
    last = mock.stderr().strip().splitlines()[-1]
    assert last.startswith("fanout mock: ") and "2 requests" in last and "2 delivered" in last
    assert "200: 2" in last
    saved = json.loads(stats_file.read_text())
    assert saved["requests"] == 2 and saved["by_status"] == {"200": 2}
    assert saved["by_reason"] == {} and saved["connections"] == 1


# ---------------------------------------------------------------- credentials


def test_key_path_without_key_id_is_a_usage_error(tmp_path: Path, signing_key) -> None:
    for flags, needle in ((["--key-path", str(signing_key.path)], "--key-id"),
                          (["--key-id", signing_key.key_id], "--key-path")):
        out = subprocess.run(FANOUT + ["mock", "--pki-dir", str(tmp_path), "--port", "0",
                                       *flags], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, out.stderr
        assert needle in out.stderr and "listening" not in out.stderr


def test_mock_credentials_then_a_mock_that_trusts_them(tmp_path: Path, start_mock) -> None:
    creds_dir = tmp_path / "creds"
    out = subprocess.run(FANOUT + ["mock-credentials", str(creds_dir)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    creds = json.loads(out.stdout)
    key_id, team_id = creds["key_id"], creds["team_id"]
    assert len(key_id) == 10 and key_id.isalnum() and len(team_id) == 10
    key_path = Path(creds["key_path"])
    assert key_path == creds_dir.resolve() / f"AuthKey_{key_id}.p8"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert Path(creds["ca_file"]) == creds_dir.resolve() / "ca.pem"
    assert "PRIVATE" not in out.stdout + out.stderr
    public = serialization.load_pem_private_key(key_path.read_bytes(), None).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    key = TestSigningKey(key_path, key_id, team_id, public)
    mock = start_mock("--key-path", str(key_path), "--key-id", key_id, "--team-id", team_id,
                      key=None, pki_dir=Path(creds["pki_dir"]))
    with mock.client() as c:  # TLS verified against the ca.pem it wrote
        assert push(c, key, tokens(1)[0]).status_code == 200
    with mock.client() as c:
        r = push(c, key, tokens(1)[0], bearer=make_jwt(key, kid="OTHERKEY00"))
        assert (r.status_code, reason(r)) == (403, "InvalidProviderToken")


# ---------------------------------------------------------------- sandbox tokens


@pytest.mark.parametrize("fraction, low, high", [(0.0, 0, 0), (0.5, 150, 250), (1.0, 400, 400)])
def test_sandbox_token_fraction(fraction: float, low: int, high: int) -> None:
    config = MockConfig(sandbox_token_fraction=fraction)
    sandbox = sum(is_sandbox_token(t, config) for t in tokens(400))
    assert low <= sandbox <= high


def test_sandbox_token_fraction_one_from_the_command_line(start_mock, signing_key) -> None:
    sandbox = start_mock("--environment", "sandbox", "--sandbox-token-fraction", "1.0")
    production = start_mock("--sandbox-token-fraction", "1.0")
    with sandbox.client() as c:
        assert {push(c, signing_key, t).status_code for t in tokens(8)} == {200}
    with production.client() as c:
        assert {reason(push(c, signing_key, t)) for t in tokens(8)} == {"BadDeviceToken"}


# ---------------------------------------------------------------- DER signatures (Pushy)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _der_jwt(key: TestSigningKey, *, signature: bytes | None = None,
             sign_key: ec.EllipticCurvePrivateKey | None = None) -> str:
    """A JWT the way Pushy (Java's SHA256withECDSA) signs it: the signature DER-encoded."""
    header = _b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": key.key_id}).encode())
    claims = _b64(json.dumps({"iss": key.team_id, "iat": int(time.time())}).encode())
    signing_input = f"{header}.{claims}".encode()
    if signature is None:
        private = sign_key or serialization.load_pem_private_key(key.path.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        signature = private.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    return f"{header}.{claims}.{_b64(signature)}"


def _ber(token: str) -> bytes:
    """The token's DER signature re-encoded with a needless leading zero in r: valid BER,
    not DER (OpenSSL refuses it: one encoding per signature)."""
    der = base64.urlsafe_b64decode(token.split(".")[2] + "==")
    r, s = decode_dss_signature(der)

    def integer(v: int, pad: bytes = b"") -> bytes:
        data = pad + v.to_bytes(v.bit_length() // 8 + 1, "big")
        return b"\x02" + bytes([len(data)]) + data

    body = integer(r, b"\x00") + integer(s)
    return b"\x30" + bytes([len(body)]) + body


def test_der_encoded_es256_signatures_are_accepted(start_mock, signing_key) -> None:
    mock = start_mock()
    der = _der_jwt(signing_key)
    assert base64.urlsafe_b64decode(der.split(".")[2] + "==")[0] == 0x30  # a DER SEQUENCE
    other_key = ec.generate_private_key(ec.SECP256R1())
    refused = {"garbage": _der_jwt(signing_key, signature=os.urandom(71)),
               "garbage DER": _der_jwt(signing_key, signature=b"\x30\x06\x02\x01\x01\x02\x01\x01"),
               "another key": _der_jwt(signing_key, sign_key=other_key),
               "BER, not DER": _der_jwt(signing_key, signature=_ber(_der_jwt(signing_key)))}
    results = {}
    for name, bearer in {"der": der, "raw": make_jwt(signing_key), **refused}.items():
        with mock.client() as c:
            r = push(c, signing_key, tokens(1)[0], bearer=bearer)
            results[name] = (r.status_code, reason(r))
    assert results == {"der": (200, None), "raw": (200, None),
                       **{name: (403, "InvalidProviderToken") for name in refused}}

