"""Live Activity builders, send-time timestamps, budget and ordering (unit level)."""

from __future__ import annotations

import json

import pytest

from fanout.errors import ValidationError
from fanout.liveactivity import (
    ActivityTracker,
    Stamper,
    end_payload,
    notification,
    prepare_stamped,
    start_payload,
    update_payload,
)


def aps_of(prepared) -> dict:
    return json.loads(prepared.body)["aps"]


def test_start_payload_push_to_start_with_input_push_channel():
    p = start_payload(attributes_type="OrderAttributes", attributes={"order": "42"},
                      content_state={"status": "placed"},
                      alert={"title": "Order placed", "body": "We got it"},
                      input_push_channel="dHJpYWw=")
    prepared = prepare_stamped(notification("ab" * 32, p, "com.example.app"),
                               clock=lambda: 1_700_000_000)
    aps = aps_of(prepared)
    assert aps["event"] == "start" and aps["attributes-type"] == "OrderAttributes"
    assert aps["attributes"] == {"order": "42"} and aps["content-state"] == {"status": "placed"}
    assert aps["input-push-channel"] == "dHJpYWw=" and "input-push-token" not in aps
    assert aps["alert"]["title"] == "Order placed"
    assert aps["timestamp"] == 1_700_000_000
    assert prepared.topic == b"com.example.app.push-type.liveactivity"
    assert prepared.push_type == b"liveactivity"


def test_start_requires_its_keys_and_exclusive_inputs():
    with pytest.raises(ValidationError):
        start_payload(attributes_type="A", attributes={}, content_state={}, alert="x",
                      input_push_token=True, input_push_channel="c")
    with pytest.raises(TypeError):
        start_payload(attributes_type="A", attributes={}, content_state={})  # no alert


def test_update_and_end_payloads():
    up = prepare_stamped(notification("ab" * 32, update_payload(
        {"score": "1-0"}, stale_date=1_700_000_600, relevance_score=50.0, alert="Goal!"),
        "com.x"), clock=lambda: 1_700_000_001)
    aps = aps_of(up)
    assert aps == {"event": "update", "content-state": {"score": "1-0"},
                   "stale-date": 1_700_000_600, "relevance-score": 50.0, "alert": "Goal!",
                   "timestamp": 1_700_000_001}
    end = prepare_stamped(notification("ab" * 32, end_payload(
        {"score": "2-1"}, dismissal_date=1_700_003_600), "com.x"), clock=lambda: 5)
    assert aps_of(end)["event"] == "end" and aps_of(end)["dismissal-date"] == 1_700_003_600


def test_timestamp_is_restamped_at_every_send():
    now = [1_700_000_000]
    prepared = prepare_stamped(notification("ab" * 32, update_payload({"s": 1}), "com.x"),
                               clock=lambda: now[0])
    assert prepared.stamp is not None
    first = prepared.stamp()
    now[0] += 30
    second = prepared.stamp()
    assert json.loads(first)["aps"]["timestamp"] == 1_700_000_000
    assert json.loads(second)["aps"]["timestamp"] == 1_700_000_030
    assert len(first) == len(second)


def test_explicit_timestamp_is_kept():
    prepared = prepare_stamped(notification("ab" * 32, update_payload({"s": 1},
                                                                      timestamp=123), "com.x"))
    assert prepared.stamp is None and aps_of(prepared)["timestamp"] == 123


def test_stamper_needs_its_marker():
    with pytest.raises(ValueError):
        Stamper(b'{"aps":{}}')


def test_budget_lowers_priority_then_recovers_after_an_hour():
    now = [0.0]
    tracker = ActivityTracker(50, clock=lambda: now[0])
    priorities = [tracker.decide("act", t).priority for t in range(300)]
    assert priorities[:50] == [10] * 50 and set(priorities[50:]) == {5}
    now[0] = 3601.0
    assert tracker.decide("act", 301).priority == 10
    assert tracker.decide("other", 0).priority == 10  # budgets are per activity


def test_budget_wait_policy():
    now = [0.0]
    tracker = ActivityTracker(2, over_budget="wait", clock=lambda: now[0])
    assert tracker.decide("a", 1).wait == 0 and tracker.decide("a", 2).wait == 0
    d = tracker.decide("a", 3)
    assert d.wait == pytest.approx(3600.0)


def test_out_of_order_update_is_superseded():
    tracker = ActivityTracker(50)
    assert not tracker.decide("a", 10.0).superseded
    assert tracker.decide("a", 9.0).superseded
    assert not tracker.decide("a", 10.0).superseded  # same time is not older
    assert not tracker.decide("b", 1.0).superseded


def test_an_update_without_source_time_does_not_supersede_a_later_timed_one():
    """Issue 18: an update with no source-time was stamped "now", so the next update,
    correctly timed by its event (seconds earlier), was dropped as superseded."""
    tracker = ActivityTracker(50)
    assert not tracker.decide("a", 1_700_000_000.0).superseded
    assert not tracker.decide("a", None).superseded          # no time: no ordering
    assert not tracker.decide("a", 1_700_000_005.0).superseded  # the next event: sent
    assert tracker.decide("a", 1_700_000_001.0).superseded   # older than the last timed one


async def test_a_live_activity_result_says_the_priority_it_went_at(pki, signing_key):
    """Issue 18: the budget lowers 10 to 5; the result says which."""
    from fanout.liveactivity import LiveActivities

    from .helpers import running

    async with running(pki, signing_key) as (_, client):
        la = LiveActivities(client, "com.example.app", budget_per_hour=1)
        first = await la.update("ab" * 32, {"score": 1}, activity_id="m1")
        second = await la.update("ab" * 32, {"score": 2}, activity_id="m1")
    assert first.ok and first.priority == 10
    assert second.ok and second.priority == 5


