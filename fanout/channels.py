"""Broadcast channel management for Live Activities (docs/apns.md, Broadcast channels; iOS/iPadOS 18+).

Channel management is low volume (a handful of requests per event), so it uses one
``httpx.AsyncClient`` over HTTP/2, kept open for the ``async with`` block, rather than the
engine's hand-written framer::

    async with Channels(auth=auth, bundle_id="com.example.app", environment="sandbox") as ch:
        channel = await ch.create(storage_policy=0)
        ...
        await ch.delete(channel.channel_id)

Every request carries ``authorization: bearer <JWT>`` (token auth; nothing with
:class:`~fanout.auth.CertAuth`, whose certificate goes in the TLS handshake) and a fresh
``apns-request-id``. An APNs error answer raises the :class:`ChannelError` subclass for its
reason; transport failures raise :class:`~fanout.errors.TransportError`. Requests are not
retried. No JWT or key is ever logged or put in an exception message.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import ssl
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from ._engine.proxy import Proxy, resolve
from .auth import CertAuth, TokenAuth
from .errors import ConfigError, FanoutError, TransportError, ValidationError
from .outcome import REASONS, parse_error_body
from .payload import TOPIC_SUFFIXES

__all__ = [
    "MANAGE_HOSTS",
    "CannotCreateChannelConfig",
    "Channel",
    "ChannelAuthError",
    "ChannelError",
    "ChannelNotRegistered",
    "Channels",
    "BadChannelId",
    "FeatureNotEnabled",
    "STORAGE_POLICIES",
    "channel_error",
    "check_bundle_id",
]

log: logging.Logger = logging.getLogger(__name__)

#: Channel-management host and port per environment (docs/apns.md, Hosts).
MANAGE_HOSTS: dict[str, tuple[str, int]] = {
    "production": ("api-manage-broadcast.push.apple.com", 2196),
    "sandbox": ("api-manage-broadcast.sandbox.push.apple.com", 2195),
}
#: 0 = No Message Stored, 1 = Most Recent Message Stored (docs/apns.md, Broadcast channels).
STORAGE_POLICIES = (0, 1)
_PUSH_TYPE = "LiveActivity"


class ChannelError(FanoutError):
    """APNs refused a channel-management request. ``reason`` is Apple's reason string."""

    def __init__(self, status: int, reason: str | None, request_id: str | None) -> None:
        self.status = status
        self.reason = reason
        self.request_id = request_id
        info = REASONS.get(reason) if reason else None
        text = f"{reason or 'no reason given'} (HTTP {status})"
        if info is not None:
            text += f": {info.description}"
        if request_id:
            text += f" [apns-request-id {request_id}]"
        super().__init__(text)


class ChannelNotRegistered(ChannelError):
    """The channel does not exist (never did, was deleted, or is of the other environment)."""


class CannotCreateChannelConfig(ChannelError):
    """The app already has the maximum number of channels (10,000 per environment)."""


class FeatureNotEnabled(ChannelError):
    """The App ID's Broadcast Capability is off (enable it on developer.apple.com)."""


class BadChannelId(ChannelError):
    """The channel id is not valid base64 or is too long."""


class ChannelAuthError(ChannelError):
    """403: the credentials are refused (``InvalidProviderToken``, ``TopicMismatch`` ...)."""


_ERROR_BY_REASON: dict[str, type[ChannelError]] = {
    "ChannelNotRegistered": ChannelNotRegistered,
    "CannotCreateChannelConfig": CannotCreateChannelConfig,
    "FeatureNotEnabled": FeatureNotEnabled,
    "BadChannelId": BadChannelId,
}


def channel_error(status: int, reason: str | None, request_id: str | None) -> ChannelError:
    """The typed error for one APNs answer (a known reason wins; then any 403 is auth)."""
    cls = _ERROR_BY_REASON.get(reason or "")
    if cls is None:
        cls = ChannelAuthError if status == 403 else ChannelError
    return cls(status, reason, request_id)


@dataclass(frozen=True)
class Channel:
    """A broadcast channel as APNs describes it: its id and message storage policy."""

    channel_id: str
    message_storage_policy: int
    push_type: str = _PUSH_TYPE


