"""Retry backoff: exponential with full jitter, as AWS's "Exponential Backoff and Jitter"
describes; the pool uses it between connection attempts and the client between retries."""

from __future__ import annotations

import math
import random

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with full jitter: ``delay(k)`` is uniform in ``[0, min(cap, base*factor**(k-1))]``."""

    __slots__ = ("base", "cap", "factor", "jitter", "_rng")

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 60.0,
        factor: float = 2.0,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if not (base >= 0 and cap >= 0 and factor >= 1):
            raise ValueError("need base >= 0, cap >= 0 and factor >= 1")
        self.base: float = float(base)
        self.cap: float = float(cap)
        self.factor: float = float(factor)
        self.jitter: bool = jitter
        self._rng = rng or random.Random()

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay for ``attempt`` (>= 1)."""
        if attempt < 1:
            raise ValueError(f"attempt starts at 1, got {attempt!r}")
        try:
            return min(self.cap, self.base * self.factor ** (attempt - 1))
        except OverflowError:
            return self.cap

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based).

        A server-supplied ``retry_after`` wins over the schedule (clamped to ``[0, cap]``).
        """
        if retry_after is not None and not math.isnan(retry_after):
            return min(self.cap, max(0.0, float(retry_after)))
        ceiling = self.ceiling(attempt)
        return self._rng.uniform(0.0, ceiling) if self.jitter else ceiling
