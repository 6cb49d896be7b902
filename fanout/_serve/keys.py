"""``fanout serve``'s API keys: who may send, how fast, and to which topics.

A keys file has one key per line (``#`` comments and blank lines ignored)::

    sha256:9f86d081884c7d65...   name=billing rate=200 topics=com.example.app
    k_live_plain_key_value        name=ops

A key is either its SHA-256 (``sha256:`` and 64 hex digits, as ``fanout serve --hash-key``
prints: the file then holds no secret) or the key itself. ``rate`` is pushes per second
(a token bucket, burst one second's worth), ``topics`` a comma-separated allow-list (a
topic's Live Activity and other suffixes are allowed with it). Keys are compared by their
digests with :func:`hmac.compare_digest`, every key every time, so the time taken says
nothing about how much of a key was right.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable

import msgspec

from ..errors import ConfigError
from ..payload import bundle_of

_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")
MIN_KEY_LENGTH = 16


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def hash_key(key: str) -> str:
    """The line a keys file holds for ``key`` without holding the key."""
    return "sha256:" + digest(key).hex()


class ApiKey(msgspec.Struct, kw_only=True):
    name: str
    digest: bytes
    rate: float | None = None
    topics: frozenset[str] | None = None
    _tokens: float = 0.0
    _stamp: float = 0.0

    def allows(self, topic: str | None) -> bool:
        """Whether this key may send to ``topic`` (None: the server's default topic)."""
        return self.topics is None or (topic is not None and bundle_of(topic) in self.topics)

    def take(self, n: int = 1, now: float | None = None) -> float:
        """Take ``n`` pushes from this key's bucket: 0.0 if allowed, else the seconds until
        they would be (nothing taken)."""
        if self.rate is None:
            return 0.0
        now = time.monotonic() if now is None else now
        self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= n or (n > self.rate and self._tokens >= self.rate):
            self._tokens -= n
            return 0.0
        return (min(n, self.rate) - self._tokens) / self.rate


class ApiKeys:
    """The keys ``fanout serve`` accepts."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = list(keys)
        now = time.monotonic()
        for key in self.keys:
            key._tokens = key.rate or 0.0
            key._stamp = now

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key ``presented`` is, or None; constant time in what was presented."""
        d = digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, d):
                found = key
        return found

    @classmethod
    def load(cls, path: str | None, variable: str | None) -> ApiKeys:
        """Keys from the file ``path`` and from ``variable`` (keys or ``sha256:`` digests,
        separated by commas or whitespace); ConfigError naming the line that is wrong."""
        keys: list[ApiKey] = []
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    lines = fh.read().splitlines()
            except OSError as exc:
                raise ConfigError(f"--api-keys {path}: {exc.strerror}") from None
            for number, raw in enumerate(lines, 1):
                text = raw.split("#", 1)[0].strip()
                if text:
                    keys.append(_parse(text, f"{path}:{number}", f"key{len(keys) + 1}"))
        if variable:
            for i, item in enumerate(re.split(r"[\s,]+", variable.strip())):
                if item:
                    keys.append(_parse(item, f"FANOUT_API_KEYS item {i + 1}", f"env{i + 1}"))
        names = [k.name for k in keys]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"API key names must differ: {', '.join(sorted(dup))}")
        return cls(keys)


def _parse(text: str, where: str, default_name: str) -> ApiKey:
    first, *attrs = text.split()
    hashed = _HASHED.fullmatch(first)
    if hashed:
        key_digest = bytes.fromhex(hashed.group(1))
    elif first.startswith("sha256:"):
        raise ConfigError(f"{where}: sha256: needs 64 hex digits (fanout serve --hash-key KEY)")
    elif len(first) < MIN_KEY_LENGTH:
        raise ConfigError(f"{where}: an API key needs at least {MIN_KEY_LENGTH} characters")
    else:
        key_digest = digest(first)
    name, rate, topics = default_name, None, None
    for attr in attrs:
        field, sep, value = attr.partition("=")
        if not sep or not value:
            raise ConfigError(f"{where}: {attr!r}: expected name=, rate= or topics=")
        if field == "name":
            name = value
        elif field == "rate":
            try:
                rate = float(value)
            except ValueError:
                rate = -1.0
            if not rate > 0:
                raise ConfigError(f"{where}: rate must be a positive number of pushes per "
                                  f"second, not {value!r}")
        elif field == "topics":
            topics = frozenset(bundle_of(t) for t in value.split(",") if t)
        else:
            raise ConfigError(f"{where}: unknown attribute {field!r} (name, rate, topics)")
    return ApiKey(name=name, digest=key_digest, rate=rate, topics=topics)
