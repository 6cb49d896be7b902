"""Tests for fanout.auth: the shared ES256 provider token and certificate auth."""

from __future__ import annotations

import datetime as dt
import logging
import os
import pickle
import ssl
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fanout.auth import CertAuth, TokenAuth
from fanout.errors import ConfigError, KeyFileError

KEY_ID = "ABC123DEFG"
TEAM_ID = "DEF123GHIJ"
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pkcs8(key, password: bytes | None = None) -> bytes:
    enc = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def self_signed(key) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "com.example.app")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def p256():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def auth(p256, clock) -> TokenAuth:
    return TokenAuth(p256, KEY_ID, TEAM_ID, clock=clock)


def decode(header: bytes, key) -> tuple[dict, dict]:
    assert header.startswith(b"bearer ")
    token = header[len(b"bearer ") :].decode("ascii")
    claims = jwt.decode(
        token,
        key.public_key(),
        algorithms=["ES256"],
        options={"verify_iat": False},  # iat is from the fake clock
    )
    return jwt.get_unverified_header(token), claims


# --- token contents and caching -------------------------------------------------------


def test_jwt_verifies_with_public_key(auth, p256):
    hdr, claims = decode(auth.header(), p256)
    assert hdr["alg"] == "ES256" and hdr["kid"] == KEY_ID
    assert claims == {"iss": TEAM_ID, "iat": int(T0)}


def test_jwt_rejects_other_key(auth):
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(jwt.InvalidSignatureError):
        decode(auth.header(), other)


def test_accepts_pem_bytes_and_str(p256, clock):
    pem = pkcs8(p256)
    for key in (pem, pem.decode("ascii")):
        a = TokenAuth(key, KEY_ID, TEAM_ID, clock=clock)
        assert decode(a.header(), p256)[1]["iss"] == TEAM_ID


def test_header_cached(auth, clock):
    first = auth.header()
    clock.now += 2999
    assert auth.header() is first
    assert auth.generation == 1 and auth.rotations == 1
    assert auth.issued_at == T0
    assert auth.age() == 2999


def test_regenerated_after_refresh_after(auth, clock, p256):
    first = auth.header()
    clock.now += 3000
    second = auth.header()
    assert second != first
    assert auth.generation == 2 and auth.rotations == 2
    assert decode(second, p256)[1]["iat"] == int(T0 + 3000)
    assert auth.issued_at == T0 + 3000 and auth.age() == 0
    assert auth.header() is second


def test_custom_refresh_after(p256, clock):
    a = TokenAuth(p256, KEY_ID, TEAM_ID, clock=clock, refresh_after=1800)
    first = a.header()
    clock.now += 1799.5
    assert a.header() is first
    clock.now += 0.5
    assert a.header() != first


# --- forced refresh ------------------------------------------------------------------


def test_refresh_single_flight(auth, clock):
    seen = auth.generation
    clock.now += 1500  # past min_refresh_interval
    results = [auth.refresh(seen) for _ in range(100)]
    assert results.count(True) == 1 and results[0] is True
    assert auth.generation == seen + 1
    assert auth.rotations == 2 and auth.forced_refreshes == 1


def test_refresh_stale_generation_is_noop(auth, clock):
    old = auth.generation
    clock.now += 1500
    assert auth.refresh(old)
    clock.now += 1500
    assert not auth.refresh(old)  # someone already replaced that token
    assert auth.generation == old + 1


def test_refresh_young_token_once_per_interval(auth, clock):
    # APNs called a 60 s old token expired: clocks disagree. One recovery attempt is allowed...
    clock.now += 60
    assert auth.refresh(auth.generation)
    assert auth.forced_refreshes == 1
    # ...but not a churn loop that would earn 429 TooManyProviderTokenUpdates.
    clock.now += 60
    assert not auth.refresh(auth.generation)
    assert auth.generation == 2
    clock.now += 1200
    assert auth.refresh(auth.generation)
    assert auth.generation == 3


def test_refresh_after_clock_step_back(auth, clock):
    clock.now -= 500  # token looks like it is from the future
    assert auth.refresh(auth.generation)
    assert auth.issued_at == T0 - 500


def test_refresh_always_allowed_for_old_token(auth, clock):
    clock.now += 1200
    assert auth.refresh(auth.generation)
    clock.now += 1200
    assert auth.refresh(auth.generation)
    assert auth.forced_refreshes == 2


# --- configuration validation --------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "ABC-123", "AB C", "ÄBC123", None, 123])
def test_bad_ids(p256, bad):
    with pytest.raises(ConfigError, match="key_id"):
        TokenAuth(p256, bad, TEAM_ID)
    with pytest.raises(ConfigError, match="team_id"):
        TokenAuth(p256, KEY_ID, bad)


@pytest.mark.parametrize(
    ("refresh_after", "min_interval"),
    [(3601, 1200), (1000, 1200), (0, 0), (-5, 0), (1000, -1)],
)
def test_bad_refresh_window(p256, refresh_after, min_interval):
    with pytest.raises(ConfigError):
        TokenAuth(
            p256, KEY_ID, TEAM_ID, refresh_after=refresh_after, min_refresh_interval=min_interval
        )


