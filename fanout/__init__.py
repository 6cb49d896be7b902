"""fanout: high-volume APNs sender on trio.

The public API is what this module exports, plus the feature modules :mod:`fanout.teams`
(several developer teams), :mod:`fanout.liveactivity`, :mod:`fanout.channels` (broadcast
channels), :mod:`fanout.metrics` (Prometheus), :mod:`fanout.config` (settings files) and
:mod:`fanout.testing` (a mock APNs and throwaway credentials), and the two doors for code that
is not trio: :mod:`fanout.asyncio` and :mod:`fanout.sync`. Modules whose names start
with ``_`` are internal and may change in any release.

The layers, from the bottom: ``_engine`` (HTTP/2 framer, TLS, connection, pool, proxy),
the library (payload, outcome, auth, events, client), the features, ``config``, then the
``fanout run`` daemon (``_daemon``) and the command line (``_cli``). Each imports only
from below it; ``tests/test_layers.py`` checks that.

A push goes by several names on its way: a :class:`Notification` (what you write) is
validated into a ``Prepared`` (bytes ready for the wire), sent as a ``Push`` (one HTTP/2
stream) and ends as a :class:`Result`. In the daemon a line is a ``PushLine`` and its
answer a ``ResultLine``.
"""

import gc as _gc

# The imports below (trio, cryptography, msgspec, ours) create ~50,000 objects that live
# as long as the process. Scanned as young objects they cost every start ~8 ms of CPU
# (issue 19), so the collector is off while they are made and then they join the oldest
# generation unscanned (freeze, unfreeze); unless a caller froze objects of its own, which
# unfreeze would thaw. ``fanout`` as a command then freezes them for good (fanout._cli.main).
_gc_was_enabled = _gc.isenabled()
_gc.disable()
try:
    from ._engine.backoff import Backoff
    from .auth import Auth, CertAuth, TokenAuth
    from .client import Client
    from .errors import (
        ClosedError,
        ConfigError,
        FanoutError,
        KeyFileError,
        ProtocolError,
        TransportError,
        ValidationError,
    )
    from .events import Events
    from .outcome import Outcome, Reason, Result
    from .payload import (
        Alert,
        Aps,
        CriticalSound,
        Environment,
        Notification,
        Payload,
        PushTemplate,
        PushType,
        bundle_of,
        topic_for,
    )
finally:
    if not _gc.get_freeze_count():
        _gc.freeze()
        _gc.unfreeze()
    if _gc_was_enabled:
        _gc.enable()
    del _gc, _gc_was_enabled

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "Aps",
    "Auth",
    "Backoff",
    "CertAuth",
    "Client",
    "ClosedError",
    "ConfigError",
    "CriticalSound",
    "Environment",
    "Events",
    "FanoutError",
    "KeyFileError",
    "Notification",
    "Outcome",
    "Payload",
    "ProtocolError",
    "PushTemplate",
    "PushType",
    "Reason",
    "Result",
    "TokenAuth",
    "TransportError",
    "ValidationError",
    "__version__",
    "bundle_of",
    "topic_for",
]
