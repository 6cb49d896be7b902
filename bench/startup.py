"""Start-up cost of a small send (issue 19): CPU (user + system) of whole processes.

A scheduler that sends a few pushes a minute pays the interpreter, the imports and one TLS
handshake every time. Measured, each as a fresh process, medians of --runs runs:

- ``python -c pass`` (the interpreter, with this environment's site-packages),
- ``import trio``, ``import cryptography`` (what the engine needs, the floor),
- ``import fanout``, ``import fanout._cli`` (the package, the command line),
- ``fanout send`` of 10 pushes to ``fanout mock`` (started once, on 127.0.0.1).

Each case runs two ways, interleaved (``--bytecode`` picks one):

- ``cached``: every module's bytecode cached (``PYTHONPYCACHEPREFIX`` in a temporary
  folder, filled by one run of each case first): what a ``pip install``ed fanout costs;
- ``compiled``: ``PYTHONDONTWRITEBYTECODE=1``: a module without a ``__pycache__`` (an
  editable checkout that never wrote one, as here) is compiled at every start (~35 ms
  for the modules ``fanout send`` imports).

    python bench/startup.py [--runs 7] [--bytecode cached|compiled|both]
    python bench/startup.py --tree before=/tmp/head --tree after=.  # two trees, interleaved

(``--tree NAME=DIR``: fanout imported from DIR, a folder holding ``fanout/``, first on
``PYTHONPATH``; a ``git archive`` of a commit, say. The mock is the installed fanout's.)

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

RESULTS = Path(os.environ.get("FANOUT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
MODES = ("cached", "compiled")


def mode_env(env: dict[str, str], mode: str, cache_dir: Path) -> dict[str, str]:
    """``env`` for one bytecode mode (see the docstring)."""
    env = dict(env)
    if mode == "cached":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(cache_dir)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


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
    ap.add_argument("--bytecode", choices=[*MODES, "both"], default="both",
                    help="cached (as installed), compiled (no bytecode cache), or both")
    ap.add_argument("--tree", action="append", metavar="NAME=DIR",
                    help="measure the fanout in DIR (repeat: interleaved, one column each)")
    args = ap.parse_args()
    modes = MODES if args.bytecode == "both" else (args.bytecode,)
    trees = dict(t.split("=", 1) for t in args.tree) if args.tree else {"": ""}
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
        columns = [f"{tree} {mode}".strip() for tree in trees for mode in modes]
        envs = {}
        for n, (tree, where) in enumerate(trees.items()):
            tree_env = {**env, "PYTHONPATH": str(Path(where).resolve())} if where else env
            for mode in modes:  # a cache per tree: the same module names, other sources
                envs[f"{tree} {mode}".strip()] = mode_env(tree_env, mode, tmp / f"pycache{n}")
        for column in columns:  # fill the caches: one uncounted run of each case
            if column.endswith("cached"):
                for argv in cases.values():
                    cpu_of(argv, envs[column])
        samples: dict[tuple[str, str], list[float]] = {
            (column, name): [] for column in columns for name in cases}
        for _ in range(args.runs):  # interleaved: a noisy minute hits every case alike
            for name, argv in cases.items():
                for column in columns:
                    samples[column, name].append(cpu_of(argv, envs[column]))
    finally:
        mock.terminate()
        mock.wait()
    rows = {column: {name: round(statistics.median(samples[column, name]) * 1000, 1)
                     for name in cases} for column in columns}
    width = max(map(len, cases))
    cw = max(9, *map(len, columns))
    print(f"{'ms CPU, median of ' + str(args.runs):{width}}" + "".join(
        f"  {column:>{cw}}" for column in columns))
    for name in cases:
        print(f"{name:{width}}" + "".join(f"  {rows[c][name]:{cw}.1f}" for c in columns))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": args.runs,
         "python": sys.version.split()[0], "ms_cpu_median": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
