"""Events, the engine's listener interface, and MultiEvents, which fans hooks out."""

from __future__ import annotations

from fanout.events import Events, MultiEvents
from fanout.outcome import Outcome, Result


class Recorder(Events):
    def __init__(self, name: str, log: list[tuple[str, str, tuple[object, ...]]]) -> None:
        self.name = name
        self.log = log

    def push_finished(self, result: Result, push_type: bytes, latency_s: float | None) -> None:
        self.log.append((self.name, "push_finished", (result.outcome, push_type, latency_s)))

    def retry(self, cause: str) -> None:
        self.log.append((self.name, "retry", (cause,)))


def test_multi_events_calls_every_backend_in_order():
    log: list[tuple[str, str, tuple[object, ...]]] = []
    both = MultiEvents(Recorder("a", log), Recorder("b", log))
    both.push_finished(Result(outcome=Outcome.DELIVERED), b"alert", 0.5)
    both.retry("429")
    both.limiter_wait(1.0)  # a hook neither overrides: the base's no-op, no error
    assert log == [
        ("a", "push_finished", (Outcome.DELIVERED, b"alert", 0.5)),
        ("b", "push_finished", (Outcome.DELIVERED, b"alert", 0.5)),
        ("a", "retry", ("429",)),
        ("b", "retry", ("429",)),
    ]


def test_every_hook_of_events_is_a_no_op_by_default():
    hooks = [n for n in vars(Events) if not n.startswith("_")]
    assert "push_finished" in hooks and "wrong_environment_found" in hooks
    ev = Events()
    ev.retry("lost")
    ev.invalid_token("ab" * 32, "Unregistered", 1)
    ev.wrong_environment_found("sandbox")
