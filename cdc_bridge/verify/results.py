"""The last verify result, kept in NATS KV for ``cdc-bridge status``.

Separate because two commands share it: ``cdc-bridge verify`` writes the summary of each
run, ``cdc-bridge status`` reads the last one back (:mod:`cdc_bridge.admin.status`),
and status should not have to import the verify machinery to do that. One bucket,
``cdc-bridge-verify``; one key per (stream, slot).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from nats.aio.client import Client as NatsClient
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from cdc_bridge.kv import open_bucket

__all__ = ["RESULT_BUCKET", "load_last_result", "result_key", "store_result"]

#: The NATS KV bucket that keeps each (stream, slot)'s last verify summary.
RESULT_BUCKET = "cdc-bridge-verify"

_KV_KEY_UNSAFE = re.compile(r"[^-/_=.a-zA-Z0-9]")


def result_key(stream: str, slot: str) -> str:
    return _KV_KEY_UNSAFE.sub("_", f"{stream}.{slot}")


async def store_result(nc: NatsClient, stream: str, slot: str, summary: dict[str, Any]) -> None:
    kv = await open_bucket(nc.jetstream(), RESULT_BUCKET, create=True, history=10)
    await kv.put(result_key(stream, slot), orjson.dumps(summary))


async def load_last_result(nc: NatsClient, stream: str, slot: str) -> dict[str, Any] | None:
    """The summary of the last verify of (stream, slot), or None if there was none."""
    try:
        kv = await nc.jetstream().key_value(RESULT_BUCKET)
        entry = await kv.get(result_key(stream, slot))
    except (BucketNotFoundError, NotFoundError, KeyNotFoundError):
        return None
    if not entry.value:
        return None
    value = orjson.loads(entry.value)
    return value if isinstance(value, dict) else None
