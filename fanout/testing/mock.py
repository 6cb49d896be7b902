"""A validating, fault-injecting mock of the APNs device-push endpoint (``POST /3/device/<token>``).

The server speaks real TLS (ALPN ``h2``) and uses the ``h2`` library as its HTTP/2 state machine,
an implementation independent of fanout's own client framer. It validates requests the way
APNs documents them (path, headers, JWT, topic, payload) and answers with APNs status codes and
reasons. On top of that it misbehaves on demand: stream-limit changes (1 until the first valid
token, back to 1 after a rejection), latency and jitter, random 429/500/503, 410 Unregistered,
GOAWAY (optionally with a last-stream-id below streams it received), abrupt closes, streams that
are never answered, "wedged" connections after ``ExpiredProviderToken``, a token that expires once
mid-run, connections that stop reading, server PINGs, and stream windows that never open.

The same listener also plays Apple's *broadcast* side (docs/apns.md, Broadcast channels), so one
mock serves a whole test: the channel management API (``POST/GET/DELETE
/1/apps/<bundleId>/channels``, ``GET /1/apps/<bundleId>/all-channels``; on APNs a separate host on
port 2195/2196) and broadcast sends (``POST /4/broadcasts/apps/<bundleId>``; on APNs port 443).
Both verify the JWT like device pushes and answer Apple's broadcast reasons (docs/apns.md,
Broadcast channels; :data:`fanout.outcome.REASONS`) with an ``apns-request-id`` header (echoed if
the request carried a valid UUID, else generated). Channels live in ``stats.channels``; 200
broadcasts are counted per channel in ``stats.broadcasts``. Broadcast rules the docs leave open
are settled strictly here: a No-Message-Stored (policy 0) channel accepts only
``apns-expiration: 0``, an *absent* header included (absent means APNs' default storage, which
such a channel refuses), and a suffixed bundle id (``com.example.app.push-type.liveactivity``) is
``400 TopicDisallowed``. These paths always validate (``validate=False`` only affects device
pushes).

Everything the mock saw is counted in :class:`MockStats`, so tests can assert exactly-once
delivery (``stats.delivered``) and protocol hygiene (``stats.protocol_errors == []``,
``stats.streams_after_goaway == 0``). A test in another process (another language) asks the
same listener: ``GET /stats`` answers :meth:`MockStats.summary` as JSON, ``DELETE /stats``
the same and then resets; these requests get no fault and are in no count (docs/mock.md).

Typical use in a trio test::

    async with trio.open_nursery() as nursery:
        mock = await open_mock(nursery, MockConfig(team_id=key.team_id,
                                                   keys={key.key_id: key.public_key}), pki)
        ...  # push to https://localhost:{mock.port}
        nursery.cancel_scope.cancel()

The parts live in private modules, the way Pushy's mock server is split: ``_server`` (listener,
TLS/ALPN, the per-connection h2 driver, stats), ``_device`` (validating device pushes), ``_jwt``
(provider tokens), ``_broadcast`` (broadcast sends and channels), ``_faults`` (fault injection),
``_apple`` (the mock's own copy of Apple's facts), ``_http`` (request and answer), ``_config``.
"""

from __future__ import annotations

from ._apple import PUSH_TYPE_TOPIC_SUFFIX as PUSH_TYPE_TOPIC_SUFFIX
from ._apple import STREAM_LIMIT_VIOLATION as STREAM_LIMIT_VIOLATION
from ._config import MockConfig, MockStats
from ._faults import hash_fraction as _hash_fraction  # noqa: F401  (tests and bench use it)
from ._faults import is_sandbox_token as is_sandbox_token
from ._server import MockAPNs, open_mock
from ._server import log as log

__all__ = ["MockAPNs", "MockConfig", "MockStats", "open_mock"]
