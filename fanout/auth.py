"""APNs authentication: one shared ES256 provider token (JWT) or a TLS client certificate.

Token auth rules (docs/apns.md, "Provider tokens"): the JWT is
``{"alg": "ES256", "kid": key_id}`` / ``{"iss": team_id, "iat": now}``; APNs rejects an
``iat`` older than one hour (403 ``ExpiredProviderToken``) and answers 429
``TooManyProviderTokenUpdates`` when a connection sees a new token more often than every
20 minutes. Minting per connection, per topic or per request is the most common cause of
that 429 in other APNs clients, so :class:`TokenAuth` holds exactly one token per
(team, key) in the process, and every connection of every client shares it.

Nothing here ever logs, prints or reprs a JWT or key material; error messages name the
file and the problem, never the file's contents.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import ssl
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .errors import ConfigError, KeyFileError

__all__ = ["Auth", "CertAuth", "TokenAuth", "MAX_TOKEN_AGE"]

log: logging.Logger = logging.getLogger("fanout.auth")

#: APNs rejects a provider token whose ``iat`` is older than this (seconds).
MAX_TOKEN_AGE = 3600.0

# A .p8 key is ~250 bytes and a cert chain a few KiB; refuse to slurp anything huge.
_MAX_FILE_SIZE = 1 << 20
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_ID_RE = re.compile(r"[A-Za-z0-9]+")
APPLE_ID_LENGTH = 10  # key ids and team ids alike


def _read_file(path: str | os.PathLike[str], what: str) -> tuple[bytes, int]:
    """Read a small key/cert file; returns (data, st_mode). Every failure is a KeyFileError."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):  # some platforms let open() succeed on a directory
                raise IsADirectoryError(name)
            if st.st_size > _MAX_FILE_SIZE:
                raise KeyFileError(
                    f"{what} {name!r} is too large ({st.st_size} bytes) to be a {what}"
                )
            data = f.read(_MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {name!r} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {name!r} is a directory, not a file") from None
    except PermissionError:
        raise KeyFileError(f"{what} {name!r} is not readable (permission denied)") from None
    except OSError as exc:
        raise KeyFileError(
            f"{what} {name!r} cannot be read: {exc.strerror or type(exc).__name__}"
        ) from None
    return data, st.st_mode


def _pem_labels(data: bytes) -> list[str]:
    return [m.decode("ascii") for m in _PEM_LABEL.findall(data)]


#: The two DER layouts of an unencrypted PKCS#8 P-256 key (RFC 5208, 5915): Apple's .p8
#: (the curve named again in the ECPrivateKey) and OpenSSL's or cryptography's (not):
#: (bytes before the 32-byte secret, bytes between it and the 65-byte public point).
_P8_LAYOUTS = (
    (bytes.fromhex("308193020100301306072a8648ce3d020106082a8648ce3d030107047930770201010420"),
     bytes.fromhex("a00a06082a8648ce3d030107a144034200")),
    (bytes.fromhex("308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420"),
     bytes.fromhex("a144034200")),
)
_P8_BEGIN = b"-----BEGIN PRIVATE KEY-----"
_P8_END = b"-----END PRIVATE KEY-----"


def _load_p8(data: bytes) -> ec.EllipticCurvePrivateKey | None:
    """The key of a .p8 as Apple and OpenSSL write it (one PEM block of 64-character lines,
    one of the two :data:`_P8_LAYOUTS`, a public point that is the secret's), without
    cryptography's serialization module (~3 ms of start-up, issue 19); None for any other
    text (serialization then parses it, and :func:`_load_private_key` names what is wrong)."""
    lines = data.strip().split(b"\n")
    if len(lines) < 3 or lines[0].rstrip(b"\r") != _P8_BEGIN or lines[-1] != _P8_END:
        return None
    body = [line.rstrip(b"\r") for line in lines[1:-1]]
    if any(len(line) != 64 for line in body[:-1]) or not 0 < len(body[-1]) <= 64:
        return None
    try:
        der = base64.b64decode(b"".join(body), validate=True)
    except ValueError:  # binascii.Error
        return None
    for before, between in _P8_LAYOUTS:
        at = len(before) + 32
        if (len(der) == at + len(between) + 65 and der.startswith(before)
                and der.startswith(between, at) and der[at + len(between)] == 4):
            break
    else:
        return None
    try:
        key = ec.derive_private_key(int.from_bytes(der[at - 32:at], "big"), ec.SECP256R1())
    except ValueError:  # 0, or not below the group's order
        return None
    point = key.public_key().public_numbers()
    if point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big") != der[-64:]:
        return None
    return key


def _load_private_key(data: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    """Parse PEM bytes into a P-256 private key, classifying every way it can be wrong.

    ``source`` names the origin for messages ("key file '/x/AuthKey.p8'" or "key").
    The data itself never appears in a message nor in a chained exception.
    """
    labels = _pem_labels(data)
    if not labels:
        raise KeyFileError(
            f"{source} is not PEM (expected the .p8 text starting with "
            "'-----BEGIN PRIVATE KEY-----')"
        )
    if "ENCRYPTED PRIVATE KEY" in labels or b"Proc-Type: 4,ENCRYPTED" in data:
        raise KeyFileError(
            f"{source} is encrypted; APNs .p8 keys are not, decrypt it with "
            "'openssl pkcs8 -topk8 -nocrypt'"
        )
    if not any(label.endswith("PRIVATE KEY") for label in labels):
        if "CERTIFICATE" in labels:
            kind = "a certificate"
        elif "PUBLIC KEY" in labels:
            kind = "a public key"
        else:
            kind = "PEM of type " + ", ".join(sorted(set(labels)))
        raise KeyFileError(
            f"{source} contains {kind}, not a private key (token auth needs the .p8 signing key)"
        )
    fast = _load_p8(data)
    if fast is not None:
        return fast
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise KeyFileError(f"{source} is encrypted; APNs .p8 keys are not") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{source} is PEM but could not be parsed as a private key") from None
    return _check_key(key, source)


def _check_key(key: Any, source: str) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "") or "unknown"
        raise KeyFileError(
            f"{source} is a {kind} key; APNs token auth needs an EC P-256 (ES256) private key"
        )
    if not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(
            f"{source} is an EC key on curve {key.curve.name}; "
            "APNs token auth (ES256) needs P-256 (secp256r1)"
        )
    return key


def _check_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.isascii() or not _ID_RE.fullmatch(value):
        raise ConfigError(f"{field} must be a non-empty alphanumeric string, got {value!r}")
    if len(value) != APPLE_ID_LENGTH:  # caught here, not as a 403 from APNs on every push
        what = "key id (Keys page of the developer account)" if field == "key_id" else \
            "team id (Membership page of the developer account)"
        raise ConfigError(f"{field} {value!r} has {len(value)} characters; an Apple {what} "
                          f"has {APPLE_ID_LENGTH}")
    return value


def _check_file_name(path: str, key_id: str) -> None:
    """Apple names a key's file ``AuthKey_<KEYID>.p8``: another key id is a mix-up."""
    match = re.fullmatch(r"AuthKey_([A-Za-z0-9]+)\.p8", os.path.basename(path))
    if match and match.group(1) != key_id:
        raise ConfigError(f"key_id {key_id!r} differs from the key file's name "
                          f"{os.path.basename(path)!r} (Apple names it AuthKey_<key id>.p8): "
                          f"is it the right key, or the right key id?")


@runtime_checkable
class Auth(Protocol):
    """What ``Client(auth=...)`` takes: credentials for the push connections.

    :class:`TokenAuth` and :class:`CertAuth` are the two kinds APNs knows; both subclass
    this, so a type checker rejects anything else passed as ``auth``.
    """

    __slots__ = ()

    def header(self) -> bytes | None:
        """The ``authorization`` header value of each request, or None (none is sent)."""
        ...

    def apply(self, ctx: ssl.SSLContext) -> None:
        """Install what the TLS handshake needs (a client certificate) into ``ctx``."""
        ...


class _Signer:
    """The mutable half of a provider token: the JWT, its deadline and generation.

    One per (key, key id, team, rotation schedule, clock) in the process, shared by every
    :class:`TokenAuth` built for them (see :func:`_signer_for`), so a key loaded again per
    request or per task mints no new token."""

    __slots__ = ("_key", "key_id", "team_id", "refresh_after", "min_refresh_interval",
                 "_clock", "header", "deadline", "issued_at", "generation",
                 "last_early_refresh", "lock", "rotations", "forced_refreshes")

    def __init__(self, key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str,
                 refresh_after: float, min_refresh_interval: float,
                 clock: Callable[[], float]) -> None:
        self._key = key
        self.key_id = key_id
        self.team_id = team_id
        self.refresh_after = refresh_after
        self.min_refresh_interval = min_refresh_interval
        self._clock = clock
        self.generation = 0
        self.rotations = 0
        self.forced_refreshes = 0
        self.last_early_refresh = float("-inf")
        self.lock = threading.Lock()
        self.header = b""
        self.deadline = float("-inf")
        self.issued_at = 0.0
        self.mint(clock())

    def mint(self, now: float) -> None:
        self.header = b"bearer " + es256_jwt(self._key, self.key_id, self.team_id, int(now))
        self.issued_at = now
        self.deadline = now + self.refresh_after
        self.generation += 1
        self.rotations += 1

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class _ES256(ec.ECDSA):
    """``ec.ECDSA(hashes.SHA256())`` but for its ``__init__``, which imports cryptography's
    OpenSSL backend (~8 ms of a start, issue 19) only to check that deterministic signing,
    not asked for here, is supported. A signature algorithm is its two properties."""

    def __init__(self) -> None:  # ec.ECDSA.__init__ deliberately not called
        pass

    @property
    def algorithm(self) -> hashes.HashAlgorithm:
        return _SHA256

    @property
    def deterministic_signing(self) -> bool:
        return False


_SHA256 = hashes.SHA256()
_es256: ec.ECDSA = _ES256()


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 of ``data``, DER-encoded (cryptography's ``sign``)."""
    global _es256
    try:
        return key.sign(data, _es256)
    except (AttributeError, TypeError):
        if type(_es256) is not _ES256:
            raise
        # a cryptography that wants more of a signature algorithm: its own, from now on
        _es256 = ec.ECDSA(_SHA256)
        return key.sign(data, _es256)


def es256_jwt(key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str, iat: int) -> bytes:
    """APNs' provider token (docs/apns.md, "Token-based authentication"): a JWS with header
    ``{"alg":"ES256","kid":...,"typ":"JWT"}`` and claims ``{"iss":...,"iat":...}``, signed
    with ECDSA P-256 / SHA-256 and the signature as raw ``r || s`` (RFC 7518, 3.4).

    The same bytes as ``jwt.encode(claims, key, "ES256", headers={"kid": ...})`` but for the
    signature's random nonce (tests/test_auth.py checks it against pyjwt); done here with
    cryptography because importing pyjwt costs ~40 ms of CPU at every start (issue 19)."""
    header = _b64url(json.dumps({"alg": "ES256", "kid": key_id, "typ": "JWT"},
                                separators=(",", ":")).encode())
    claims = _b64url(json.dumps({"iss": team_id, "iat": iat}, separators=(",", ":")).encode())
    signing_input = header + b"." + claims
    r, s = decode_dss_signature(_sign(key, signing_input))
    return signing_input + b"." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


# (public point x, y, key id, team, refresh_after, min_refresh_interval, clock) -> signer; the
# newest _MAX_SIGNERS are kept (a process holds a handful of keys), strongly, so a key loaded
# per request finds the token minted for the previous request
_MAX_SIGNERS = 256
_signers: OrderedDict[tuple[object, ...], _Signer] = OrderedDict()
_signers_lock = threading.Lock()


def _signer_for(key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str,
                refresh_after: float, min_refresh_interval: float,
                clock: Callable[[], float]) -> _Signer:
    point = key.public_key().public_numbers()  # the key's identity (not its DER: issue 19)
    ident = (point.x, point.y, key_id, team_id, refresh_after, min_refresh_interval, clock)
    with _signers_lock:
        signer = _signers.get(ident)
        if signer is not None:
            _signers.move_to_end(ident)
            return signer
    signer = _Signer(key, key_id, team_id, refresh_after, min_refresh_interval, clock)
    with _signers_lock:
        # another thread may have minted one meanwhile: keep the first, so one token wins
        signer = _signers.setdefault(ident, signer)
        _signers.move_to_end(ident)
        while len(_signers) > _MAX_SIGNERS:
            _signers.popitem(last=False)
    return signer


def _after_fork_in_child() -> None:
    # a lock held by another thread at fork() would stay locked for ever in the child
    global _signers_lock
    _signers_lock = threading.Lock()
    for signer in _signers.values():
        signer.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class TokenAuth(Auth):
    """One ES256 provider token per (team, key) in the process, shared by every connection.

    The token is minted when the first ``TokenAuth`` for a (key, key id, team) is built and
    re-minted lazily by :meth:`header` once it is ``refresh_after`` seconds old (default
    50 min: inside Apple's 20-60 min window). Building another ``TokenAuth`` for the same
    key, key id and team (per request, per task, per client) shares that token instead of
    minting one: APNs answers 429 ``TooManyProviderTokenUpdates`` to token churn. Pass
    ``shared=False`` for a token of its own (a test of rotation, say).

    Forced refresh policy (:meth:`refresh`, after APNs answered ``ExpiredProviderToken``):

    * single-flight: only the first caller that saw the current generation regenerates;
      everyone else gets ``False`` and simply re-reads :meth:`header`;
    * a token at least ``min_refresh_interval`` old, older than 1 h, or "from the future"
      (the clock stepped back) is always regenerated;
    * a *younger* token that APNs calls expired means the clocks disagree; re-minting
      cannot fix that and risks 429 ``TooManyProviderTokenUpdates``, so such early
      refreshes are allowed at most once per ``min_refresh_interval`` (one recovery
      attempt, not a churn loop) and otherwise declined (``False``).

    ``forced_refreshes`` counts regenerations done by :meth:`refresh`; ``rotations`` counts
    every token minted (both are the shared token's). Regeneration takes a lock, so
    threads cannot double-mint.
    """

    __slots__ = ("_signer", "key_id", "team_id", "refresh_after", "min_refresh_interval",
                 "_clock")

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey | bytes | str,
        key_id: str,
        team_id: str,
        *,
        refresh_after: float = 3000.0,
        min_refresh_interval: float = 1200.0,
        clock: Callable[[], float] = time.time,
        shared: bool = True,
    ) -> None:
        self.key_id: str = _check_id(key_id, "key_id")
        self.team_id: str = _check_id(team_id, "team_id")
        if not 0 <= min_refresh_interval <= MAX_TOKEN_AGE:
            raise ConfigError(
                f"min_refresh_interval must be within [0, {MAX_TOKEN_AGE:g}] s, got {min_refresh_interval!r}"
            )
        if not min_refresh_interval <= refresh_after <= MAX_TOKEN_AGE or refresh_after <= 0:
            raise ConfigError(
                f"refresh_after must be > 0 and within [min_refresh_interval={min_refresh_interval:g}, "
                f"{MAX_TOKEN_AGE:g}] s (APNs rejects tokens older than 1 h), got {refresh_after!r}"
            )
        if isinstance(key, str):
            key = key.encode("utf-8", "replace")
        if isinstance(key, bytes | bytearray | memoryview):
            private = _load_private_key(bytes(key), "key")
        else:
            private = _check_key(key, "key")
        self.refresh_after: float = float(refresh_after)
        self.min_refresh_interval: float = float(min_refresh_interval)
        self._clock = clock
        args = (private, self.key_id, self.team_id, self.refresh_after,
                self.min_refresh_interval, clock)
        self._signer = _signer_for(*args) if shared else _Signer(*args)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        key_id: str,
        team_id: str,
        *,
        refresh_after: float = 3000.0,
        min_refresh_interval: float = 1200.0,
        clock: Callable[[], float] = time.time,
        shared: bool = True,
    ) -> TokenAuth:
        """Load the .p8 key at ``path``. Warns (``fanout.auth`` logger) if group/others can read it."""
        name = os.fspath(path)
        data, mode = _read_file(name, "key file")
        if isinstance(key_id, str):
            _check_file_name(name, key_id)
        key = _load_private_key(data, f"key file {name!r}")
        del data
        if os.name == "posix" and mode & 0o077:
            log.warning(
                "key file %r is readable by group/others (mode %03o); run 'chmod 600 %s'",
                name,
                stat.S_IMODE(mode),
                name,
            )
        return cls(key, key_id, team_id, refresh_after=refresh_after,
                   min_refresh_interval=min_refresh_interval, clock=clock, shared=shared)

    def header(self) -> bytes:
        """The ``authorization`` header value, ``b"bearer <jwt>"``; cheap unless due for renewal."""
        signer = self._signer
        if self._clock() < signer.deadline:
            return signer.header
        with signer.lock:
            now = self._clock()
            if now >= signer.deadline:
                signer.mint(now)
            return signer.header

    @property
    def generation(self) -> int:
        """Increments on every regeneration; pass it back to :meth:`refresh`."""
        return self._signer.generation

    @property
    def rotations(self) -> int:
        """Tokens minted for this key, key id and team (by every sharer)."""
        return self._signer.rotations

    @property
    def forced_refreshes(self) -> int:
        """Tokens minted by :meth:`refresh` (by every sharer)."""
        return self._signer.forced_refreshes

    @property
    def signer_id(self) -> int:
        """The same number for every ``TokenAuth`` sharing one token (count rotations once)."""
        return id(self._signer)

    @property
    def issued_at(self) -> float:
        """Clock time at which the current token was minted."""
        return self._signer.issued_at

    def age(self) -> float:
        """Seconds since the current token was minted (negative if the clock stepped back)."""
        return self._clock() - self._signer.issued_at

    def apply(self, ctx: ssl.SSLContext) -> None:
        """Nothing: a provider token travels in the ``authorization`` header, not in TLS."""

    def refresh(self, seen_generation: int) -> bool:
        """Force a new token after ``ExpiredProviderToken``; True if this call regenerated.

        ``seen_generation`` is :attr:`generation` as read when the rejected request was sent;
        see the class docstring for the policy on young tokens.
        """
        signer = self._signer
        with signer.lock:
            if seen_generation != signer.generation:
                return False
            now = self._clock()
            age = now - signer.issued_at
            if not (age >= self.min_refresh_interval or age < 0):
                # Young token called expired: allow one early refresh per interval.
                if now - signer.last_early_refresh < self.min_refresh_interval:
                    return False
                signer.last_early_refresh = now
            signer.mint(now)
            signer.forced_refreshes += 1
            return True

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half, for a server (the mock) that verifies our tokens."""
        return self._signer.public_key()

    def __repr__(self) -> str:
        return f"TokenAuth(key_id={self.key_id!r}, team_id={self.team_id!r}, generation={self.generation})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[Any, ...]:  # never let a key travel through pickle by accident
        raise TypeError("TokenAuth holds a private key and cannot be pickled")


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise KeyFileError("private key is encrypted; pass password=")


class CertAuth(Auth):
    """Certificate (mTLS) auth: the client cert goes in the TLS handshake, no authorization header.

    ``cert_file`` is a PEM certificate (chain), optionally with the key appended; ``key_file``
    is the PEM key when separate. Files are loaded once into a throwaway context at
    construction so a bad path, format or password fails early.
    """

    def __init__(
        self,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str] | None = None,
        password: str | None = None,
    ) -> None:
        self.cert_file: str = os.fspath(cert_file)
        self.key_file: str | None = os.fspath(key_file) if key_file is not None else None
        self._password = password
        data, _ = _read_file(self.cert_file, "certificate file")
        if "CERTIFICATE" not in _pem_labels(data):
            hint = ""
            if not _pem_labels(data):
                hint = (
                    " (a .p12/.pfx export? convert it with "
                    "'openssl pkcs12 -in cert.p12 -out cert.pem -nodes')"
                )
            raise KeyFileError(
                f"certificate file {self.cert_file!r} contains no PEM certificate{hint}"
            )
        if self.key_file is not None:
            data, _ = _read_file(self.key_file, "key file")
        if not any(label.endswith("PRIVATE KEY") for label in _pem_labels(data)):
            where = (
                f"key file {self.key_file!r}"
                if self.key_file
                else f"certificate file {self.cert_file!r}"
            )
            hint = "" if self.key_file else " (pass key_file=)"
            raise KeyFileError(f"{where} contains no PEM private key{hint}")
        del data
        self.apply(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))

    def apply(self, ctx: ssl.SSLContext) -> None:
        """Install the client certificate and key into ``ctx``."""
        password: Callable[[], str] | str = (
            self._password if self._password is not None else _no_password
        )
        files = repr(self.cert_file) + (f" / {self.key_file!r}" if self.key_file else "")
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file, password=password)
        except KeyFileError as exc:
            raise KeyFileError(f"{files}: {exc}") from None
        except ssl.SSLError as exc:
            reason = exc.reason or (
                "wrong password, or malformed PEM"
                if self._password is not None
                else "malformed PEM certificate or key"
            )
            if reason == "BAD_DECRYPT":
                reason = "wrong password for the private key"
            elif reason == "KEY_VALUES_MISMATCH":
                reason = "the private key does not match the certificate"
            raise KeyFileError(f"cannot load certificate/key {files}: {reason}") from None
        except OSError as exc:
            raise KeyFileError(
                f"cannot read certificate/key {files}: {exc.strerror or type(exc).__name__}"
            ) from None

    def header(self) -> None:
        """No ``authorization`` header with certificate auth."""
        return None

    def __repr__(self) -> str:
        return f"CertAuth(cert_file={self.cert_file!r}, key_file={self.key_file!r})"
