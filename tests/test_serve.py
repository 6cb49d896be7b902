"""``fanout serve`` (issue 17) as a real process in front of ``fanout mock`` (a process too),
driven by real HTTP clients: httpx over HTTP/1.1 and HTTP/2 (h2c), and curl."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from fanout._serve.keys import hash_key
from fanout.testing.devcerts import TestSigningKey

from .helpers import tokens
from .test_examples import ROOT, START_TIMEOUT, Mock, _stop, _wait_for

KEY = "k_test_0123456789abcdef"
LIMITED_KEY = "k_limited_0123456789"
OTHER_TOPIC_KEY = "k_other_topic_012345"
HTTP_TIMEOUT = 20.0
PAYLOAD = {"aps": {"alert": "hi"}}


def apns_env(mock: Mock) -> dict[str, str]:
    """The mock's settings as the APNS_* variables every fanout command reads."""
    env = dict(mock.env)
    for name in ("HOST", "PORT", "CA_FILE", "KEY_PATH", "KEY_ID", "TEAM_ID", "TOPIC",
                 "CONNECTIONS"):
        env[f"APNS_{name}"] = env.pop(f"FANOUT_{name}")
    return env


class Serve:
    """``fanout serve`` as a process, on a port of its choosing."""

    def __init__(self, tmp_path: Path, mock: Mock, *extra: str,
                 env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.log = tmp_path / "serve.log"
        self.port_file = tmp_path / "serve-port"
        self.port_file.unlink(missing_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fanout", "serve", "--listen", "127.0.0.1:0",
                 "--port-file", str(self.port_file), *extra],
                cwd=ROOT, env={**apns_env(mock), **(env or {})}, stdout=out,
                stderr=subprocess.STDOUT)
        self.url = ""
        if wait:
            port = _wait_for(lambda: self.port_file.exists() and self.port_file.read_text(),
                             "fanout serve listening", self.proc, self.log)
            self.url = f"http://127.0.0.1:{int(port)}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        return _stop(self.proc)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory,
          signing_key: TestSigningKey) -> Iterator[tuple[Mock, Serve]]:
    """One mock and one server for the module's tests (each reads only its own pushes)."""
    tmp = tmp_path_factory.mktemp("serve")
    keys = tmp / "keys"
    keys.write_text(f"# API keys\n{hash_key(KEY)} name=main\n"
                    f"{LIMITED_KEY} name=limited rate=2\n"
                    f"{OTHER_TOPIC_KEY} name=other topics=com.example.other\n")
    mock = Mock(tmp, signing_key)
    serve = Serve(tmp, mock, "--api-keys", str(keys), "--max-body", "65536",
                  "--max-tokens", "500", "--body-timeout", "2")
    try:
        yield mock, serve
    finally:
        serve.kill()
        mock.kill()


def client(serve: Serve, *, http2: bool = False, key: str | None = KEY) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=serve.url, http1=not http2, http2=http2, headers=headers,
                        timeout=HTTP_TIMEOUT)


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


