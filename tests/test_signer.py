"""One provider token per (key, key id, team) in the process: every TokenAuth built for the
same key shares it (APNs answers token churn with 429 TooManyProviderTokenUpdates), unless
built with ``shared=False``; and ``fanout mock --stats-file`` counting what the mock saw."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest

from fanout._exits import EXIT_FORCED, EXIT_OK
from fanout.auth import TokenAuth
from fanout.client import Client
from fanout.payload import Notification
from fanout.testing.devcerts import TestPKI, TestSigningKey

from .helpers import (
    FANOUT,
    PAYLOAD,
    TOPIC,
    SteppedClock,
    local_client,
    mock_server,
    stderr_of,
    tokens,
    wait_exit,
    wait_until,
)


def _auth(key: TestSigningKey, **kw: Any) -> TokenAuth:
    return TokenAuth.from_file(key.path, key.key_id, key.team_id, **kw)


async def _push_once(pki: TestPKI, port: int, auth: TokenAuth, token: str) -> bool:
    async with local_client(pki, port, auth, connections=1, timeout=10.0) as client:
        return (await client.send(Notification(token=token, payload=PAYLOAD))).ok


# ---------------------------------------------------------------- sharing, against the mock


async def test_a_key_loaded_per_client_mints_one_token(pki: TestPKI,
                                                       signing_key: TestSigningKey) -> None:
    first = _auth(signing_key)
    rotations = first.rotations
    async with mock_server(pki, signing_key) as mock:
        for token in tokens(50):
            # a new TokenAuth from the file each time, as a program that builds its client
            # per request or per task does
            assert await _push_once(pki, mock.port, _auth(signing_key), token)
        assert sum(mock.stats.delivered.values()) == 50
        # one token, unless it came due for renewal meanwhile (50 min: not in this test)
        assert len(mock.stats.jwts) == 1 + first.rotations - rotations
    assert first.rotations == rotations


async def test_shared_false_gives_a_token_of_its_own(pki: TestPKI,
                                                     signing_key: TestSigningKey) -> None:
    own = [_auth(signing_key, shared=False) for _ in range(2)]
    assert own[0].signer_id != own[1].signer_id
    assert own[0].signer_id != _auth(signing_key).signer_id
    async with mock_server(pki, signing_key) as mock:
        for auth, token in zip(own, tokens(2), strict=True):
            assert await _push_once(pki, mock.port, auth, token)
        assert len(mock.stats.jwts) == 2


async def test_two_key_ids_get_two_tokens(pki: TestPKI, signing_key: TestSigningKey,
                                          tmp_path: Path) -> None:
    other_id = "OTHER12345"
    assert other_id != signing_key.key_id
    one = _auth(signing_key)
    other_file = tmp_path / f"AuthKey_{other_id}.p8"  # the file's name says its key id
    other_file.write_bytes(signing_key.path.read_bytes())
    other_file.chmod(0o600)
    two = TokenAuth.from_file(other_file, other_id, signing_key.team_id)
    assert one.signer_id != two.signer_id
    assert one.header() != two.header()
    keys = {signing_key.key_id: signing_key.public_key, other_id: signing_key.public_key}
    async with mock_server(pki, signing_key, keys=keys) as mock:
        for auth, token in zip((one, two), tokens(2), strict=True):
            assert await _push_once(pki, mock.port, auth, token)
        assert len(mock.stats.jwts) == 2


# ---------------------------------------------------------------- refresh and fork


def test_a_forced_refresh_is_seen_by_every_sharer(signing_key: TestSigningKey) -> None:
    clock = SteppedClock(1_700_000_000.0)  # its own clock: a signer no other test shares
    one, two = _auth(signing_key, clock=clock), _auth(signing_key, clock=clock)
    assert one.signer_id == two.signer_id and one.header() == two.header()
    seen = one.generation
    clock.now += one.min_refresh_interval
    assert one.refresh(seen)
    assert two.generation == one.generation == seen + 1
    assert two.header() == one.header()
    assert two.forced_refreshes == one.forced_refreshes == 1
    # the sharer's answer to the same rejected token mints nothing more
    assert not two.refresh(seen)
    assert one.rotations == two.rotations == 2


def _child(write_fd: int, key: TestSigningKey, clock: SteppedClock, parent: TokenAuth,
           header: bytes) -> NoReturn:
    """In the forked child: facts about the inherited token, as JSON on ``write_fd``."""
    code = 1
    try:
        same = _auth(key, clock=clock)
        facts = {"same_header": same.header() == header,
                 "same_signer": same.signer_id == parent.signer_id}
        clock.now += same.refresh_after  # due: header() takes the token's lock and mints
        renewed = same.header()
        facts["renewed"] = renewed != header and parent.header() == renewed
        seen = parent.generation
        clock.now += parent.min_refresh_interval
        facts["refreshed"] = (parent.refresh(seen) and same.generation == seen + 1
                              and same.header() not in (header, renewed))
        os.write(write_fd, json.dumps(facts).encode())
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails
        os.write(write_fd, json.dumps({"error": type(exc).__name__}).encode())
    finally:
        os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_shares_the_token_and_can_renew_it(signing_key: TestSigningKey) -> None:
    clock = SteppedClock(1_700_000_000.0)
    parent = _auth(signing_key, clock=clock)
    header = parent.header()
    read_fd, write_fd = os.pipe()
    # fork() while the token's lock is held, as by a thread minting at that moment: the
    # child's copy of the lock must not stay locked for ever
    with parent._signer.lock:
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(write_fd, signing_key, clock, parent, header)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 20)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the forked child is stuck (on a lock held at fork?)")
        out = b""
        while chunk := os.read(read_fd, 4096):
            out += chunk
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    facts = json.loads(out)
    assert facts == {"same_header": True, "same_signer": True, "renewed": True,
                     "refreshed": True}
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent's token is untouched by what the child minted
    assert parent.header() == header


# ---------------------------------------------------------------- fanout mock --stats-file


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, EXIT_OK), (signal.SIGINT, EXIT_FORCED)])
async def test_mock_stats_file_is_written_on_a_signal(tmp_path: Path, signing_key: TestSigningKey,
                                                      signum: int, code: int) -> None:
    port_file, stats_file = tmp_path / "port", tmp_path / "stats.json"
    proc = subprocess.Popen(
        FANOUT + ["mock", "--pki-dir", str(tmp_path / "pki"), "--port", "0",
                  "--port-file", str(port_file), "--key-path", str(signing_key.path),
                  "--key-id", signing_key.key_id, "--team-id", signing_key.team_id,
                  "--stats-file", str(stats_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await wait_until(lambda: proc.poll() is not None
                         or (port_file.exists() and bool(port_file.read_text().strip())),
                         30, "the mock's port file")
        assert proc.poll() is None, stderr_of(proc)
        async with Client(auth=_auth(signing_key), topic=TOPIC, host="127.0.0.1",
                          port=int(port_file.read_text()), connections=1, timeout=10.0,
                          ca_file=str(tmp_path / "pki" / "ca.pem")) as client:
            results = [await client.send(Notification(token=t, payload=PAYLOAD))
                       for t in tokens(3)]
        assert all(r.ok for r in results)
        assert not stats_file.exists()
        proc.send_signal(signum)
        assert await wait_exit(proc, 30) == code, stderr_of(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stats = json.loads(stats_file.read_text())
    assert stats["connections"] >= 1
    assert stats["jwts"] == 1
    assert stats["delivered"] == 3
    assert stats["requests"] == 3 and stats["by_status"] == {"200": 3}
    assert not (tmp_path / "stats.json.tmp").exists()
