"""Start-up cost (issue 19): a command imports what it needs. ``fanout send`` from a cron job
or a scheduler pays the interpreter and the engine, not the daemon, ``fanout serve`` and the
mock (their parsers are registered in full only for their own commands), nor pyjwt (the
provider token is signed with cryptography: fanout.auth.es256_jwt), nor what only some
runs need: tomllib (a settings file), difflib (a misspelt key), cryptography's serialization
(a .p8 that is not in Apple's or OpenSSL's layout: fanout.auth._load_p8), cryptography's
OpenSSL backend (that ``ec.ECDSA()`` imports: fanout.auth._ES256), dataclasses.

And the garbage collector: ``import fanout`` leaves it as it found it (on or off, nothing of
the caller's frozen or thawed); the ``fanout`` command freezes what its imports made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("fanout._daemon", "fanout._serve", "fanout.testing", "fanout.metrics",
         "prometheus_client", "hypercorn", "h2", "httpx", "jwt")
#: not imported by ``fanout send`` nor ``import fanout``: only some runs need them
LAZY = ("tomllib", "difflib", "dataclasses", "cryptography.hazmat.primitives.serialization",
        "cryptography.hazmat.backends")


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
    lazy = sorted(m for m in loaded if m in LAZY or m.startswith(LAZY))
    assert not lazy, f"fanout send imported {lazy}"


def test_import_fanout_imports_nothing_lazy() -> None:
    code = "import json, sys\nimport fanout\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    lazy = sorted(m for m in loaded if m in LAZY or m.startswith(LAZY))
    assert not lazy, f"import fanout imported {lazy}"


def test_an_unusual_key_file_still_loads_through_serialization(tmp_path: Path) -> None:
    """The .p8 layouts Apple and OpenSSL write load without cryptography's serialization;
    any other PEM (lines of another width, a key without its public point) is parsed by
    it, to the same key, and a key whose public point is not its own is refused by it."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fanout.auth import _load_p8, _load_private_key
    from fanout.errors import KeyFileError

    def pem(der: bytes, width: int = 64, newline: bytes = b"\n") -> bytes:
        b64 = base64.b64encode(der)
        return newline.join([b"-----BEGIN PRIVATE KEY-----",
                             *(b64[i:i + width] for i in range(0, len(b64), width)),
                             b"-----END PRIVATE KEY-----", b""])

    key = ec.generate_private_key(ec.SECP256R1())
    secret = key.private_numbers().private_value
    openssl = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    inner = key.private_bytes(serialization.Encoding.DER,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
    apple = bytes.fromhex("308193020100301306072a8648ce3d020106082a8648ce3d03010704") + \
        bytes([len(inner)]) + inner  # the ECPrivateKey names its curve, as Apple's .p8
    bare = bytes.fromhex("3041020100301306072a8648ce3d020106082a8648ce3d030107042730250201"
                         "010420") + secret.to_bytes(32, "big")  # no public point
    for data in (pem(openssl), pem(apple), pem(apple, newline=b"\r\n")):
        fast = _load_p8(data)
        assert fast is not None and fast.private_numbers().private_value == secret
    for data in (pem(openssl, width=76), pem(apple, width=48), pem(bare)):
        assert _load_p8(data) is None
        assert _load_private_key(data, "key").private_numbers().private_value == secret
    wrong = bytearray(openssl)
    wrong[-1] ^= 1  # the public point of another key
    assert _load_p8(pem(bytes(wrong))) is None
    with pytest.raises(KeyFileError, match="could not be parsed"):
        _load_private_key(pem(bytes(wrong)), "key")


def test_es256_signs_without_ecdsa_init_and_falls_back_to_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fanout.auth._ES256 is ``ec.ECDSA(SHA256())`` without the backend import; should a
    cryptography refuse it, the signature is made with a real ``ec.ECDSA`` from then on."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from fanout import auth

    key = ec.generate_private_key(ec.SECP256R1())
    key.public_key().verify(auth._sign(key, b"x"), b"x", ec.ECDSA(hashes.SHA256()))

    class Strict:  # a key whose sign takes nothing but cryptography's own ECDSA
        def sign(self, data: bytes, algorithm: object) -> bytes:
            if type(algorithm) is not ec.ECDSA:
                raise TypeError("not an ECDSA")
            return key.sign(data, algorithm)

    monkeypatch.setattr(auth, "_es256", auth._es256)
    signature = auth._sign(Strict(), b"y")  # type: ignore[arg-type]
    key.public_key().verify(signature, b"y", ec.ECDSA(hashes.SHA256()))
    assert type(auth._es256) is ec.ECDSA


def _gc_after(code: str) -> list[object]:
    out = subprocess.run([sys.executable, "-c", "import gc, json, sys\n" + code],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "APNS_HOST": "127.0.0.1"}).stdout
    return list(json.loads(out.splitlines()[-1]))


def test_import_fanout_leaves_the_collector_as_it_found_it() -> None:
    state = "print(json.dumps([gc.isenabled(), gc.get_freeze_count()]))"
    assert _gc_after("import fanout\n" + state) == [True, 0]
    assert _gc_after("gc.disable()\nimport fanout\n" + state) == [False, 0]
    # the caller's frozen objects stay frozen (out of every generation the collector scans)
    assert _gc_after(
        "keep = [[]]\ngc.freeze()\nimport fanout\n"
        "print(json.dumps([gc.isenabled(), any(o is keep for o in gc.get_objects())]))"
    ) == [True, False]


def test_the_command_freezes_its_imports_and_main_with_argv_does_not() -> None:
    run = ("from fanout._cli import main\nsys.argv = ['fanout', {}]\n"
           "try:\n    main({})\nexcept SystemExit:\n    pass\n"
           "print(json.dumps([gc.isenabled(), gc.get_freeze_count()]))")
    enabled, frozen = _gc_after(run.format("'--version'", ""))  # the process's command line
    assert enabled is True and frozen > 10_000
    assert _gc_after(run.format("'--version'", "['--version']")) == [True, 0]


def test_a_light_command_lists_every_other_command_with_its_help() -> None:
    """``fanout send`` registers the other light commands bare, help line kept: ``fanout -h
    send`` lists the same commands with the same help as ``fanout -h check``."""
    from fanout._cli import build_parser

    helps = {command: build_parser([command]).format_help()
             for command in ("send", "check", "demo", "channels", "enqueue")}
    assert len(set(helps.values())) == 1, helps
    assert "one payload to a file of tokens" in helps["check"]
    send = build_parser(["send"])
    assert send.parse_args(["check"]).command == "check"  # bare: no arguments of its own
    full = build_parser(["check"]).parse_args(["check", "--topic", "a.b"])
    assert full.topic == "a.b"


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
