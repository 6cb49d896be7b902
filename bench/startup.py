"""Start-up cost of a small send (issue 19): CPU (user + system) of whole processes.

A scheduler that sends a few pushes a minute pays the interpreter, the imports and one TLS
handshake every time. Measured, each as a fresh process, medians of --runs runs:

- ``python -c pass`` (the interpreter, with this environment's site-packages),
- ``import trio``, ``import cryptography`` (what the engine needs, the floor),
- ``import fanout``, ``import fanout._cli`` (the package, the command line),
- ``fanout send`` of 10 pushes to ``fanout mock`` (started once, on 127.0.0.1).

    python bench/startup.py [--runs 7]

Each process's CPU comes from ``os.wait4``'s rusage, so what the machine does meanwhile
does not count (only what it does to this process's caches).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_of(argv: list[str], env: dict[str, str] | None = None) -> float:
    """User + system CPU seconds of one run of ``argv`` (it must exit 0)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv}: exit {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
    proc.stderr.close()
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    py = sys.executable
    fanout = str(Path(py).parent / "fanout")
    tmp = Path(tempfile.mkdtemp(prefix="startup-"))
    subprocess.run([fanout, "mock-credentials", str(tmp / "creds"), "--key-id", "ABC123DEFG",
                    "--team-id", "TEAM123456"], check=True, stdout=subprocess.DEVNULL)
    port_file = tmp / "mock.port"
    mock = subprocess.Popen([fanout, "mock", "--port", "0", "--port-file", str(port_file),
                             "--pki-dir", str(tmp / "creds"), "--topics", "com.example.app",
                             "--key-path", str(tmp / "creds" / "AuthKey_ABC123DEFG.p8"),
                             "--key-id", "ABC123DEFG", "--team-id", "TEAM123456"],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if mock.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the mock did not start")
            time.sleep(0.05)
        tokens = tmp / "tokens.txt"
        tokens.write_text("".join(secrets.token_hex(32) + "\n" for _ in range(10)))
        env = {**os.environ, "APNS_HOST": "localhost", "APNS_PORT": port_file.read_text(),
               "APNS_CA_FILE": str(tmp / "creds" / "ca.pem"),
               "APNS_KEY_PATH": str(tmp / "creds" / "AuthKey_ABC123DEFG.p8"),
               "APNS_KEY_ID": "ABC123DEFG", "APNS_TEAM_ID": "TEAM123456",
               "APNS_TOPIC": "com.example.app"}
        cases = {
            "python -c pass": [py, "-c", "pass"],
            "import trio": [py, "-c", "import trio"],
            "import cryptography (hazmat ec)": [
                py, "-c", "from cryptography.hazmat.primitives.asymmetric import ec"],
            "import trio, ssl, cryptography": [
                py, "-c", "import trio, ssl; from cryptography.hazmat.primitives.asymmetric "
                          "import ec"],
            "import fanout": [py, "-c", "import fanout"],
            "import fanout._cli": [py, "-c", "import fanout._cli"],
            "fanout send, 10 pushes to the mock": [fanout, "send", "--tokens", str(tokens),
                                                  "--title", "hi"],
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):  # interleaved: a noisy minute hits every case alike
            for name, argv in cases.items():
                samples[name].append(cpu_of(argv, env))
    finally:
        mock.terminate()
        mock.wait()
    rows = {name: round(statistics.median(v) * 1000, 1) for name, v in samples.items()}
    width = max(map(len, rows))
    for name, ms in rows.items():
        print(f"{name:{width}}  {ms:6.1f} ms CPU (median of {args.runs})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": args.runs,
         "python": sys.version.split()[0], "ms_cpu_median": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