class _ChannelInfo(msgspec.Struct):
    message_storage_policy: int = msgspec.field(name="message-storage-policy")
    push_type: str = msgspec.field(name="push-type", default=_PUSH_TYPE)


class _ChannelList(msgspec.Struct):
    channels: list[str] = []


_info_decoder = msgspec.json.Decoder(_ChannelInfo)
_list_decoder = msgspec.json.Decoder(_ChannelList)


def check_bundle_id(bundle_id: object) -> str:
    """``bundle_id`` if it is a plain bundle id; a ``.push-type.*`` (or other push-type) suffix
    is refused: broadcast and channel paths take the bare bundle id (APNs: TopicDisallowed)."""
    if not isinstance(bundle_id, str) or not bundle_id or not bundle_id.isascii():
        raise ValidationError("bundle_id", f"must be a non-empty ASCII string, got {bundle_id!r}")
    if not all(c.isalnum() or c in ".-_" for c in bundle_id) or bundle_id[0] in ".-_":
        raise ValidationError("bundle_id", f"{bundle_id!r} is not a bundle id")
    if ".push-type." in bundle_id or bundle_id.endswith(TOPIC_SUFFIXES):
        raise ValidationError(
            "bundle_id",
            f"{bundle_id!r} carries a push-type suffix; broadcast channels take the bare bundle id",
        )
    return bundle_id


def check_channel_id(channel_id: object) -> str:
    """``channel_id`` if an ``apns-channel-id`` header can carry it (non-empty printable
    ASCII, no blanks at its ends); base64 validity is APNs' call (BadChannelId)."""
    if (
        not isinstance(channel_id, str)
        or not channel_id
        or not channel_id.isascii()
        or not channel_id.isprintable()
        or channel_id != channel_id.strip()
    ):
        raise ValidationError(
            "channel_id", f"must be a non-empty printable ASCII string, got {channel_id!r}"
        )
    return channel_id