# ---------------------------------------------------------------- the endpoints


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_one_push_answers_its_result(stack: tuple[Mock, Serve], http2: bool) -> None:
    _, serve = stack
    with client(serve, http2=http2) as http:
        r = http.post("/v1/push", json={"token": "ab" * 32, "payload": PAYLOAD, "id": "one"})
        assert r.status_code == 200, r.text
        assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        body = r.json()
        assert body["outcome"] == "delivered" and body["id"] == "one"
        assert body["status"] == 200 and body["line"] == 1


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "not JSON"),
    (b'{"payload": {"aps": {"alert": "x"}}}', "missing token"),
    (b'{"token": "not hex", "payload": {"aps": {"alert": "x"}}}', "token"),
    (b'{"token": "' + b"ab" * 32 + b'", "tokens_file": "/etc/passwd", "payload": {}}',
     "exactly one"),
    (b'{"tokens_file": "/etc/passwd", "payload": {"aps": {}}}', "tokens_file"),
    (b'{"token": "' + b"ab" * 32 + b'", "payload": {"aps": {"alert": "' + b"x" * 5000 + b'"}}}',
     "4096"),
])
def test_a_bad_push_is_a_400_naming_the_problem(stack: tuple[Mock, Serve], body: bytes,
                                                message: str) -> None:
    _, serve = stack
    with client(serve) as http:
        r = http.post("/v1/push", content=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "bad_request" and message in error["message"]


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_pushes_stream_one_result_per_push(stack: tuple[Mock, Serve], http2: bool) -> None:
    _, serve = stack
    lines = [json.dumps({"token": t, "payload": PAYLOAD, "id": i})
             for i, t in enumerate(tokens(40, "a1"))]
    lines.insert(5, "{broken")
    lines.append(json.dumps({"tokens": tokens(10, "b1"), "payload": PAYLOAD, "id": "fan"}))
    with client(serve, http2=http2) as http:
        r = http.post("/v1/pushes", content="\n".join(lines) + "\n",
                      headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/x-ndjson")
        results = ndjson(r)
    assert len(results) == 51
    bad = [x for x in results if x["outcome"] == "malformed"]
    assert len(bad) == 1 and bad[0]["line"] == 6 and "not JSON" in bad[0]["error"]
    assert sum(x["outcome"] == "delivered" for x in results) == 50
    assert sorted(x["line"] for x in results if x.get("id") == "fan") == [42] * 10


def test_pushes_as_a_json_array(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve) as http:
        r = http.post("/v1/pushes", json=[{"token": t, "payload": PAYLOAD}
                                          for t in tokens(5, "c1")])
        assert r.status_code == 200
        assert [x["outcome"] for x in ndjson(r)] == ["delivered"] * 5


def test_fanout_one_payload_many_tokens(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve, http2=True) as http:
        r = http.post("/v1/fanout", json={"payload": PAYLOAD, "tokens": tokens(100, "f1"),
                                          "id": "sale"})
        assert r.status_code == 200, r.text
        results = ndjson(r)
    assert len(results) == 100 and all(x["outcome"] == "delivered" for x in results)
    assert {x["token"] for x in results} == set(tokens(100, "f1"))


def test_curl_sends_a_push(stack: tuple[Mock, Serve]) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    _, serve = stack
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-H", f"Authorization: Bearer {KEY}",
         "-H", "content-type: application/json", "--data",
         json.dumps({"token": "cd" * 32, "payload": PAYLOAD}), f"{serve.url}/v1/push"],
        capture_output=True, timeout=HTTP_TIMEOUT, check=True)
    assert json.loads(out.stdout)["outcome"] == "delivered"


def test_health_and_readiness(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve, key=None) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").status_code == 401
    with client(serve) as http:
        _wait_for(lambda: http.get("/readyz").status_code == 200, "ready", serve.proc,
                  serve.log)
        assert http.get("/readyz").json() == {"status": "ready"}
        assert http.get("/nowhere").status_code == 404
        r = http.get("/v1/push")
        assert r.status_code == 405 and r.headers["allow"] == "POST"


# ---------------------------------------------------------------- who gets in


@pytest.mark.parametrize("header", [None, "Bearer wrong-key-0123456789", f"Basic {KEY}",
                                    f"Bearer {KEY}x"])
def test_a_request_without_a_valid_key_is_refused(stack: tuple[Mock, Serve],
                                                  header: str | None) -> None:
    mock, serve = stack
    headers = {"authorization": header} if header else {}
    with httpx.Client(base_url=serve.url, timeout=HTTP_TIMEOUT) as http:
        for path in ("/v1/push", "/v1/pushes", "/v1/fanout", "/v1/channels"):
            r = http.post(path, json={"token": "ab" * 32, "payload": PAYLOAD}, headers=headers)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
        assert http.get("/metrics", headers=headers).status_code == 401


