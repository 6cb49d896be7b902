"""Many apps under two teams in one process (issue 9): two mocks standing for two teams,
each accepting only its own key, team and bundle ids. Every push reaches its team's mock
with its team's JWT; a revoked key stops only that team's pushes."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import trio
from prometheus_client import CollectorRegistry

from fanout.auth import TokenAuth
from fanout.errors import ConfigError
from fanout.metrics import Metrics
from fanout.payload import Notification, PushType, topic_for
from fanout.teams import Team, Teams, bundle_of
from fanout.testing.devcerts import make_signing_key

from .helpers import mock_server

TOPICS = {"acme": ["com.acme.app", "com.acme.pos"], "beta": ["com.beta.app", "com.beta.tv"]}


@pytest.fixture
def keys(tmp_path):
    return {"acme": make_signing_key(tmp_path / "a", key_id="ACMEKEY001", team_id="ACMETEAM01"),
            "beta": make_signing_key(tmp_path / "b", key_id="BETAKEY001", team_id="BETATEAM01")}


def _teams(keys, mocks, pki, **extra) -> list[Team]:
    return [Team(name, TokenAuth.from_file(k.path, k.key_id, k.team_id), set(TOPICS[name]),
                 client={"host": "127.0.0.1", "port": mocks[name].port,
                         "ca_file": str(pki.ca_file), **extra})
            for name, k in keys.items()]


def _mixed(n: int, seed: int = 3) -> list[Notification]:
    rng = random.Random(seed)
    topics = [t for ts in TOPICS.values() for t in ts]
    return [Notification(token=f"{i:064x}", payload={"aps": {"alert": "x"}},
                         topic=rng.choice(topics), id=i) for i in range(n)]


def _mock_kw(key, name):
    return dict(keys={key.key_id: key.public_key}, team_id=key.team_id,
                topics=set(TOPICS[name]))


async def test_each_push_reaches_its_teams_mock_and_no_other(pki, keys):
    pushes = _mixed(6000)
    async with mock_server(pki, keys["acme"], **_mock_kw(keys["acme"], "acme")) as acme, \
            mock_server(pki, keys["beta"], **_mock_kw(keys["beta"], "beta")) as beta:
        mocks = {"acme": acme, "beta": beta}
        async with Teams(_teams(keys, mocks, pki)) as router:
            with trio.fail_after(60):
                results = [r async for r in router.send_many(pushes)]
    assert len(results) == 6000 and all(r.ok for r in results), Counter(
        r.outcome for r in results)
    by_id = {r.id: r for r in results}
    for p in pushes:
        team = "acme" if p.topic.startswith("com.acme") else "beta"
        assert by_id[p.id].team == team
    want = Counter("acme" if p.topic.startswith("com.acme") else "beta" for p in pushes)
    # each mock validates the JWT's key and team and the topic: a crossed push would fail
    assert len(acme.stats.delivered) == want["acme"] and len(beta.stats.delivered) == want["beta"]
    assert acme.stats.by_status.keys() == {200} and beta.stats.by_status.keys() == {200}
    assert len(acme.stats.jwts) == 1 and len(beta.stats.jwts) == 1


async def test_a_revoked_key_stops_only_its_team(pki, keys, tmp_path):
    pushes = _mixed(3000, seed=5)
    other = make_signing_key(tmp_path / "x", key_id="ACMEKEY001", team_id="ACMETEAM01")
    async with mock_server(pki, keys["acme"], **_mock_kw(keys["acme"], "acme")) as acme, \
            mock_server(pki, keys["beta"], **_mock_kw(keys["beta"], "beta")) as beta:
        # acme's key revoked: its mock now knows another public key under that key id
        acme.config.keys = {other.key_id: other.public_key}
        registry = CollectorRegistry()
        async with Teams(_teams(keys, {"acme": acme, "beta": beta}, pki),
                         events=Metrics(registry=registry)) as router:
            with trio.fail_after(60):
                results = [r async for r in router.send_many(pushes)]
    outcomes = Counter((r.team, str(r.outcome)) for r in results)
    # every push counted once, under its team (acme's, refused, mostly by the router)
    counted = Counter()
    for family in registry.collect():
        for s in family.samples:
            if s.name == "fanout_pushes_total" and s.value:
                counted[(s.labels["team"], s.labels["outcome"])] += s.value
    assert counted == outcomes
    n_beta = sum(p.topic.startswith("com.beta") for p in pushes)
    assert outcomes[("beta", "delivered")] == n_beta == len(beta.stats.delivered)
    assert outcomes[("acme", "config_error")] == 3000 - n_beta
    acme_errors = {r.error for r in results if r.team == "acme"}
    assert all("InvalidProviderToken" in e or "credentials" in e for e in acme_errors)
    assert acme.stats.requests <= 4  # acme stopped at once, its token list not burnt
    assert all(r.attempts == 1 for r in results if r.team == "beta")  # beta never slowed


async def test_pools_open_on_first_push_and_close_when_idle(pki, keys):
    async with mock_server(pki, keys["acme"], **_mock_kw(keys["acme"], "acme")) as acme, \
            mock_server(pki, keys["beta"], **_mock_kw(keys["beta"], "beta")) as beta:
        async with Teams(_teams(keys, {"acme": acme, "beta": beta}, pki),
                         idle_timeout=0.3) as router:
            assert router.open_teams == []  # nothing opened before a push
            r = await router.send(Notification(token="ab" * 32, payload={"aps": {}},
                                               topic="com.acme.pos.voip", priority=10,
                                               push_type="voip"))
            assert r.ok and r.team == "acme" and router.open_teams == [("acme", "production")]
            assert beta.stats.connections == 0
            with trio.fail_after(5):
                while router.open_teams:
                    await trio.sleep(0.05)
            r = await router.send(Notification(token="cd" * 32, payload={"aps": {}},
                                               topic="com.acme.app"))
            assert r.ok and acme.stats.connections >= 2  # opened again


async def test_unknown_topic_and_configuration_errors(pki, keys):
    async with mock_server(pki, keys["acme"], **_mock_kw(keys["acme"], "acme")) as acme:
        teams = [Team("acme", TokenAuth.from_file(keys["acme"].path, "ACMEKEY001",
                                                 "ACMETEAM01"), {"com.acme.app"},
                      environments=("production",),
                      client={"host": "127.0.0.1", "port": acme.port,
                              "ca_file": str(pki.ca_file)})]
        async with Teams(teams) as router:
            r = await router.send(Notification(token="ab" * 32, payload={"aps": {}},
                                               topic="com.nobody.app"))
            assert str(r.outcome) == "config_error" and "com.nobody.app" in r.error
            r = await router.send(Notification(token="ab" * 32, payload={"aps": {}},
                                               topic="com.acme.app"), environment="sandbox")
            assert str(r.outcome) == "config_error" and "does not send to sandbox" in r.error
            assert r.team == "acme" and acme.stats.requests == 0
    with pytest.raises(ConfigError, match="two teams"):
        Teams([Team("a", None, {"com.x.app"}), Team("b", None, {"com.x.app.voip"})])
    for names in (["a", "a"], [""]):  # a team's name keys its clients and its metrics
        with pytest.raises(ConfigError, match="a name of its own"):
            Teams([Team(n, None, {f"com.{i}.app"}) for i, n in enumerate(names)])
    assert bundle_of("com.x.app.push-type.liveactivity") == "com.x.app"
    assert bundle_of("com.x.app.complication") == "com.x.app"


# ---------------------------------------------------------------- the daemon: --teams

def _teams_file(tmp_path, keys, mocks, pki) -> str:
    blocks = []
    for name, k in keys.items():
        blocks.append(f"""[[team]]
