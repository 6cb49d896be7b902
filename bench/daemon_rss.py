"""RSS of ``fanout run`` over a large NDJSON input: it must stay flat.

Writes an input of --mb megabytes (default 200, ~1.6 million push lines), runs the real
daemon on it against a local nginx sink, and samples the daemon's RSS once a second
beside its progress (the checkpoint's line). Prints the samples and the growth between
the first 10% and the end; writes bench/results/daemon_rss.json. Bounded: one input,
127.0.0.1 only, --max-seconds.

    python bench/daemon_rss.py            # 200 MB
    python bench/daemon_rss.py --mb 20    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=600)
    args = ap.parse_args()
    from fanout.testing.devcerts import make_pki, make_signing_key
    from fanout.testing.nginx import start_nginx

    with tempfile.TemporaryDirectory(prefix="fanout-rss-") as tmp:
        tmpdir = Path(tmp)
        pki, key = make_pki(tmpdir / "pki"), make_signing_key(tmpdir / "key")
        inp = tmpdir / "in.ndjson"
        payload = json.dumps({"aps": {"alert": {"title": "t", "body": "hello"}}})
        target = args.mb * 1024 * 1024
        lines = 0
        with open(inp, "w") as fh:
            while fh.tell() < target:
                fh.write(f'{{"id":{lines},"token":"{lines:064x}","payload":{payload}}}\n')
                lines += 1
        print(f"input: {inp.stat().st_size / 2**20:.0f} MB, {lines:,} lines", flush=True)
        sink, port = start_nginx(tmpdir, pki.cert_file, pki.key_file)
        cmd = [sys.executable, "-m", "fanout", "run", str(inp), "--results", "/dev/null",
               "--host", "127.0.0.1", "--port", str(port), "--ca-file", str(pki.ca_file),
               "--key-path", str(key.path), "--key-id", key.key_id, "--team-id", key.team_id,
               "--topic", "com.example.bench", "--status-interval", "0",
               "--workers", str(args.workers)]
        samples = []
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE)
        cp = Path(str(inp) + ".checkpoint")
        try:
            while proc.poll() is None and time.monotonic() - start < args.max_seconds:
                time.sleep(1)
                try:
                    done = json.loads(cp.read_text())["line"] if cp.exists() else 0
                    mb = rss_mb(proc.pid)
                except (OSError, ValueError, KeyError):
                    continue
                if mb <= 0:  # the process is exiting
                    continue
                samples.append({"t": round(time.monotonic() - start, 1), "line": done,
                                "rss_mb": round(mb, 1)})
                print(f"{samples[-1]['t']:7.1f} s  {done:>10,} lines  {mb:7.1f} MB RSS",
                      flush=True)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
            sink.terminate()
            sink.wait(10)
        if proc.returncode != 0:
            print(proc.stderr.read().decode()[-2000:], file=sys.stderr)
        early = [s for s in samples if s["line"] >= lines * 0.1] or samples
        growth = samples[-1]["rss_mb"] - early[0]["rss_mb"] if samples else None
        report = {"input_mb": args.mb, "lines": lines, "workers": args.workers,
                  "seconds": round(time.monotonic() - start, 1), "exit": proc.returncode,
                  "rss_first_10pct_mb": early[0]["rss_mb"] if samples else None,
                  "rss_end_mb": samples[-1]["rss_mb"] if samples else None,
                  "rss_growth_mb": round(growth, 1) if growth is not None else None,
                  "samples": samples}
        results = Path(os.environ.get("FANOUT_BENCH_RESULTS") or ROOT / "bench" / "results")
        results.mkdir(parents=True, exist_ok=True)
        (results / "daemon_rss.json").write_text(json.dumps(report, indent=1))
        print(f"RSS at 10% of the input: {report['rss_first_10pct_mb']} MB, at the end: "
              f"{report['rss_end_mb']} MB (growth {report['rss_growth_mb']} MB) over "
              f"{lines:,} lines in {report['seconds']} s; exit {proc.returncode}")


if __name__ == "__main__":
    main()