def test_activity_memory_is_bounded():
    tracker = ActivityTracker(5, max_activities=1000)
    for i in range(5000):
        tracker.decide(f"a{i}", 1.0)
    assert len(tracker._activities) == 1000


# ---------------------------------------------------------------- the scenario, end to end

async def test_live_activity_and_broadcast_scenario(pki, signing_key):
    """Push-to-start with input-push-channel; 300 updates in a burst with a budget of 50
    per hour (the rest at priority 5, none lost); an out-of-order update dropped; end with
    a dismissal date; a broadcast to a policy-0 channel; the channel deleted, and a send
    to it reported as ChannelNotRegistered."""
    import trio

    from fanout.auth import TokenAuth
    from fanout.client import Client
    from fanout.liveactivity import LiveActivities
    from fanout.testing.mock import MockAPNs, MockConfig

    mock = MockAPNs(MockConfig(keys={signing_key.key_id: signing_key.public_key},
                               team_id=signing_key.team_id, record_bodies=True), pki)
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    start_token, update_token = "aa" * 32, "bb" * 32
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mock.serve)
        async with Client(auth=auth, topic="com.example.app", host="127.0.0.1", port=port,
                          ca_file=str(pki.ca_file)) as client:
            channel = await client.channels.create(0)
            la = LiveActivities(client, "com.example.app", budget_per_hour=50)
            started = await la.start(start_token, activity_id="match-1",
                                     attributes_type="MatchAttributes",
                                     attributes={"home": "A", "away": "B"},
                                     content_state={"score": "0-0"},
                                     alert={"title": "Kick-off", "body": "A vs B"},
                                     input_push_channel=channel.channel_id, source_time=0.0)
            # a burst: planned in order, sent concurrently
            from fanout.liveactivity import update_payload

            burst = [la.plan("match-1", update_token, update_payload({"score": f"{i}-0"}),
                             source_time=1.0 + i, id=i) for i in range(300)]
            results = [r async for r in client.send_many(burst)]
            assert len(results) == 300
            before = mock.stats.requests
            stale = await la.update(update_token, {"score": "stale"}, activity_id="match-1",
                                    source_time=0.5)
            after_stale = mock.stats.requests
            ended = await la.end(update_token, {"score": "3-1"}, activity_id="match-1",
                                 source_time=1000.0, dismissal_date=1_900_000_000)
            sent = await client.broadcast(channel.channel_id,
                                          {"aps": {"event": "update", "timestamp": 1,
                                                   "content-state": {"score": "3-1"}}})
            await client.channels.delete(channel.channel_id)
            gone = await client.broadcast(channel.channel_id,
                                          {"aps": {"event": "update", "timestamp": 2,
                                                   "content-state": {"score": "3-1"}}})
        nursery.cancel_scope.cancel()

    assert started.ok
    assert all(r.ok for r in results), {(r.outcome, r.reason, r.error) for r in results if not r.ok}
    priorities = sorted(p for p, _ in mock.stats.bodies[update_token][:300])
    # the start used one of the 50 priority-10 slots of the hour
    assert priorities.count(10) == 49 and priorities.count(5) == 251
    assert stale.outcome == "superseded" and after_stale == before  # never sent
    assert ended.ok
    start_body = json.loads(mock.stats.bodies[start_token][0][1])
    assert start_body["aps"]["input-push-channel"] == channel.channel_id
    assert start_body["aps"]["event"] == "start"
    assert 1.7e9 < start_body["aps"]["timestamp"] < 4e9  # stamped at send time, not the marker
    end_body = json.loads(mock.stats.bodies[update_token][-1][1])
    assert end_body["aps"]["event"] == "end"
    assert end_body["aps"]["dismissal-date"] == 1_900_000_000
    assert sent.ok and sent.channel_id == channel.channel_id and sent.token is None
    assert mock.stats.broadcasts[channel.channel_id] == 1
    assert gone.outcome == "rejected" and gone.reason == "ChannelNotRegistered"


async def test_a_broadcast_through_a_rate_limited_client(pki, signing_key):
    """A broadcast has no apns-topic; a client with a rate (global or per topic) must pace
    it through the global bucket, not fail on its missing topic."""
    import trio

    from fanout.auth import TokenAuth
    from fanout.client import Client
    from fanout.testing.mock import MockAPNs, MockConfig

    mock = MockAPNs(MockConfig(keys={signing_key.key_id: signing_key.public_key},
                               team_id=signing_key.team_id), pki)
    auth = TokenAuth.from_file(signing_key.path, signing_key.key_id, signing_key.team_id)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mock.serve)
        with trio.fail_after(30):
            async with Client(auth=auth, topic="com.example.app", host="127.0.0.1",
                              port=port, ca_file=str(pki.ca_file), rate=1000.0,
                              topic_rates={"com.example.app": 500.0}) as client:
                channel = await client.channels.create(0)
                sent = [await client.broadcast(channel.channel_id,
                                               {"aps": {"event": "update", "timestamp": i,
                                                        "content-state": {"n": i}}})
                        for i in range(3)]
        nursery.cancel_scope.cancel()
    assert [r.outcome for r in sent] == ["delivered"] * 3, [(r.reason, r.error) for r in sent]