name = "{name}"
topics = {list(TOPICS[name])!r}
key_path = "{k.path}"
key_id = "{k.key_id}"
team_id = "{k.team_id}"
host = "127.0.0.1"
port = {mocks[name].port}
ca_file = "{pki.ca_file}"
""".replace("'", '"'))
    path = tmp_path / "teams.toml"
    path.write_text("\n".join(blocks))
    return str(path)


async def _run_daemon_with_teams(tmp_path, keys, mocks, pki, n: int):
    import json
    import sys

    rng = random.Random(9)
    topics = [t for ts in TOPICS.values() for t in ts]
    lines = [json.dumps({"id": i, "token": f"{i:064x}", "topic": rng.choice(topics),
                         "payload": {"aps": {"alert": "x"}}}) for i in range(n)]
    inp = tmp_path / "in.ndjson"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.ndjson"
    cmd = [sys.executable, "-m", "fanout", "run", str(inp), "--results", str(out),
           "--teams", _teams_file(tmp_path, keys, mocks, pki), "--status-interval", "0"]
    with trio.fail_after(240):
        proc = await trio.run_process(cmd, capture_stderr=True, check=False)
    results = [json.loads(x) for x in out.read_bytes().splitlines() if x.strip()]
    topic_of = {i: json.loads(line)["topic"] for i, line in enumerate(lines)}
    return proc, results, topic_of


async def test_daemon_routes_50k_lines_of_4_topics_to_2_teams(pki, keys, tmp_path):
    async with mock_server(pki, keys["acme"], **_mock_kw(keys["acme"], "acme")) as acme, \
            mock_server(pki, keys["beta"], **_mock_kw(keys["beta"], "beta")) as beta:
        proc, results, topic_of = await _run_daemon_with_teams(
            tmp_path, keys, {"acme": acme, "beta": beta}, pki, 50_000)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert sorted(r["line"] for r in results) == list(range(1, 50_001))
    assert all(r["outcome"] == "delivered" for r in results)
    for r in results:
        assert r["team"] == ("acme" if topic_of[r["id"]].startswith("com.acme") else "beta")
    n_acme = sum(t.startswith("com.acme") for t in topic_of.values())
    assert len(acme.stats.delivered) == n_acme and len(beta.stats.delivered) == 50_000 - n_acme
    assert acme.stats.by_status.keys() == {200} == beta.stats.by_status.keys()


async def test_daemon_revoked_team_stops_alone(pki, keys, tmp_path):
    other = make_signing_key(tmp_path / "x", key_id="ACMEKEY001", team_id="ACMETEAM01")
    async with mock_server(pki, keys["acme"], **_mock_kw(keys["acme"], "acme")) as acme, \
            mock_server(pki, keys["beta"], **_mock_kw(keys["beta"], "beta")) as beta:
        acme.config.keys = {other.key_id: other.public_key}  # acme's key revoked
        proc, results, topic_of = await _run_daemon_with_teams(
            tmp_path, keys, {"acme": acme, "beta": beta}, pki, 4000)
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]  # config_error results
    assert len(results) == 4000
    for r in results:
        want = "config_error" if topic_of[r["id"]].startswith("com.acme") else "delivered"
        assert r["outcome"] == want, r
    assert acme.stats.requests <= 4


@pytest.mark.parametrize("push_type", [pt for pt in PushType if pt is not PushType.MDM])
def test_every_push_types_topic_routes_to_its_team(push_type):
    """Each push type's topic (the bundle id plus its suffix) reaches the team serving the
    bundle id: the router shares the payload module's table of suffixes."""
    router = Teams([Team("acme", None, {"com.acme.app"}), Team("beta", None, {"com.beta.app"})])
    for bundle, name in (("com.acme.app", "acme"), ("com.beta.app", "beta")):
        topic = topic_for(bundle, push_type)
        assert bundle_of(topic) == bundle, topic
        team = router.team_for(topic)
        assert team is not None and team.name == name, topic
