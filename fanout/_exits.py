"""The exit codes of every ``fanout`` command, and the rule that picks one from results.

| code | meaning |
|---|---|
| 0 | done: every push ``delivered`` or its token dead (``invalid_token``), ``superseded``; a daemon's ``malformed`` lines are reported, not failures |
| 1 | some pushes failed: ``rejected``, ``retries_exhausted`` or ``maybe_delivered`` |
| 2 | usage: a bad flag, setting, config file, key file or input; nothing was sent |
| 3 | configuration: APNs (or the server) refused the set-up: ``config_error`` results (credentials, topic, clock, the topic guard), no HTTP/2 by ALPN, an untrusted certificate |
| 4 | APNs unreachable: no usable connection for ``unavailable_timeout`` seconds |
| 5 | the results could not be written (disk full, a broken pipe): the checkpoint covers only what was written |
| 130 | stopped by a second signal (or Ctrl-C) |

When several apply the most serious wins: 3, then 4, then 1 (:data:`SEVERITY`; for
``fanout check``, 2 comes first: settings that cannot be used at all).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import UNREACHABLE

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNREACHABLE = 4
EXIT_OUTPUT = 5
EXIT_FORCED = 130

#: The exit codes from the most serious down: when several apply, the first of them wins.
SEVERITY = (EXIT_USAGE, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_FAILED, EXIT_OK)


def most_serious(codes: Iterable[int]) -> int:
    """The most serious of ``codes`` (:data:`SEVERITY`); ``EXIT_OK`` when there are none."""
    return min(codes, key=SEVERITY.index, default=EXIT_OK)


#: Outcomes that make a run fail (exit 1) unless something worse happened.
FAILED_OUTCOMES = frozenset({"rejected", "retries_exhausted", "maybe_delivered"})


def exit_code(counts: Mapping[str, int], *, unreachable: int = 0,
              config_error: bool = False) -> int:
    """The exit code for a run whose results had ``counts`` per outcome, of which
    ``unreachable`` ended because APNs could not be reached."""
    if config_error or counts.get("config_error"):
        return EXIT_CONFIG
    if unreachable:
        return EXIT_UNREACHABLE
    if any(counts.get(outcome) for outcome in FAILED_OUTCOMES):
        return EXIT_FAILED
    return EXIT_OK


def is_unreachable(result: object) -> bool:
    """Whether ``result`` (a :class:`fanout.outcome.Result`) ended because APNs could not
    be reached."""
    error = getattr(result, "error", None)
    return isinstance(error, str) and UNREACHABLE in error