def test_a_key_limited_to_other_topics_is_forbidden(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve, key=OTHER_TOPIC_KEY) as http:
        r = http.post("/v1/push", json={"token": "ab" * 32, "payload": PAYLOAD})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_topic"
        r = http.post("/v1/pushes", json=[{"token": "ab" * 32, "payload": PAYLOAD}])
        assert ndjson(r)[0]["outcome"] == "rejected"


def test_a_key_over_its_rate_gets_429_with_retry_after(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve, key=LIMITED_KEY) as http:
        codes = [http.post("/v1/push", json={"token": t, "payload": PAYLOAD}).status_code
                 for t in tokens(4, "d1")]
        assert codes[:2] == [200, 200]
        r = http.post("/v1/push", json={"token": "ef" * 32, "payload": PAYLOAD})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


# ---------------------------------------------------------------- limits


def test_a_body_over_the_limit_is_413(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve) as http:
        r = http.post("/v1/push", content=b"x" * 70_000)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_too_many_tokens_is_400(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve) as http:
        r = http.post("/v1/fanout", json={"payload": PAYLOAD, "tokens": tokens(501, "e1")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_tokens"


def test_a_body_that_stalls_is_cut_with_408(stack: tuple[Mock, Serve]) -> None:
    """A client that sends part of a body and stops: 408 after --body-timeout."""
    import socket

    _, serve = stack
    port = int(serve.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(b"POST /v1/push HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " +
                     KEY.encode() + b"\r\ncontent-length: 100\r\n\r\n{\"tok")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:200]


# ---------------------------------------------------------------- start-up refusals


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--listen", "0.0.0.0:0"], {}, "no API keys"),
    (["--listen", "0.0.0.0:0"], {"FANOUT_API_KEYS": KEY}, "needs TLS"),
    (["--tls-cert", "x.pem"], {}, "both --tls-cert and --tls-key"),
    (["--api-keys", "/nonexistent/keys"], {}, "/nonexistent/keys"),
    (["--listen", "nonsense"], {}, "HOST:PORT"),
])
def test_serve_refuses_to_open_an_unsafe_port(tmp_path: Path, signing_key: TestSigningKey,
                                              args: list[str], env: dict[str, str],
                                              message: str) -> None:
    mock_env = {"APNS_TOPIC": "com.example.app", "APNS_KEY_PATH": str(signing_key.path),
                "APNS_KEY_ID": signing_key.key_id, "APNS_TEAM_ID": signing_key.team_id}
    import os

    out = subprocess.run([sys.executable, "-m", "fanout", "serve", *args], cwd=ROOT,
                         env={**os.environ, **mock_env, **env}, capture_output=True,
                         timeout=START_TIMEOUT)
    assert out.returncode == 2 or out.returncode != 0
    assert message in out.stderr.decode(), out.stderr.decode()