def test_refresh_window_edges_ok(p256):
    TokenAuth(p256, KEY_ID, TEAM_ID, refresh_after=3600)
    TokenAuth(p256, KEY_ID, TEAM_ID, refresh_after=1200, min_refresh_interval=1200)


@pytest.mark.parametrize(
    ("key", "match"),
    [
        (ec.generate_private_key(ec.SECP384R1()), "secp384r1"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
    ],
)
def test_wrong_key_object(key, match):
    with pytest.raises(KeyFileError, match=match):
        TokenAuth(key, KEY_ID, TEAM_ID)


def test_path_given_as_key_text(tmp_path):
    with pytest.raises(KeyFileError, match="not PEM"):
        TokenAuth(str(tmp_path / "AuthKey.p8"), KEY_ID, TEAM_ID)


# --- from_file failures ----------------------------------------------------------------

SECRET_MARKER = b"TOPSECRETMARKER"


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    p.chmod(0o600)
    return p


def key_file_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    p384 = ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert_key = ec.generate_private_key(ec.SECP256R1())
    cert_pem = self_signed(cert_key).public_bytes(serialization.Encoding.PEM)
    traditional_enc = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"pw"),
    )
    pub = cert_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    broken = b"-----BEGIN PRIVATE KEY-----\n" + SECRET_MARKER + b"\n-----END PRIVATE KEY-----\n"
    return {
        "missing": (tmp_path / "nope.p8", "does not exist"),
        "directory": (tmp_path, "directory"),
        "garbage": (write(tmp_path, "garbage.p8", SECRET_MARKER + os.urandom(64)), "not PEM"),
        "empty": (write(tmp_path, "empty.p8", b""), "not PEM"),
        "p384": (write(tmp_path, "p384.p8", pkcs8(p384)), "secp384r1"),
        "rsa": (write(tmp_path, "rsa.p8", pkcs8(rsa_key)), "RSA"),
        "encrypted": (write(tmp_path, "enc.p8", pkcs8(cert_key, b"pw")), "encrypted"),
        "encrypted-trad": (write(tmp_path, "enc2.pem", traditional_enc), "encrypted"),
        "certificate": (write(tmp_path, "cert.pem", cert_pem), "certificate"),
        "public": (write(tmp_path, "pub.pem", pub), "public key"),
        "broken-pem": (write(tmp_path, "broken.p8", broken), "could not be parsed"),
    }


CASES = [
    "missing",
    "directory",
    "garbage",
    "empty",
    "p384",
    "rsa",
    "encrypted",
    "encrypted-trad",
    "certificate",
    "public",
    "broken-pem",
]


@pytest.mark.parametrize("case", CASES)
def test_from_file_errors(tmp_path, case):
    path, match = key_file_cases(tmp_path)[case]
    with pytest.raises(KeyFileError, match=match) as info:
        TokenAuth.from_file(path, KEY_ID, TEAM_ID)
    msg = str(info.value)
    assert str(path) in msg
    assert SECRET_MARKER.decode() not in msg
    assert "MII" not in msg  # no base64 DER of a key leaked into the message
    assert info.value.__cause__ is None


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_from_file_unreadable(tmp_path, p256):
    p = write(tmp_path, "AuthKey.p8", pkcs8(p256))
    p.chmod(0o000)
    try:
        with pytest.raises(KeyFileError, match="permission denied") as info:
            TokenAuth.from_file(p, KEY_ID, TEAM_ID)
        assert str(p) in str(info.value)
    finally:
        p.chmod(0o600)


def test_from_file_ok_no_warning(tmp_path, p256, caplog):
    p = write(tmp_path, "AuthKey_ABC123DEFG.p8", pkcs8(p256))
    with caplog.at_level(logging.WARNING, logger="fanout.auth"):
        a = TokenAuth.from_file(p, KEY_ID, TEAM_ID, refresh_after=1800)
    assert caplog.records == []
    assert a.refresh_after == 1800
    assert decode(a.header(), p256)[0]["kid"] == KEY_ID


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_from_file_group_readable_warns(tmp_path, p256, caplog, mode):
    p = write(tmp_path, "AuthKey.p8", pkcs8(p256))
    p.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="fanout.auth"):
        a = TokenAuth.from_file(str(p), KEY_ID, TEAM_ID)
    [rec] = caplog.records
    assert rec.name == "fanout.auth" and rec.levelno == logging.WARNING
    assert str(p) in rec.getMessage() and "chmod 600" in rec.getMessage()
    assert a.header().decode()[7:] not in caplog.text


# --- secrecy -------------------------------------------------------------------------


def test_repr_hides_secrets(auth, p256):
    header = auth.header().decode()
    jwt_text = header.split()[1]
    pem = pkcs8(p256).decode()
    for text in (repr(auth), str(auth), f"{auth}"):
        assert KEY_ID in text and TEAM_ID in text
        assert jwt_text not in text and jwt_text[:20] not in text
        assert "PRIVATE" not in text and pem.splitlines()[1][:20] not in text
        assert "Key" not in text.replace("key_id", "")


