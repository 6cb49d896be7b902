"""The engine against a non-Python HTTP/2 server: nginx (Debian), over real TLS.

nginx answers 200 for ordinary tokens and 410 with an APNs-style JSON body for tokens
starting with "dead"; ``keepalive_requests`` makes it send GOAWAY every 500 requests, so
connection rollover is exercised by an independent implementation too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import trio

from fanout.client import Client

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

CONF = """
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl http2;
    http2_max_concurrent_streams 1000;
    keepalive_requests 500;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location ~ ^/3/device/dead {{
      default_type application/json;
      return 410 '{{"reason":"Unregistered","timestamp":1700000000000}}';
    }}
    location / {{ return 200; }}
  }}
}}
"""


@pytest.fixture
def nginx(tmp_path, pki):
    if NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed; .ci/run installs it")
        pytest.skip("nginx not installed (apt-get install nginx-light)")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "nginx.conf"
    conf.write_text(CONF.format(d=tmp_path, port=port, cert=pki.cert_file, key=pki.key_file))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.fail(f"nginx exited: {proc.stdout.read().decode()}")
        time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(5)


async def test_engine_against_nginx(nginx, pki):
    tokens = [f"{i:064x}" for i in range(4000)] + [f"dead{i:060x}" for i in range(200)]
    invalid = []
    async with Client(topic="com.example.app", host="127.0.0.1", port=nginx,
                      ca_file=str(pki.ca_file), connections=2,
                      on_invalid_token=lambda t, r, ts: invalid.append((t, r, ts))) as client:
        counts: dict[str, int] = {}
        seen = set()
        with trio.fail_after(60):
            async for r in client.fan_out({"aps": {"alert": "hello"}}, tokens):
                counts[r.outcome] = counts.get(r.outcome, 0) + 1
                assert r.token not in seen
                seen.add(r.token)
                if r.outcome == "invalid_token":
                    assert r.status == 410 and r.reason == "Unregistered"
                    assert r.timestamp == 1700000000000
        opened = client.pool.opened
    assert counts == {"delivered": 4000, "invalid_token": 200}
    assert len(invalid) == 200 and all(t.startswith("dead") for t, _, _ in invalid)
    # 4200 requests at 500 per connection: nginx's GOAWAYs forced at least 8 new connections
    assert opened >= 9