def test_no_secret_in_the_servers_log(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    text = serve.output()
    assert KEY not in text and LIMITED_KEY not in text and "ab" * 32 not in text


def _in_flight(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("fanout_in_flight{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sigterm_answers_the_pushes_in_flight_then_exits_zero(
        tmp_path: Path, signing_key: TestSigningKey) -> None:
    """SIGTERM while a push waits for APNs and a stream is mid-body: the push is answered,
    the stream's pushes already sent are answered and its last line says where reading
    stopped; then the server exits 0."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    mock = Mock(tmp_path, signing_key, "--latency", "1.5")
    serve = Serve(tmp_path, mock)
    resume = threading.Event()

    def body() -> Iterator[bytes]:
        for t in tokens(3, "a2"):
            yield (json.dumps({"token": t, "payload": PAYLOAD}) + "\n").encode()
        resume.wait(START_TIMEOUT)
        yield (json.dumps({"token": "ab" * 32, "payload": PAYLOAD}) + "\n").encode()

    try:
        with httpx.Client(base_url=serve.url, timeout=HTTP_TIMEOUT) as http, \
                httpx.Client(base_url=serve.url, timeout=HTTP_TIMEOUT) as watch, \
                ThreadPoolExecutor(2) as pool:
            _wait_for(lambda: watch.get("/readyz").status_code == 200, "ready", serve.proc,
                      serve.log)
            one = pool.submit(http.post, "/v1/push",
                              json={"token": "cd" * 32, "payload": PAYLOAD})
            with httpx.Client(base_url=serve.url, timeout=HTTP_TIMEOUT) as streamer:
                stream = pool.submit(streamer.post, "/v1/pushes", content=body(),
                                     headers={"content-type": "application/x-ndjson"})
                _wait_for(lambda: _in_flight(watch) == 4, "4 pushes in flight", serve.proc,
                          serve.log)
                serve.proc.send_signal(signal.SIGTERM)
                _wait_for(lambda: "draining" in serve.output(), "the drain", serve.proc,
                          serve.log)
                resume.set()
                r = one.result(START_TIMEOUT)
                streamed = stream.result(START_TIMEOUT)
        assert r.status_code == 200 and r.json()["outcome"] == "delivered"
        lines = ndjson(streamed)
        assert [x["outcome"] for x in lines[:3]] == ["delivered"] * 3
        assert lines[3]["error"]["code"] == "shutting_down"
        assert "from 4 on" in lines[3]["error"]["message"]
        assert serve.proc.wait(START_TIMEOUT) == 0, serve.output()
    finally:
        resume.set()
        serve.kill()
        mock.kill()


def test_metrics_count_requests_by_endpoint(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve) as http:
        assert http.post("/v1/push", json={"token": "ab" * 32, "payload": PAYLOAD}).is_success
        text = http.get("/metrics").text
    assert 'fanout_serve_requests_total{endpoint="/v1/push",status="200"}' in text
    assert "fanout_pushes_total" in text


def test_channels_and_a_broadcast(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve, http2=True) as http:
        r = http.post("/v1/channels", json={"storage_policy": 0})
        assert r.status_code == 201, r.text
        channel = r.json()["channel_id"]
        assert channel in http.get("/v1/channels").json()["channels"]
        path = "/v1/channels/" + quote(channel, safe="")  # base64: "/" and "+" are quoted
        assert http.get(path).json()["channel_id"] == channel, channel
        r = http.post(f"{path}/broadcast",
                      json={"payload": {"aps": {"event": "update", "timestamp": 1,
                                                "content-state": {"score": 1}}}})
        assert r.status_code == 200, r.text
        assert r.json()["outcome"] == "delivered" and r.json()["channel_id"] == channel
        assert http.delete(path).status_code == 204
        gone = http.get(path)  # APNs' own answer for a deleted channel, passed on
        assert gone.status_code in (400, 404) and gone.json()["error"]["code"] == "apns_error"


def test_gorush_api_push_switches_by_changing_a_url(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    body = {"notifications": [
        {"tokens": tokens(3, "b2"), "platform": 1, "message": "Hello", "title": "Hi",
         "badge": 1, "sound": "default", "notif_id": "n1"},
        {"tokens": ["b3" * 32], "platform": 2, "message": "Android"},
        {"tokens": ["not hex"], "platform": 1, "message": "bad"},
    ]}
    with client(serve) as http:
        r = http.post("/api/push", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["success"] == "ok" and answer["counts"] == 4
        errors = {e["token"]: e for e in answer["logs"]}
        assert "Android" in errors["b3" * 32]["error"] or errors["b3" * 32]["error"]
        assert "not hex" in errors
        assert not any(t in errors for t in tokens(3, "b2"))
        bad = http.post("/api/push", json={"notifications": []})
        assert bad.status_code == 400 and "empty" in bad.json()["message"]


def test_the_openapi_document_is_served(stack: tuple[Mock, Serve]) -> None:
    _, serve = stack
    with client(serve) as http:
        doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1") and "/v1/push" in doc["paths"]


# ---------------------------------------------------------------- --to redis://


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_durable_mode_hands_pushes_to_the_fleet(tmp_path: Path,
                                                signing_key: TestSigningKey) -> None:
    """--to redis://: accepted pushes become entries (202 with their ids), a bad one is a
    400 and no entry; a fleet daemon then delivers every entry."""
    from .test_fleet import Redis

    redis = Redis(tmp_path)
    redis.start()
    mock = Mock(tmp_path, signing_key)
    serve = Serve(tmp_path, mock, "--to", f"{redis.url}")
    daemon = None
    try:
        with client(serve, key=None) as http:
            _wait_for(lambda: http.get("/readyz").status_code == 200, "ready", serve.proc,
                      serve.log)
            one = http.post("/v1/push", json={"token": "ab" * 32, "payload": PAYLOAD,
                                              "id": "one"})
            assert one.status_code == 202, one.text
            assert one.json()["id"] == "one" and "-" in one.json()["entry"]
            bad = http.post("/v1/push", json={"token": "ab" * 32,
                                              "payload": {"aps": {"alert": "x" * 5000}}})
            assert bad.status_code == 400
            lines = [json.dumps({"token": t, "payload": PAYLOAD, "id": i})
                     for i, t in enumerate(tokens(4, "a3"))] + ["{broken"]
            many = http.post("/v1/pushes", content="\n".join(lines),
                             headers={"content-type": "application/x-ndjson"})
            assert many.status_code == 202
            answers = ndjson(many)
            assert [a.get("entry") is not None for a in answers] == [True] * 4 + [False]
            assert answers[4]["outcome"] == "malformed"
            fan = http.post("/v1/fanout", json={"payload": PAYLOAD, "tokens": tokens(3, "a4")})
            assert [a["line"] for a in ndjson(fan)] == [1]
            assert http.post("/v1/channels", json={}).status_code == 501
        assert redis.cli("XLEN", "pushes") == "6"
        out = tmp_path / "fleet-results.ndjson"
        with (tmp_path / "fleet.log").open("wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "fanout", "run", "--source", redis.url, "--group",
                 "senders", "--results", str(out)], cwd=ROOT, env=apns_env(mock),
                stdout=log, stderr=subprocess.STDOUT)
        _wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 8,
                  "the fleet's results", daemon, tmp_path / "fleet.log")
        results = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(results) == 8 and all(r["outcome"] == "delivered" for r in results)
        assert {r["id"] for r in results} >= {"one", 0, 1, 2, 3}
    finally:
        if daemon is not None:
            _stop(daemon)
        serve.kill()
        mock.kill()
        redis.stop()


def test_tls_with_alpn_h2_and_http1(tmp_path: Path, signing_key: TestSigningKey,
                                    pki: Any) -> None:
    """--tls-cert/--tls-key: HTTP/2 chosen by ALPN, HTTP/1.1 for a client that offers only
    it; a non-loopback bind is then allowed (with keys)."""
    mock = Mock(tmp_path, signing_key)
    serve = Serve(tmp_path, mock, "--tls-cert", str(pki.cert_file), "--tls-key",
                  str(pki.key_file), env={"FANOUT_API_KEYS": KEY})
    url = serve.url.replace("http://", "https://")
    try:
        for http2 in (True, False):
            with httpx.Client(base_url=url, http1=not http2, http2=http2,
                              verify=ssl.create_default_context(cafile=str(pki.ca_file)),
                              timeout=HTTP_TIMEOUT,
                              headers={"authorization": f"Bearer {KEY}"}) as http:
                r = http.post("/v1/push", json={"token": "ab" * 32, "payload": PAYLOAD})
                assert r.status_code == 200 and r.json()["outcome"] == "delivered"
                assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert "https://127.0.0.1:" in serve.output()
    finally:
        serve.kill()
        mock.kill()


def test_requests_over_max_requests_get_429(tmp_path: Path,
                                           signing_key: TestSigningKey) -> None:
    from concurrent.futures import ThreadPoolExecutor

    mock = Mock(tmp_path, signing_key, "--latency", "1.5")
    serve = Serve(tmp_path, mock, "--max-requests", "1")
    try:
        with client(serve, key=None) as http, client(serve, key=None) as other, \
                ThreadPoolExecutor(1) as pool:
            _wait_for(lambda: other.get("/readyz").status_code == 200, "ready", serve.proc,
                      serve.log)
            first = pool.submit(http.post, "/v1/push",
                                json={"token": "ab" * 32, "payload": PAYLOAD})
            _wait_for(lambda: _in_flight(other) == 1, "the first push in flight", serve.proc,
                      serve.log)
            second = other.post("/v1/push", json={"token": "cd" * 32, "payload": PAYLOAD})
            assert second.status_code == 429, second.text
            assert second.json()["error"]["code"] == "too_many_requests"
            assert second.headers["retry-after"] == "1"
            assert first.result(START_TIMEOUT).json()["outcome"] == "delivered"
    finally:
        serve.kill()
        mock.kill()


def test_at_the_drain_deadline_every_push_still_out_is_answered(
        tmp_path: Path, signing_key: TestSigningKey) -> None:
    """SIGTERM while APNs never answers: at --drain-timeout the pushes in flight end
    maybe_delivered, each in its own request's answer; none is left without a word."""
    from concurrent.futures import ThreadPoolExecutor

    mock = Mock(tmp_path, signing_key)
    serve = Serve(tmp_path, mock, "--drain-timeout", "0.5")
    try:
        with client(serve, key=None) as http, client(serve, key=None) as streamer, \
                client(serve, key=None) as watch, ThreadPoolExecutor(2) as pool:
            _wait_for(lambda: watch.get("/readyz").status_code == 200, "ready", serve.proc,
                      serve.log)
            mock.proc.send_signal(signal.SIGSTOP)  # APNs is there, and never answers
            try:
                one = pool.submit(http.post, "/v1/push",
                                  json={"token": "ab" * 32, "payload": PAYLOAD, "id": "one"})
                lines = "\n".join(json.dumps({"token": t, "payload": PAYLOAD, "id": i})
                                  for i, t in enumerate(tokens(3, "a5")))
                many = pool.submit(streamer.post, "/v1/pushes", content=lines,
                                   headers={"content-type": "application/x-ndjson"})
                _wait_for(lambda: _in_flight(watch) == 4, "4 pushes in flight", serve.proc,
                          serve.log)
                serve.proc.send_signal(signal.SIGTERM)
                r = one.result(START_TIMEOUT)
                streamed = ndjson(many.result(START_TIMEOUT))
            finally:
                mock.proc.send_signal(signal.SIGCONT)
        assert r.status_code == 200, r.text
        assert r.json()["outcome"] == "maybe_delivered" and r.json()["id"] == "one"
        assert sorted(x["id"] for x in streamed[:3]) == [0, 1, 2]
        assert {x["outcome"] for x in streamed[:3]} == {"maybe_delivered"}
        assert streamed[3]["error"]["code"] == "shutting_down"
        assert serve.proc.wait(START_TIMEOUT) == 0, serve.output()
        assert "drain deadline" in serve.output()
    finally:
        serve.kill()
        mock.kill()


def test_teams_route_pushes_by_topic(tmp_path: Path, signing_key: TestSigningKey) -> None:
    """[[team]] tables (--teams FILE): each push goes through the team serving its topic,
    and its result names that team; a topic no team serves is a config_error result."""
    teams = tmp_path / "teams.toml"
    teams.write_text(
        f'[[team]]\nname = "acme"\ntopics = ["com.acme.app"]\nkey_path = "{signing_key.path}"\n'
        f'key_id = "{signing_key.key_id}"\nteam_id = "TEAMACME01"\nenvironments = ["production"]\n'
        f'\n[[team]]\nname = "beta"\ntopics = ["com.beta.app"]\nkey_path = "{signing_key.path}"\n'
        f'key_id = "{signing_key.key_id}"\nteam_id = "{signing_key.team_id}"\n'
        f'environments = ["production"]\n')  # the mock checks channel requests' JWTs
    mock = Mock(tmp_path, signing_key, "--accept-all")
    serve = Serve(tmp_path, mock, "--teams", str(teams))
    try:
        with client(serve, key=None, http2=True) as http:
            _wait_for(lambda: http.get("/readyz").status_code == 200, "ready", serve.proc,
                      serve.log)
            lines = [{"token": "ab" * 32, "payload": PAYLOAD, "topic": "com.acme.app", "id": 1},
                     {"token": "cd" * 32, "payload": PAYLOAD, "topic": "com.beta.app", "id": 2},
                     {"token": "ef" * 32, "payload": PAYLOAD, "topic": "com.other.app", "id": 3}]
            r = http.post("/v1/pushes", json=lines)
            by_id = {x["id"]: x for x in ndjson(r)}
            one = http.post("/v1/push", json={**lines[1], "id": 4}).json()
            made = http.post("/v1/channels?topic=com.beta.app", json={"storage_policy": 0})
            assert made.status_code == 201, made.text
            listed = http.get("/v1/channels", params={"topic": "com.beta.app"}).json()
            assert made.json()["channel_id"] in listed["channels"]
            nobody = http.get("/v1/channels", params={"topic": "com.other.app"})
            assert nobody.status_code == 400 and "com.other.app" in nobody.text
            bad = http.get("/v1/channels", params={"topic": "../../etc"})
            assert bad.status_code == 400
    finally:
        serve.kill()
        mock.kill()
    assert by_id[1]["team"] == "acme" and by_id[1]["outcome"] == "delivered"
    assert by_id[2]["team"] == "beta" and by_id[2]["outcome"] == "delivered"
    assert by_id[3]["outcome"] == "config_error" and "com.other.app" in by_id[3]["error"]
    assert one["team"] == "beta" and one["outcome"] == "delivered"


def test_headers_that_never_end_are_cut_at_the_header_timeout(
        tmp_path: Path, signing_key: TestSigningKey) -> None:
    """Slowloris: a connection whose headers are not complete within --header-timeout is
    closed, and the server keeps serving others."""
    import socket

    mock = Mock(tmp_path, signing_key)
    serve = Serve(tmp_path, mock, "--header-timeout", "0.5")
    port = int(serve.url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT) as sock:
            sock.sendall(b"POST /v1/push HTTP/1.1\r\nhost: x\r\nx-slow: 1")
            with client(serve, key=None) as http:  # meanwhile, others are served
                assert http.get("/healthz").status_code == 200
            assert sock.recv(4096) == b""  # closed by the server (the recv has a timeout)
    finally:
        serve.kill()
        mock.kill()


def test_serve_options_come_from_flag_variable_config_or_default(tmp_path: Path) -> None:
    """Like every command's settings: flag > FANOUT_* variable > [serve] table > default;
    a wrong value names where it came from."""
    from fanout._cli import build_parser
    from fanout._serve.options import resolve
    from fanout.errors import ConfigError

    config = tmp_path / "fanout.toml"
    config.write_text('topic = "com.example.app"\n\n[serve]\nlisten = "127.0.0.1:9000"\n'
                      'max_tokens = 7\nmax_body = 2048\napi_keys = "keys"\n')
    args = build_parser().parse_args(["serve", "--config", str(config), "--max-body", "99"])
    resolve(args, {"FANOUT_MAX_TOKENS": "5"})
    assert (args.listen, args.max_tokens, args.max_body) == ("127.0.0.1:9000", 5, 99)
    assert args.api_keys == str(tmp_path / "keys") and args.drain_timeout == 30.0
    from fanout.config import load_settings
    assert load_settings(args, {}).topic == "com.example.app"  # [serve] is not a setting

    args = build_parser().parse_args(["serve"])
    with pytest.raises(ConfigError, match="FANOUT_MAX_TOKENS: expected an integer"):
        resolve(args, {"FANOUT_MAX_TOKENS": "many"})
    config.write_text('[serve]\nmax_tokns = 7\n')
    args = build_parser().parse_args(["serve", "--config", str(config)])
    with pytest.raises(ConfigError, match="did you mean 'max_tokens'"):
        resolve(args, {})
    args = build_parser().parse_args(["serve", "--max-requests", "0"])
    with pytest.raises(ConfigError, match="max_requests must be more than 0"):
        resolve(args, {})


def test_an_h2c_connection_carries_more_than_a_thousand_requests(
        stack: tuple[Mock, Serve]) -> None:
    """hypercorn's default sends GOAWAY after 1,000 requests on a connection; httpx then
    fails the 1,001st (it may already have been sent): fanout serve keeps them open."""
    _, serve = stack
    with client(serve, http2=True) as http:
        for _ in range(1_010):
            assert http.get("/healthz").status_code == 200


def test_a_connection_past_max_connections_gets_429(tmp_path: Path,
                                                    signing_key: TestSigningKey) -> None:
    mock = Mock(tmp_path, signing_key)
    serve = Serve(tmp_path, mock, "--max-connections", "1", "--header-timeout", "60")
    push = {"token": "ab" * 32, "payload": PAYLOAD}
    try:
        with client(serve, key=None) as first, client(serve, key=None) as second:
            assert first.post("/v1/push", json=push).status_code == 200
            r = second.post("/v1/push", json=push)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_connections"
            assert r.headers["connection"] == "close"
            assert second.get("/healthz").status_code == 200  # the service endpoints still
            assert first.post("/v1/push", json=push).status_code == 200  # its own: served
    finally:
        serve.kill()
        mock.kill()


def test_every_line_of_a_stream_is_checked_not_only_the_first(stack: tuple[Mock, Serve]) -> None:
    """Lines sharing their headers share a template: the second line's payload must still
    be checked (an unknown aps key), not only encoded."""
    _, serve = stack
    lines = [{"token": "ab" * 32, "payload": PAYLOAD, "id": 1},
             {"token": "cd" * 32, "payload": {"aps": {"alrt": "x"}}, "id": 2},
             {"token": "ef" * 32, "payload": {"aps": {"badge": "3"}}, "id": 3}]
    with client(serve) as http:
        by_id = {x["id"]: x for x in ndjson(http.post("/v1/pushes", json=lines))}
    assert by_id[1]["outcome"] == "delivered"
    assert by_id[2]["outcome"] == "malformed" and "alrt" in by_id[2]["error"]
    assert by_id[3]["outcome"] == "malformed" and "badge" in by_id[3]["error"]


def test_a_live_activity_result_names_the_priority_it_went_at(
        tmp_path: Path, stack: tuple[Mock, Serve]) -> None:
    """Issue 18: serve's Live Activity results carry ``priority`` as the daemon's do: the
    first update of an activity within its budget (--la-budget 1) goes at 10, the next ones
    are lowered to 5; a push that is no Live Activity names none."""
    mock, _ = stack
    serve = Serve(tmp_path, mock, "--la-budget", "1")

    def update(n: int) -> dict[str, Any]:
        return {"token": "7a" * 32, "id": f"la{n}",
                "live_activity": {"event": "update", "activity-id": f"act-{tmp_path.name}",
                                  "content-state": {"score": f"{n}-0"}}}
    try:
        with client(serve, key=None) as http:
            first = http.post("/v1/push", json=update(1)).json()
            second = http.post("/v1/push", json=update(2)).json()
            streamed = ndjson(http.post("/v1/pushes", json=[
                update(3), {"token": "7b" * 32, "payload": PAYLOAD, "id": "plain"}]))
    finally:
        serve.kill()
    assert (first["outcome"], first["priority"]) == ("delivered", 10), first
    assert (second["outcome"], second["priority"]) == ("delivered", 5), second
    by_id = {x["id"]: x for x in streamed}
    assert by_id["la3"]["outcome"] == "delivered" and by_id["la3"]["priority"] == 5
    assert by_id["plain"]["outcome"] == "delivered" and "priority" not in by_id["plain"]
