"""The NATS KV buckets the bridge keeps its records in: snapshot progress, backfill
requests, verify results. Each is opened on demand and created on its first write, so a
bridge that never uses one never needs it (nor the permission to create it)."""

from __future__ import annotations

from typing import Any

from nats.js.errors import BucketNotFoundError, NotFoundError

__all__ = ["open_bucket"]


async def open_bucket(js: Any, name: str, *, create: bool, history: int = 1) -> Any:
    """The KV bucket ``name`` of JetStream context ``js``; created (keeping ``history``
    revisions per key) if missing and ``create``, else None when missing."""
    try:
        return await js.key_value(name)
    except (BucketNotFoundError, NotFoundError):
        if not create:
            return None
        return await js.create_key_value(bucket=name, history=history)
