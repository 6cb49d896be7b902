"""Fault injection: the failures :class:`MockConfig` asks for on top of honest validation.

Random faults draw from the mock's seeded ``rng``, in a fixed order per request (p500, p503,
then p429 once the request is otherwise good; never_answer, then jitter, when it completes), so
a seed replays the same run. Token faults are chosen by a hash of the token: stable across runs.
"""

from __future__ import annotations

import hashlib
import random

from ._config import MockConfig


def hash_fraction(token: str) -> float:
    """A stable number in [0, 1) for a token (the same token always gets the same number)."""
    digest = hashlib.sha256(b"fanout-mock:" + token.lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_sandbox_token(token: str, config: MockConfig) -> bool:
    """Whether ``token`` is a sandbox token under ``config.sandbox_token_fraction``: its hash
    falls in the window of that width starting at 0.5, wrapping past 1.0 (so 1.0 is all)."""
    fraction = config.sandbox_token_fraction
    return fraction >= 1.0 or (hash_fraction(token) - 0.5) % 1.0 < fraction


def server_fault(config: MockConfig, rng: random.Random, wedged: bool) -> tuple[int, str] | None:
    """A wedged connection's ExpiredProviderToken, or a random 500/503, before any check."""
    if wedged:
        return 403, "ExpiredProviderToken"
    if config.p500 and rng.random() < config.p500:
        return 500, "InternalServerError"
    if config.p503 and rng.random() < config.p503:
        return 503, "ServiceUnavailable"
    return None


def throttled(config: MockConfig, rng: random.Random) -> bool:
    """Whether an otherwise good request gets a random 429 TooManyRequests."""
    return bool(config.p429) and rng.random() < config.p429


def _unregistered(config: MockConfig, token: str) -> bool:
    unregistered = config.unregistered
    return bool(
        (callable(unregistered) and unregistered(token))
        or (isinstance(unregistered, set | frozenset) and token in unregistered)
        or (config.unregistered_fraction and hash_fraction(token) < config.unregistered_fraction)
    )


def token_fault(config: MockConfig, token: str, topic: bytes | None) -> tuple[int, str] | None:
    """The 410/400 a device token gets whatever the request (unregistered, bad, of the other
    environment, or of another app than ``topic``), or ``None``."""
    if _unregistered(config, token):
        return 410, "Unregistered"
    if config.bad_token_fraction and 1.0 - hash_fraction(token) <= config.bad_token_fraction:
        return 400, "BadDeviceToken"
    if config.sandbox_token_fraction and (
        (config.environment == "sandbox") != is_sandbox_token(token, config)
    ):
        return 400, "BadDeviceToken"
    if config.token_topic is not None:
        name = (topic or b"").decode("ascii", "replace")
        if name != config.token_topic and not name.startswith(config.token_topic + "."):
            return 400, "DeviceTokenNotForTopic"
    return None


def never_answers(config: MockConfig, rng: random.Random) -> bool:
    """Whether a complete stream is left unanswered (``never_answer``)."""
    return bool(config.never_answer) and rng.random() < config.never_answer


def answer_delay(config: MockConfig, rng: random.Random) -> float:
    """Seconds to wait before answering: ``latency`` ± ``jitter``."""
    delay = config.latency
    if config.jitter:
        delay += rng.uniform(-config.jitter, config.jitter)
    return delay
