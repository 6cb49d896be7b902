"""No secret in any byte written: every command run with a known key and debug logging;
stdout, stderr, output files and the metrics endpoint are searched for key material, any
JWT of that key, and (in logs) whole device tokens."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from pathlib import Path

import httpx

from .test_cli import FANOUT, _send


def _jwt_prefix(key_id: str) -> bytes:
    """Every JWT signed with this key starts with the same base64url header."""
    header = json.dumps({"alg": "ES256", "kid": key_id, "typ": "JWT"}, separators=(",", ":"))
    return base64.urlsafe_b64encode(header.encode()).rstrip(b"=")[:20]


def _secrets(signing_key) -> list[bytes]:
    pem = Path(signing_key.path).read_bytes().splitlines()
    body = b"".join(pem[1:-1])
    return [body[i:i + 24] for i in range(0, len(body) - 24, 24)] + [
        b"PRIVATE KEY", b"eyJhbGciOiJFUzI1NiIs", _jwt_prefix(signing_key.key_id), b"bearer "]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_secret_in_anything_any_command_writes(mock_process, signing_key, tmp_path):
    port, ca = mock_process
    tokens = [f"{i:064x}" for i in range(300)]
    (tmp_path / "tokens.txt").write_text("\n".join(tokens) + "\n")
    common = ["--host", "127.0.0.1", "--port", str(port), "--ca-file", str(ca), "--key-path",
              str(signing_key.path), "--key-id", signing_key.key_id, "--team-id",
              signing_key.team_id, "--topic", "com.example.app", "-v"]
    written: list[tuple[str, bytes, bool]] = []  # (what, bytes, is a log)

    def record(name, proc):
        written.append((name + " stdout", proc.stdout, False))
        written.append((name + " stderr", proc.stderr, True))

    record("send", _send(["send", "--tokens", str(tmp_path / "tokens.txt"), "--title", "hi",
                          "--invalid-tokens", str(tmp_path / "dead.ndjson")] + common))
    record("check", _send(["check"] + common))
    record("channels create", _send(["channels", "create"] + common))
    record("channels list", _send(["channels", "list"] + common))
    record("bad key id", _send(["check"] + common[:-6] + ["--key-id", "WRONG12345",
                                                          "--team-id", signing_key.team_id,
                                                          "--topic", "x", "-v"]))

    inp = tmp_path / "in.ndjson"
    inp.write_text("".join(json.dumps({"token": t, "payload": {"aps": {"alert": "x"}}}) + "\n"
                           for t in tokens) + "garbage line\n")
    mport = _free_port()
    proc = subprocess.Popen(FANOUT + ["run", str(inp), "--follow", "--results",
                                      str(tmp_path / "results.ndjson"), "--metrics",
                                      f"127.0.0.1:{mport}", "--log-format", "json"] + common,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            metrics = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=2).content
            if b'fanout_results_written_total' in metrics and b"301.0" in metrics:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    written += [("run stdout", out, False), ("run stderr", err, True),
                ("metrics", metrics, False)]
    for f in tmp_path.glob("*.ndjson*"):
        written.append((f.name, f.read_bytes(), False))
    assert b"fanout_pushes_total" in metrics

    secrets = _secrets(signing_key)
    for what, data, is_log in written:
        for secret in secrets:
            assert secret not in data, f"{what} contains {secret[:12]!r}..."
        if is_log:
            for token in tokens:
                assert token.encode() not in data, f"{what} logs a whole device token"
