"""Start-up cost (issue 19): a command imports what it needs. ``fanout send`` from a cron job
or a scheduler pays the interpreter and the engine, not the daemon, ``fanout serve`` and the
mock (their parsers are registered in full only for their own commands), nor pyjwt (the
provider token is signed with cryptography: fanout.auth.es256_jwt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("fanout._daemon", "fanout._serve", "fanout.testing", "fanout.metrics",
         "prometheus_client", "hypercorn", "h2", "httpx", "jwt")


def _loaded_after(argv: list[str], run: bool = False) -> set[str]:
    """The modules loaded once ``fanout ARGV`` parsed its arguments (and, with ``run``, ran:
    a send of no tokens, which opens no connection)."""
    call = ("from fanout._cli import main\n"
            f"main({argv!r})\n") if run else (
            "from fanout._cli import build_parser\n"
            f"build_parser({argv!r}).parse_args({argv!r})\n")
    code = "import json, sys\n" + call + "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "APNS_HOST": "127.0.0.1"}).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_fanout_send_imports_no_heavy_package(tmp_path: Path) -> None:
    from fanout.testing.devcerts import make_signing_key

    key = make_signing_key(tmp_path)
    empty = tmp_path / "tokens.txt"
    empty.write_text("")
    loaded = _loaded_after(["send", "--tokens", str(empty), "--title", "x", "--topic", "a.b",
                            "--key-path", str(key.path), "--key-id", key.key_id,
                            "--team-id", key.team_id], run=True)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(HEAVY))
    assert not heavy, f"fanout send imported {heavy}"


@pytest.mark.parametrize("argv", [["check"], ["demo", "--count", "10"]])
def test_a_light_command_imports_no_heavy_package(argv: list[str]) -> None:
    loaded = _loaded_after(argv)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(HEAVY))
    assert not heavy, f"fanout {argv[0]} imported {heavy}"


@pytest.mark.parametrize("argv,package", [(["run", "-"], "fanout._daemon"),
                                          (["serve"], "fanout._serve"),
                                          (["mock"], "fanout.testing")])
def test_a_heavy_command_still_gets_its_whole_parser(argv: list[str], package: str) -> None:
    assert package in _loaded_after(argv)
