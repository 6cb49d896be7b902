"""``fanout serve``'s channel management: ``/v1/channels`` (create, list) and
``/v1/channels/{id}`` (read, delete), through the engine's :class:`fanout.channels.Channels`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from ..errors import ConfigError, ValidationError
from ..payload import bundle_of
from .http import Exchange, HttpError, Limits
from .keys import ApiKey
from .pushes import require_topic


class ChannelCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    storage_policy: int = 0


class ChannelsApi:
    """The channel endpoints (APNs' answers passed on: ``apns_error`` with its status);
    ``?topic=`` picks the app (a team's, with [[team]] tables)."""

    def __init__(self, engine: Any, *, default_topic: str | None, teams: bool,
                 limits: Limits, durable: bool = False) -> None:
        self.engine = engine
        self.durable = durable
        self.default_topic = default_topic
        self.teams = teams
        self.limits = limits

    async def _channels(self, ex: Exchange, key: ApiKey | None) -> Any:
        """The channels of the app ``?topic=`` names (default: the server's topic), once
        the key may use that topic; with [[team]] tables, through the team serving it."""
        from ..channels import check_bundle_id

        if self.durable:
            raise HttpError(501, "not_implemented",
                            "channel management needs APNs credentials here: not with --to "
                            "(run fanout channels, or a fanout serve without --to)")
        topic = ex.query("topic") or self.default_topic
        require_topic(key, topic, self.default_topic)
        try:
            if topic is not None:
                check_bundle_id(bundle_of(topic))
            if self.teams:
                return await self.engine.channels_for(topic)
            return self.engine.channels_for(topic) if topic else self.engine.channels
        except (ConfigError, ValidationError) as exc:
            raise HttpError(400, "bad_request", str(exc)) from None

    async def _channel_call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        from ..channels import ChannelError

        try:
            with trio.fail_after(self.limits.push_timeout):
                return await fn()
        except ChannelError as exc:
            status = exc.status if exc.status in (400, 403, 404, 410, 429) else 502
            raise HttpError(status, "apns_error", str(exc)) from None
        except ValidationError as exc:  # a channel id no header can carry, say
            raise HttpError(400, "bad_request", str(exc)) from None
        except trio.TooSlowError:
            raise HttpError(504, "timeout", "APNs did not answer in time") from None

    async def create(self, ex: Exchange, key: ApiKey | None) -> None:
        channels = await self._channels(ex, key)
        raw = await ex.body()
        try:
            req = msgspec.json.decode(raw or b"{}", type=ChannelCreate)
        except msgspec.DecodeError as exc:
            raise HttpError(400, "bad_request", f"invalid channel: {exc}") from None
        if req.storage_policy not in (0, 1):
            raise HttpError(400, "bad_request", "storage_policy is 0 or 1")
        ch = await self._channel_call(lambda: channels.create(req.storage_policy))
        await ex.json(201, {"channel_id": ch.channel_id,
                            "storage_policy": ch.message_storage_policy})

    async def list(self, ex: Exchange, key: ApiKey | None) -> None:
        channels = await self._channels(ex, key)
        await ex.json(200, {"channels": await self._channel_call(channels.list)})

    async def read(self, ex: Exchange, key: ApiKey | None, channel_id: str) -> None:
        channels = await self._channels(ex, key)
        ch = await self._channel_call(lambda: channels.read(channel_id))
        await ex.json(200, {"channel_id": ch.channel_id,
                            "storage_policy": ch.message_storage_policy})

    async def delete(self, ex: Exchange, key: ApiKey | None, channel_id: str) -> None:
        channels = await self._channels(ex, key)
        await self._channel_call(lambda: channels.delete(channel_id))
        await ex.empty(204)
