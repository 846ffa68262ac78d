"""What the admin commands read from (and delete in) JetStream, on a short-lived connection.

Publishing stays in ``sink.py``; this module only looks: is the server reachable, is
JetStream on, what does the stream hold, which message came last. ``tail`` subscribes
through :func:`subscribe_ordered`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import NotFoundError

from cdc_bridge.config import NatsSettings
from cdc_bridge.errors import SetupError
from cdc_bridge.nats_connection import open_connection

__all__ = [
    "LastMessage",
    "connect",
    "delete_stream",
    "jetstream_enabled",
    "last_message",
    "stream_info",
    "subscribe_ordered",
]


@dataclass(frozen=True, slots=True)
class LastMessage:
    seq: int
    subject: str
    time: datetime | None
    headers: dict[str, str]
    data: bytes


async def connect(settings: NatsSettings) -> NatsClient:
    """Connect once (no reconnects); :class:`SinkError` with the reason on failure."""
    return await open_connection(settings, name="cdc-bridge-admin")


async def close(nc: NatsClient) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await nc.close()


async def jetstream_enabled(nc: NatsClient) -> str | None:
    """None if JetStream answers, else the reason it does not."""
    try:
        await nc.jetstream().account_info()
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


async def stream_info(nc: NatsClient, name: str) -> StreamInfo | None:
    try:
        return await nc.jetstream().stream_info(name)
    except NotFoundError:
        return None
    except Exception as exc:
        raise SetupError(
            f"cannot look up stream {name!r}: {exc or type(exc).__name__} "
            "(is JetStream enabled? start nats-server with -js)"
        ) from None


async def last_message(nc: NatsClient, info: StreamInfo) -> LastMessage | None:
    """The stream's newest message (by its last sequence), or None if it is empty."""
    state = info.state
    if not state.messages or not state.last_seq:
        return None
    try:
        raw = await nc.jetstream().get_msg(info.config.name or "", seq=state.last_seq)
    except NotFoundError:
        return None
    return LastMessage(
        seq=int(raw.seq or state.last_seq),
        subject=raw.subject or "",
        time=raw.time,
        headers={str(k): str(v) for k, v in (raw.headers or {}).items()},
        data=raw.data or b"",
    )


async def delete_stream(nc: NatsClient, name: str) -> bool:
    """Delete the stream; False if there was none."""
    try:
        await nc.jetstream().delete_stream(name)
    except NotFoundError:
        return False
    return True


async def subscribe_ordered(
    nc: NatsClient,
    stream: str,
    filters: list[str],
    cb: Callable[[Msg], Awaitable[None]],
    *,
    start_seq: int | None = None,
    from_start: bool = False,
) -> Any:
    """An ordered push consumer on ``stream`` for ``filters``: new messages by default,
    all of them with ``from_start``, or from stream sequence ``start_seq``."""
    config = ConsumerConfig(filter_subjects=filters)
    if start_seq is not None:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start_seq
    elif from_start:
        config.deliver_policy = DeliverPolicy.ALL
    else:
        config.deliver_policy = DeliverPolicy.NEW
    return await nc.jetstream().subscribe(
        filters[0], stream=stream, config=config, ordered_consumer=True, cb=cb
    )
