"""Debian's nginx as a local HTTP/2 peer: an independent, non-Python server for tests and a
sink that never bottlenecks benchmarks. Listens on 127.0.0.1 only."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from ..errors import ConfigError

#: nginx.conf template of :func:`start_nginx` (``str.format`` fields in braces).
CONF = """
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  # as APNs: the request's apns-id echoed, or a fresh id when it had none (every answer
  # carries one, so a benchmark pays for decoding it as it would against Apple)
  map $http_apns_id $apns_id_answer {{ "" $request_id; default $http_apns_id; }}
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl http2;
    http2_max_concurrent_streams 1000;
    keepalive_requests {keepalive_requests};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    {extra}
    location ~ ^/3/device/dead {{
      default_type application/json;
      return 410 '{{"reason":"Unregistered","timestamp":1700000000000}}';
    }}
    location / {{ add_header apns-id $apns_id_answer always; return 200; }}
  }}
}}
"""


def nginx_binary() -> str | None:
    """Path of the nginx binary, or ``None`` if it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_nginx(directory: Path, cert_file: Path, key_file: Path, *, extra: str = "",
                keepalive_requests: int = 10_000_000, prefix: list[str] | None = None,
                timeout: float = 10.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start nginx answering 200 (echoing apns-id, or a fresh one) and, for tokens starting with ``dead``,
    410 Unregistered with an APNs-style body. Returns the process and its port."""
    binary = nginx_binary()
    if binary is None:
        raise ConfigError("nginx not installed (apt-get install nginx-light)")
    port = free_port()
    conf = Path(directory) / "nginx.conf"
    conf.write_text(CONF.format(d=directory, port=port, cert=cert_file, key=key_file,
                                extra=extra, keepalive_requests=keepalive_requests))
    proc = subprocess.Popen((prefix or []) + [binary, "-c", str(conf), "-p", str(directory)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout is not None else b""
            raise ConfigError(f"nginx exited: {output.decode(errors='replace')}")
        time.sleep(0.05)
    proc.kill()
    raise ConfigError("nginx did not start listening")
