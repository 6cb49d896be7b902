"""The mock's own copy of Apple's facts about APNs requests.

The mock is an independent oracle for fanout's sender, so it keeps these tables itself rather
than importing :mod:`fanout.payload`'s (a shared mistake would otherwise go unnoticed).
"""

from __future__ import annotations

import re

#: Topic suffix each ``apns-push-type`` requires after the bundle id
#: (docs/apns.md, Topics and push types).
PUSH_TYPE_TOPIC_SUFFIX: dict[str, str] = {
    "alert": "",
    "background": "",
    "mdm": "",
    "location": ".location-query",
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "liveactivity": ".push-type.liveactivity",
    "pushtotalk": ".voip-ptt",
    "widgets": ".push-type.widgets",
    "controls": ".push-type.controls",
}
#: The distinct suffixes, longest first.
SUFFIXES: list[str] = sorted(set(PUSH_TYPE_TOPIC_SUFFIX.values()), key=len, reverse=True)

#: Debug data of the GOAWAY APNs sends to a client that opens too many streams.
STREAM_LIMIT_VIOLATION = "Maximum active streams violated for this endpoint."

PRIORITIES = frozenset({b"10", b"5", b"1"})
HEX = re.compile(rb"[0-9a-fA-F]+")
UUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PAYLOAD_LIMIT = 4096  # bytes of a device push's payload
VOIP_PAYLOAD_LIMIT = 5120
COLLAPSE_ID_MAX = 64  # bytes of apns-collapse-id
BROADCAST_PAYLOAD_LIMIT = 5120
CHANNEL_ID_MAX = 128  # characters of base64; Apple: "bad base64 or too long", size not fixed
CHANNEL_FIELDS = frozenset({"message-storage-policy", "push-type"})
DEVICE_PREFIX = b"/3/device/"
BROADCAST_PREFIX = b"/4/broadcasts/apps/"
MANAGE_PREFIX = b"/1/apps/"
