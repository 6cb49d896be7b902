"""Provider-token (JWT) verification, the way APNs answers it (docs/apns.md, Provider tokens)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import time
from dataclasses import dataclass
from typing import Protocol

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from ._config import MockConfig, MockStats

_MAX_CLOCK_SKEW = 300.0  # seconds a JWT's iat may lie in the future
_JWT_CACHE_MAX = 4_096
_JWS = jwt.PyJWS(algorithms=["ES256"])


@dataclass(slots=True)
class TokenInfo:
    """Cached facts about one JWT string; the signature check is done once per key."""

    digest: str
    malformed: bool
    kid: str | None = None
    iss: object = None
    iat: float | None = None
    key: EllipticCurvePublicKey | None = None  # key the signature was checked against
    valid: bool = False


class MockState(Protocol):
    """What the handlers read of the server (:class:`MockAPNs` is one): they never import
    it, so the server sits on top of its handlers."""

    config: MockConfig
    stats: MockStats
    rng: random.Random

    def expire_token_now(self) -> bool: ...

    def token_info(self, token: bytes) -> TokenInfo: ...


def _parse_jwt(token: bytes) -> TokenInfo:
    digest = hashlib.sha256(token).hexdigest()
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return TokenInfo(digest, malformed=True)
    iat = claims.get("iat")
    if header.get("alg") != "ES256" or not isinstance(claims, dict):
        return TokenInfo(digest, malformed=True)
    if not isinstance(iat, int | float) or isinstance(iat, bool):
        iat = None
    kid = header.get("kid")
    return TokenInfo(digest, False, kid if isinstance(kid, str) else None, claims.get("iss"), iat)


def _signature_ok(token: bytes, key: EllipticCurvePublicKey) -> bool:
    """The ES256 signature, in JOSE's form (r || s, 64 bytes) or DER-encoded, as Java's
    ``SHA256withECDSA`` makes it (Pushy signs that way, and APNs accepts it)."""
    try:
        _JWS.decode(token, key, algorithms=["ES256"])
    except jwt.PyJWTError:
        return _der_signature_ok(token, key)
    return True


def _der_signature_ok(token: bytes, key: EllipticCurvePublicKey) -> bool:
    signing_input, _, encoded = token.rpartition(b".")
    try:
        signature = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return False
    if signature[:1] != b"\x30":  # not a DER SEQUENCE (a P-256 one may be 64 bytes long too)
        return False
    try:  # OpenSSL parses the DER strictly (one encoding per signature)
        key.verify(signature, signing_input, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


class TokenCache:
    """Parsed JWTs by their bytes, bounded (cleared when full)."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[bytes, TokenInfo] = {}

    def info(self, token: bytes) -> TokenInfo:
        """The cached parse of ``token``."""
        info = self._cache.get(token)
        if info is None:
            if len(self._cache) >= _JWT_CACHE_MAX:
                self._cache.clear()
            info = self._cache[token] = _parse_jwt(token)
        return info


class ProviderTokens:
    """The provider-token state of one connection: its key id, its current JWT, and whether
    an ExpiredProviderToken wedged it (``expired_token_wedge``)."""

    __slots__ = ("kid", "jwt", "since", "wedged")

    def __init__(self) -> None:
        self.kid: str | None = None
        self.jwt: bytes | None = None
        self.since = 0.0  # when self.jwt was first used
        self.wedged = False

    def authorize(self, value: bytes | None, mock: MockState) -> tuple[int, str] | None:
        """The (status, reason) refusing an ``authorization`` header, or ``None`` if good."""
        reason = self.reason(value, mock)
        if reason is None:
            return None
        if reason == "ExpiredProviderToken" and mock.config.expired_token_wedge:
            self.wedged = True
        return (429 if reason == "TooManyProviderTokenUpdates" else 403), reason

    def reason(self, value: bytes | None, mock: MockState) -> str | None:
        """The 403/429 reason for an ``authorization`` header, or ``None`` if it is good."""
        if not value:
            return "MissingProviderToken"
        scheme, _, token = value.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer":
            return "InvalidProviderToken"
        if not token:
            return "MissingProviderToken"
        cfg = mock.config
        info = mock.token_info(token)
        if info.malformed or not _signed_by_team(token, info, mock):
            return "InvalidProviderToken"
        if info.iat is None:
            return "InvalidProviderToken"
        now = time.time()
        age = now - info.iat
        if age > cfg.token_max_age:
            return "ExpiredProviderToken"
        if age < -_MAX_CLOCK_SKEW:
            return "InvalidProviderToken"
        if cfg.keys and cfg.bind_key_to_connection:
            if self.kid is None:
                self.kid = info.kid
            elif info.kid != self.kid:
                return "UnrelatedKeyIdInToken"
        return self._renewal_reason(token, now, mock)

    def _renewal_reason(self, token: bytes, now: float, mock: MockState) -> str | None:
        """Rate-limited token updates and the one-shot ``expire_token_once_after``."""
        cfg = mock.config
        if token != self.jwt:
            if (
                self.jwt is not None
                and cfg.token_update_min_interval > 0
                and now - self.since < cfg.token_update_min_interval
            ):
                return "TooManyProviderTokenUpdates"
            if cfg.expire_token_once_after is not None and mock.expire_token_now():
                return "ExpiredProviderToken"  # not the connection's token: not recorded
            self.jwt, self.since = token, now
        elif cfg.expire_token_once_after is not None and mock.expire_token_now():
            return "ExpiredProviderToken"
        return None


def _signed_by_team(token: bytes, info: TokenInfo, mock: MockState) -> bool:
    """With ``keys``: signed by the ``kid``'s key (checked once per key); and the issuer fits."""
    cfg = mock.config
    if cfg.keys:
        key = cfg.keys.get(info.kid) if info.kid is not None else None
        if key is None:
            return False
        if info.key is not key:  # verify once per (JWT, key)
            info.valid = _signature_ok(token, key)
            info.key = key
        if not info.valid:
            return False
    return cfg.team_id is None or info.iss == cfg.team_id
