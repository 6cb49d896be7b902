"""Exception types shared by every fanout module, and the one redaction helper.

An APNs *answer* (a status and a reason) is never an exception: it becomes a typed
:class:`fanout.outcome.Result`. Exceptions are for what is not an answer: bad input caught
before any network I/O, bad configuration, and transport failures.
"""

from __future__ import annotations


class FanoutError(Exception):
    """Base of every error fanout raises."""


class ValidationError(FanoutError, ValueError):
    """A notification broke an APNs rule; raised before any network I/O.

    ``field`` names the offending field (``token``, ``payload``, ``collapse_id`` ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ConfigError(FanoutError):
    """The configuration cannot work (bad key, wrong team, unknown option ...)."""


class KeyFileError(ConfigError):
    """The signing key or certificate file is missing, unreadable or of the wrong kind."""


class TransportError(FanoutError):
    """The connection to APNs failed or broke; the request may or may not have been seen."""


class ClosedError(FanoutError):
    """The client closed (or the process is exiting) before this call ended: a push among
    such calls may or may not have been delivered."""


class ProtocolError(TransportError):
    """The peer broke the HTTP/2 protocol (malformed frame, bad state, oversized block)."""


#: The start of a push's ``error`` when it ended because APNs could not be reached.
UNREACHABLE = "APNs unreachable"


def redact(token: str | bytes | None) -> str:
    """A device token shortened for logs: never print a whole token."""
    if token is None:
        return "-"
    if isinstance(token, bytes):
        token = token.decode("ascii", "replace")
    if len(token) <= 12:
        return token[:4] + "…"
    return f"{token[:6]}…{token[-4:]}"
