"""Live Activities: payload builders, send-time timestamps, per-activity budget and order.

- Builders for start (push-to-start, with iOS 18 ``input-push-token`` /
  ``input-push-channel``), update and end; topic suffix and push type are set for you.
- ``timestamp`` is stamped when the push is written to the wire (a retry is restamped):
  the body is encoded once with a marker in place of the timestamp and split there, and
  the connection joins the halves around the current time (:class:`Stamper`).
- :class:`ActivityTracker`: a budget of priority-10 pushes per hour per activity (over it,
  updates go at priority 5 or wait, by policy: never silently lost) and an out-of-order
  guard (an update older than the last one sent for the activity is ``superseded``).
- :class:`LiveActivities`: the three operations on a :class:`fanout.client.Client`;
  ``plan`` decides synchronously in call order, so a burst can be planned in order and
  sent concurrently.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Literal

import trio

from .client import Client
from .errors import ValidationError
from .outcome import Outcome, Result
from .payload import Alert, Aps, Notification, Payload, Prepared, PushType, prepare

_MARK = 4_102_444_800  # 2100-01-01: a 10-digit marker, as wide as any timestamp until 2286
_MARK_BYTES = b'"timestamp":4102444800'


class Stamper:
    """Rebuilds a Live Activity body with the current ``timestamp`` at send time."""

    __slots__ = ("_head", "_tail", "_clock")

    def __init__(self, body: bytes, clock: Callable[[], float] = time.time) -> None:
        i = body.find(_MARK_BYTES)
        if i < 0:
            raise ValueError("body has no timestamp marker")
        cut = i + len(b'"timestamp":')
        self._head = body[:cut]
        self._tail = body[cut + 10:]
        self._clock = clock

    def __call__(self) -> bytes:
        return self._head + b"%d" % int(self._clock()) + self._tail


def _payload(aps: Aps, custom: dict[str, Any] | None) -> Payload:
    return Payload(aps=aps, custom=custom or {})


def start_payload(*, attributes_type: str, attributes: dict[str, Any],
                  content_state: dict[str, Any], alert: str | Alert | dict[str, Any],
                  input_push_token: bool = False, input_push_channel: str | None = None,
                  stale_date: int | None = None, relevance_score: float | None = None,
                  timestamp: int | None = None, custom: dict[str, Any] | None = None) -> Payload:
    """Push-to-start (iOS 17.2+). ``input_push_token``/``input_push_channel`` need iOS 18:
    ask the device for an update token, or subscribe the activity to a broadcast channel."""
    if input_push_token and input_push_channel:
        raise ValidationError("live_activity", "input_push_token and input_push_channel "
                                               "are exclusive")
    return _payload(Aps(event="start", attributes_type=attributes_type, attributes=attributes,
                        content_state=content_state, alert=_alert(alert),
                        input_push_token=1 if input_push_token else None,
                        input_push_channel=input_push_channel, stale_date=stale_date,
                        relevance_score=relevance_score,
                        timestamp=_MARK if timestamp is None else timestamp), custom)


def update_payload(content_state: dict[str, Any], *, stale_date: int | None = None,
                   relevance_score: float | None = None,
                   alert: str | Alert | dict[str, Any] | None = None,
                   timestamp: int | None = None, custom: dict[str, Any] | None = None) -> Payload:
    """An ``update`` event's payload: the new ``content_state`` (with ``timestamp`` left
    out, fanout writes the send time)."""
    return _payload(Aps(event="update", content_state=content_state, stale_date=stale_date,
                        relevance_score=relevance_score, alert=_alert(alert),
                        timestamp=_MARK if timestamp is None else timestamp), custom)


def end_payload(content_state: dict[str, Any] | None = None, *,
                dismissal_date: int | None = None,
                alert: str | Alert | dict[str, Any] | None = None,
                timestamp: int | None = None, custom: dict[str, Any] | None = None) -> Payload:
    """An ``end`` event's payload: the final ``content_state``, and when the system
    removes the activity (``dismissal_date``, seconds since the epoch)."""
    return _payload(Aps(event="end", content_state=content_state, dismissal_date=dismissal_date,
                        alert=_alert(alert),
                        timestamp=_MARK if timestamp is None else timestamp), custom)


def _alert(alert: str | Alert | dict[str, Any] | None) -> str | Alert | None:
    if isinstance(alert, dict):
        import msgspec

        try:
            return msgspec.convert(alert, Alert)
        except msgspec.ValidationError as exc:
            raise ValidationError("payload", f"alert: {exc}") from None
    return alert


def notification(token: str, payload: Payload, bundle_id: str, *, priority: int = 10,
                 expiration: int | None = None, apns_id: str | None = None,
                 id: Any = None) -> Notification:
    """A Live Activity push: push type and ``.push-type.liveactivity`` topic set for you."""
    return Notification(token=token, payload=payload, push_type=PushType.LIVEACTIVITY,
                        topic=bundle_id, priority=priority, expiration=expiration,
                        apns_id=apns_id, id=id)


def prepare_stamped(note: Notification, *, default_topic: str | None = None,
                    clock: Callable[[], float] = time.time) -> Prepared:
    """Validate and encode; if the payload's timestamp is left to fanout, attach a
    :class:`Stamper` so the connection writes the current time into it at send time."""
    prepared = prepare(note, default_topic=default_topic)
    if _MARK_BYTES in prepared.body:
        stamper = Stamper(prepared.body, clock)
        prepared.stamp = stamper
        prepared.body = stamper()
    return prepared


# --------------------------------------------------------------------------- tracking

class Decision:
    """What the budget says about one update: the priority to send it at, whether a newer
    update made it pointless (``superseded``), and how long to hold it (``wait``, seconds)."""

    __slots__ = ("priority", "superseded", "wait")

    priority: int
    superseded: bool
    wait: float

    def __init__(self, priority: int, superseded: bool = False, wait: float = 0.0) -> None:
        self.priority = priority
        self.superseded = superseded
        self.wait = wait


class _Activity:
    __slots__ = ("last_source_time", "sent_p10")

    def __init__(self) -> None:
        self.last_source_time = float("-inf")
        self.sent_p10: deque[float] = deque()


class ActivityTracker:
    """Per-activity priority-10 budget and ordering.

    ``budget_per_hour`` priority-10 pushes per activity per rolling hour; over it,
    ``over_budget="lower"`` sends at priority 5 (Apple does not count those against the
    budget), ``"wait"`` returns how long to wait for a priority-10 slot. Activities are
    remembered in an LRU of ``max_activities``.
    """

    def __init__(self, budget_per_hour: int = 50, *,
                 over_budget: Literal["lower", "wait"] = "lower",
                 clock: Callable[[], float] = time.monotonic,
                 max_activities: int = 100_000) -> None:
        if budget_per_hour < 0:
            raise ValueError("budget_per_hour must be >= 0")
        if over_budget not in ("lower", "wait"):
            raise ValueError("over_budget must be 'lower' or 'wait'")
        self.budget = budget_per_hour
        self.over_budget = over_budget
        self._clock = clock
        self._max = max_activities
        self._activities: OrderedDict[str, _Activity] = OrderedDict()

    def _get(self, activity_id: str) -> _Activity:
        act = self._activities.get(activity_id)
        if act is None:
            act = self._activities[activity_id] = _Activity()
            if len(self._activities) > self._max:
                self._activities.popitem(last=False)
        else:
            self._activities.move_to_end(activity_id)
        return act

    def decide(self, activity_id: str, source_time: float | None,
               priority: int = 10) -> Decision:
        """Decide how to send the next push of ``activity_id`` (and record it). An update
        older (by ``source_time``, when the event happened) than the last timed one sent
        is superseded; one without a ``source_time`` is not ordered, and moves nothing."""
        act = self._get(activity_id)
        if source_time is not None and source_time < act.last_source_time:
            return Decision(priority, superseded=True)
        now = self._clock()
        window = act.sent_p10
        while window and window[0] <= now - 3600:
            window.popleft()
        if priority == 10 and len(window) >= self.budget:
            if self.over_budget == "wait" and self.budget > 0:
                return Decision(10, wait=window[0] + 3600 - now)
            priority = 5
        if source_time is not None:
            act.last_source_time = source_time
        if priority == 10:
            window.append(now)
        return Decision(priority)


class LiveActivities:
    """Start, update and end Live Activities through a client, with budget and ordering."""

    def __init__(self, client: Client, bundle_id: str, *, budget_per_hour: int = 50,
                 over_budget: Literal["lower", "wait"] = "lower",
                 tracker: ActivityTracker | None = None) -> None:
        self.client: Client = client
        self.bundle_id: str = bundle_id
        self.tracker: ActivityTracker = tracker or ActivityTracker(budget_per_hour, over_budget=over_budget)

    def plan(self, activity_id: str, token: str, payload: Payload, *,
             source_time: float | None = None, priority: int = 10,
             id: Any = None) -> Prepared | Result | float:
        """Decide now, in call order: a prepared push to send, a ``superseded`` Result, or
        the seconds to wait (``over_budget="wait"``). Plan a burst in order, then send the
        prepared pushes concurrently (``client.send_many``)."""
        decision = self.tracker.decide(activity_id, source_time, priority)
        if decision.superseded:
            return Result(outcome=Outcome.SUPERSEDED, id=id, token=token,
                          error=f"update for {activity_id} older than the last one sent")
        if decision.wait:
            return decision.wait
        note = notification(token, payload, self.bundle_id, priority=decision.priority, id=id)
        return prepare_stamped(note, default_topic=self.bundle_id)

    async def _send(self, activity_id: str, token: str, payload: Payload, *,
                    source_time: float | None, priority: int, id: Any) -> Result:
        while True:
            planned = self.plan(activity_id, token, payload, source_time=source_time,
                                priority=priority, id=id)
            if not isinstance(planned, float):
                break
            await trio.sleep(planned)
        if isinstance(planned, Result):
            return planned
        result = await self.client.send(planned)
        result.priority = int(planned.priority)  # the budget may have lowered it to 5
        return result

    async def start(self, token: str, *, activity_id: str, source_time: float | None = None,
                    priority: int = 10, id: Any = None, **kw: Any) -> Result:
        """Start an activity remotely (push-to-start token); ``kw`` as :func:`start_payload`."""
        return await self._send(activity_id, token, start_payload(**kw),
                                source_time=source_time, priority=priority, id=id)

    async def update(self, token: str, content_state: dict[str, Any], *, activity_id: str,
                     source_time: float | None = None, priority: int = 10, id: Any = None,
                     **kw: Any) -> Result:
        """Update an activity, within its budget and in source order (an update older
        than the last one sent ends ``superseded``); ``kw`` as :func:`update_payload`."""
        return await self._send(activity_id, token, update_payload(content_state, **kw),
                                source_time=source_time, priority=priority, id=id)

    async def end(self, token: str, content_state: dict[str, Any] | None = None, *,
                  activity_id: str, source_time: float | None = None, priority: int = 10,
                  id: Any = None, **kw: Any) -> Result:
        """End an activity; ``kw`` as :func:`end_payload`."""
        return await self._send(activity_id, token, end_payload(content_state, **kw),
                                source_time=source_time, priority=priority, id=id)
