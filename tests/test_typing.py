"""The public API as a user's type checker sees it: mypy --strict on the package, pyright's
``--verifytypes`` completeness, and a user script that must pass both checkers, and fail
them on a typo (``r.outcom``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: pyright --verifytypes must find at least this share of the public symbols fully typed.
MIN_COMPLETENESS = 0.95

USER_SCRIPT = '''\
from __future__ import annotations

import asyncio
import sys

import trio

import fanout.asyncio
import fanout.sync
from fanout import (
    Alert, Aps, Client, Notification, Outcome, Payload, PushType, Reason, Result, TokenAuth,
)
from fanout.testing import MockConfig, make_pki, make_signing_key, open_mock


async def from_asyncio(auth: TokenAuth, port: int, ca_file: str, token: str) -> Result:
    async with fanout.asyncio.Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                                     port=port, ca_file=ca_file, connections=1) as client:
        return await client.send(Notification(token=token, payload={"aps": {"alert": "a"}}))


def from_threads(auth: TokenAuth, port: int, ca_file: str, token: str) -> Result:
    with fanout.sync.Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                            port=port, ca_file=ca_file, connections=1) as client:
        future = client.submit(Notification(token=token, payload={"aps": {"alert": "s"}}))
        return future.result(30)


async def main(directory: str, tokens: list[str]) -> dict[Outcome, int]:
    pki = make_pki(directory)
    key = make_signing_key(directory)
    auth = TokenAuth.from_file(key.path, key.key_id, key.team_id)
    config = MockConfig(keys={key.key_id: key.public_key}, team_id=key.team_id)
    counts: dict[Outcome, int] = {}
    async with trio.open_nursery() as nursery:
        mock = await open_mock(nursery, config, pki)
        async with Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                          port=mock.port, ca_file=str(pki.ca_file)) as client:
            one: Result = await client.send(Notification(
                token=tokens[0], push_type=PushType.ALERT,
                payload=Payload(aps=Aps(alert=Alert(title="Hi", body="there"))),
            ))
            if one.reason in (Reason.BAD_DEVICE_TOKEN, Reason.UNREGISTERED):
                print("dead token since", one.timestamp)
            async for r in client.fan_out({"aps": {"alert": "Sale!"}}, tokens):
                counts[r.outcome] = counts.get(r.outcome, 0) + 1
        doors = [await trio.to_thread.run_sync(
                     asyncio.run, from_asyncio(auth, mock.port, str(pki.ca_file), tokens[1])),
                 await trio.to_thread.run_sync(
                     from_threads, auth, mock.port, str(pki.ca_file), tokens[2])]
        print("doors:", [r.outcome.value for r in doors])
        nursery.cancel_scope.cancel()
    return counts


if __name__ == "__main__":
    counts = trio.run(main, sys.argv[1], [f"{i:064x}" for i in range(1, 6)])
    print({str(k): v for k, v in counts.items()})
'''


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: pyright cannot follow setuptools' editable-install finder hook
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_package_is_mypy_strict_clean():
    proc = _run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "-p", "fanout"],
                ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_pyright_sees_a_typed_public_surface():
    proc = _run([_tool("pyright"), "--verifytypes", "fanout", "--ignoreexternal",
                 "--outputjson"], ROOT)
    report = json.loads(proc.stdout)["typeCompleteness"]
    assert report["packageRootDirectory"].endswith("fanout")  # it found the package
    incomplete = [
        f"{s['name']}: {d['message'].splitlines()[0]}"
        for s in report["symbols"] if s["isExported"]
        for d in s["diagnostics"] if d["severity"] == "error"
    ]
    score = report["completenessScore"]
    assert score >= MIN_COMPLETENESS, f"{score:.1%} type-complete:\n" + "\n".join(incomplete)
    assert report["exportedSymbolCounts"]["withKnownType"] > 100


@pytest.fixture
def script_dir(tmp_path: Path) -> Path:
    (tmp_path / "use_fanout.py").write_text(USER_SCRIPT)
    (tmp_path / "typo.py").write_text(USER_SCRIPT.replace(
        "counts[r.outcome] = counts.get(r.outcome, 0) + 1",
        "counts[r.outcom] = counts.get(r.outcome, 0) + 1"))
    (tmp_path / "door_typo.py").write_text(USER_SCRIPT.replace(
        "port=port, ca_file=ca_file, connections=1) as client:\n        future",
        "port=port, ca_file=ca_file, conections=1) as client:\n        future"))
    assert (tmp_path / "door_typo.py").read_text() != USER_SCRIPT
    return tmp_path


@pytest.mark.parametrize("checker", ["mypy", "pyright"])
def test_a_user_script_type_checks_and_a_typo_fails(script_dir: Path, checker: str):
    def check(name: str) -> subprocess.CompletedProcess[str]:
        if checker == "mypy":
            args = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", name]
        else:
            args = [_tool("pyright"), name]
        return _run(args, script_dir)

    doors = check("door_typo.py")  # a misspelt setting, caught through ClientOptions
    assert doors.returncode != 0 and "conections" in doors.stdout, doors.stdout[-2000:]
    good = check("use_fanout.py")
    assert good.returncode == 0, good.stdout[-4000:] + good.stderr[-2000:]
    bad = check("typo.py")
    assert bad.returncode != 0
    assert "outcom" in bad.stdout and "typo.py" in bad.stdout, bad.stdout[-2000:]


def test_the_user_script_runs_against_the_mock(script_dir: Path):
    """The checked script is real: it sends through the mock and gets its answers."""
    proc = _run([sys.executable, "use_fanout.py", str(script_dir / "pki")], script_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2:] == ["doors: ['delivered', 'delivered']", "{'delivered': 5}"]