def test_not_picklable(auth):
    with pytest.raises(TypeError):
        pickle.dumps(auth)


# --- certificate auth ----------------------------------------------------------------


@pytest.fixture
def cert_files(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = write(tmp_path, "cert.pem", self_signed(key).public_bytes(serialization.Encoding.PEM))
    keyf = write(tmp_path, "key.pem", pkcs8(key))
    enc = write(tmp_path, "key-enc.pem", pkcs8(key, b"s3cret"))
    combined = write(tmp_path, "combined.pem", cert.read_bytes() + keyf.read_bytes())
    other = write(tmp_path, "other.pem", pkcs8(ec.generate_private_key(ec.SECP256R1())))
    return {"cert": cert, "key": keyf, "enc": enc, "combined": combined, "other": other}


def test_cert_auth_ok(cert_files):
    a = CertAuth(cert_files["cert"], cert_files["key"])
    assert a.header() is None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    a.apply(ctx)
    CertAuth(cert_files["combined"]).apply(ctx)
    CertAuth(str(cert_files["cert"]), str(cert_files["enc"]), password="s3cret")
    assert "s3cret" not in repr(CertAuth(cert_files["cert"], cert_files["enc"], "s3cret"))


@pytest.mark.parametrize(
    ("cert", "key", "password", "match"),
    [
        ("missing", "key", None, "does not exist"),
        ("cert", "missing", None, "does not exist"),
        ("dir", "key", None, "directory"),
        ("key", None, None, "no PEM certificate"),
        ("garbage", "key", None, "p12"),
        ("cert", None, None, "no PEM private key"),
        ("cert", "cert", None, "no PEM private key"),
        ("cert", "other", None, "does not match"),
        ("cert", "enc", None, "encrypted"),
        ("cert", "enc", "wrong", "wrong password"),
    ],
)
def test_cert_auth_errors(tmp_path, cert_files, cert, key, password, match):
    files = dict(cert_files)
    files["missing"] = tmp_path / "missing.pem"
    files["dir"] = tmp_path
    files["garbage"] = write(tmp_path, "cert.p12", b"\x30\x82" + os.urandom(100))
    with pytest.raises(KeyFileError, match=match):
        CertAuth(files[cert], files[key] if key else None, password=password)


@pytest.mark.parametrize(("key_id", "team_id", "needle"), [
    ("ABC", TEAM_ID, "key_id 'ABC' has 3 characters"),
    ("ABC123DEFGH", TEAM_ID, "has 11 characters"),
    (KEY_ID, "T", "team_id 'T' has 1 characters"),
])
def test_an_id_that_is_not_10_characters_is_caught_locally(p256, key_id, team_id, needle):
    """Issue 18: it went out, and every push came back 403 InvalidProviderToken."""
    with pytest.raises(ConfigError, match=needle):
        TokenAuth(p256, key_id, team_id)


def test_a_key_id_other_than_the_files_name_is_caught(tmp_path):
    from fanout.testing.devcerts import make_signing_key

    key = make_signing_key(tmp_path, key_id="ABC123DEFG")  # AuthKey_ABC123DEFG.p8
    with pytest.raises(ConfigError, match="differs from the key file's name"):
        TokenAuth.from_file(key.path, "ZZZ999YYYY", TEAM_ID)
    assert TokenAuth.from_file(key.path, "ABC123DEFG", TEAM_ID, shared=False).key_id == \
        "ABC123DEFG"
    other = tmp_path / "apns-key.p8"  # a name of one's own choosing is not checked
    other.write_bytes(key.path.read_bytes())
    assert TokenAuth.from_file(other, "ZZZ999YYYY", TEAM_ID, shared=False)


def test_es256_jwt_is_pyjwts_token_but_for_the_nonce(tmp_path) -> None:
    """The provider token is signed with cryptography directly (pyjwt's import cost ~40 ms at
    every start): its header and claims are pyjwt's byte for byte, its signature verifies
    with pyjwt, and it is the raw r || s form APNs wants, not DER."""
    import base64

    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization

    from fanout.auth import es256_jwt
    from fanout.testing.devcerts import make_signing_key

    key = make_signing_key(tmp_path, key_id="KEY1234567", team_id="TEAM765432")
    private = serialization.load_pem_private_key(key.path.read_bytes(), password=None)
    for iat in (0, 1_700_000_000, 2**31 + 5):
        ours = es256_jwt(private, key.key_id, key.team_id, iat).decode()
        theirs = pyjwt.encode({"iss": key.team_id, "iat": iat}, private, algorithm="ES256",
                              headers={"kid": key.key_id})
        assert ours.split(".")[:2] == theirs.split(".")[:2]
        signature = base64.urlsafe_b64decode(ours.split(".")[2] + "==")
        assert len(signature) == 64
        claims = pyjwt.decode(ours, key.public_key, algorithms=["ES256"],
                              options={"verify_iat": False})
        assert claims == {"iss": key.team_id, "iat": iat}
        assert pyjwt.get_unverified_header(ours) == {"alg": "ES256", "kid": key.key_id,
                                                     "typ": "JWT"}