class Channels:
    """Client of the APNs channel-management API for one bundle id.

    ``host``/``port`` override the environment's management endpoint (a mock); ``ca_file``
    is the CA bundle to verify the server with; ``ssl_context`` replaces the whole client
    context (it must then already carry the client certificate for :class:`CertAuth`).
    """

    def __init__(
        self,
        *,
        auth: TokenAuth | CertAuth,
        bundle_id: str,
        environment: str = "production",
        host: str | None = None,
        port: int | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        proxy: str | None = None,
    ) -> None:
        if environment not in MANAGE_HOSTS:
            raise ConfigError(f"environment must be production or sandbox, got {environment!r}")
        if not isinstance(auth, TokenAuth | CertAuth):
            raise ConfigError(f"auth must be TokenAuth or CertAuth, got {type(auth).__name__}")
        self.auth = auth
        self.bundle_id: str = check_bundle_id(bundle_id)
        self.environment = environment
        default_host, default_port = MANAGE_HOSTS[environment]
        self.host: str = host or default_host
        self.port: int = default_port if port is None else int(port)
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be within 1..65535, got {self.port}")
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0, got {timeout!r}")
        self.timeout: float = float(timeout)
        self._ca_file = os.fspath(ca_file) if ca_file is not None else None
        self._ssl_context = ssl_context
        self._client: httpx.AsyncClient | None = None
        # the same rules as the push connections: this argument, else HTTPS_PROXY /
        # ALL_PROXY minus NO_PROXY ("none": direct)
        self.proxy: Proxy | None = resolve(proxy, self.host)
        host_part = f"[{self.host}]" if ":" in self.host else self.host
        self.base_url: str = f"https://{host_part}:{self.port}"
        self._channels_path = f"/1/apps/{self.bundle_id}/channels"
        self._all_path = f"/1/apps/{self.bundle_id}/all-channels"

    def _make_ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is not None:
            return self._ssl_context
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self._ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA file {self._ca_file!r}: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["h2"])
        if isinstance(self.auth, CertAuth):
            self.auth.apply(ctx)
        return ctx

    def _httpx_proxy(self) -> httpx.Proxy | None:
        p = self.proxy
        if p is None:
            return None
        auth = (p.username, p.password or "") if p.username is not None else None
        if p.scheme != "http":
            if importlib.util.find_spec("socksio") is None:  # httpx's SOCKS support
                raise ConfigError("channel management through a SOCKS proxy needs socksio "
                                  "(pip install socksio); push connections need nothing")
        return httpx.Proxy(f"{p.scheme}://{p.host}:{p.port}", auth=auth)

    async def __aenter__(self) -> Channels:
        if self._client is None:
            self._client = httpx.AsyncClient(
                http1=False,
                http2=True,
                verify=self._make_ssl_context(),
                base_url=self.base_url,
                timeout=self.timeout,
                follow_redirects=False,
                trust_env=False,  # the proxy, if any, was resolved above
                proxy=self._httpx_proxy(),
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection (``async with`` does it for you)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ operations

    async def create(self, storage_policy: int = 0) -> Channel:
        """Create a channel (201); ``storage_policy`` 0 = No Message Stored, 1 = Most Recent."""
        if type(storage_policy) is not int or storage_policy not in STORAGE_POLICIES:
            raise ValidationError(
                "storage_policy",
                f"must be 0 (no message stored) or 1 (most recent), got {storage_policy!r}",
            )
        body = msgspec.json.encode(
            {"message-storage-policy": storage_policy, "push-type": _PUSH_TYPE}
        )
        response = await self._request("POST", self._channels_path, content=body)
        channel_id = response.headers.get("apns-channel-id")
        if not channel_id:
            raise ChannelError(response.status_code, None, response.headers.get("apns-request-id"))
        log.info("created broadcast channel %s (policy %d)", channel_id, storage_policy)
        return Channel(channel_id, storage_policy)

    async def read(self, channel_id: str) -> Channel:
        """The channel's settings (200); unknown -> :class:`ChannelNotRegistered`."""
        channel_id = check_channel_id(channel_id)
        response = await self._request("GET", self._channels_path, channel_id=channel_id)
        try:
            info = _info_decoder.decode(response.content)
        except msgspec.MsgspecError:
            raise self._bad_body(response, "channel") from None
        return Channel(channel_id, info.message_storage_policy, info.push_type)

    async def list(self) -> list[str]:
        """Ids of every channel of the bundle id in this environment."""
        response = await self._request("GET", self._all_path)
        try:
            return _list_decoder.decode(response.content).channels
        except msgspec.MsgspecError:
            raise self._bad_body(response, "channel list") from None

    async def delete(self, channel_id: str) -> None:
        """Delete a channel (204; irreversible); unknown -> :class:`ChannelNotRegistered`."""
        channel_id = check_channel_id(channel_id)
        await self._request("DELETE", self._channels_path, channel_id=channel_id)
        log.info("deleted broadcast channel %s", channel_id)

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _bad_body(response: httpx.Response, what: str) -> ChannelError:
        err = ChannelError(response.status_code, None, response.headers.get("apns-request-id"))
        err.args = (f"unparseable {what} body in a {response.status_code} answer",)
        return err

    async def _request(
        self, method: str, path: str, *, channel_id: str | None = None, content: bytes | None = None
    ) -> httpx.Response:
        client = self._client
        if client is None:
            raise FanoutError("Channels is not open: use 'async with Channels(...) as channels'")
        request_id = str(uuid.uuid4())
        headers: dict[str, Any] = {"apns-request-id": request_id}
        auth_header = self.auth.header()
        if auth_header is not None:
            headers["authorization"] = auth_header
        if channel_id is not None:
            headers["apns-channel-id"] = channel_id
        if content is not None:
            headers["content-type"] = "application/json"
        try:
            response = await client.request(method, path, headers=headers, content=content)
        except httpx.TransportError as exc:
            # str(exc) never carries request headers (no JWT in the message)
            raise TransportError(
                f"channel management {method} {self.host}:{self.port}: {type(exc).__name__}: {exc}"
            ) from None
        if response.is_success:
            return response
        reason, _ = parse_error_body(response.content)
        err = channel_error(
            response.status_code, reason, response.headers.get("apns-request-id") or request_id
        )
        log.warning("channel management %s %s: %s", method, path, err)
        raise err
