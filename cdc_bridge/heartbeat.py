"""Heartbeat: a logical decoding message every few seconds, so the slot keeps moving.

When the database writes only to tables outside the publication (or, on RDS, only its
own internal writes), nothing the slot decodes ends a transaction of ours, and some
servers send no keepalive that lets the bridge confirm the WAL in between: the slot
then holds WAL back. A non-transactional ``pg_logical_emit_message`` goes through the
slot as a message at a fresh LSN; the pipeline drops it (or publishes it, with
``heartbeat.publish``) and the checkpointer confirms past it.

The beat runs on its own ordinary connection (psycopg's async API, so the event loop
never blocks), reconnecting after any failure. Failures are warnings, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from datetime import UTC, datetime

import orjson
import psycopg

from cdc_bridge.errors import first_line
from cdc_bridge.metrics import BridgeMetrics
from cdc_bridge.pgsecurity import ConnInfo, resolve_conninfo

__all__ = ["heartbeat_content", "run_heartbeat"]

log = logging.getLogger(__name__)

EMIT = "SELECT pg_logical_emit_message(false, %s, %s)"


def heartbeat_content(slot: str, now: datetime | None = None) -> str:
    """The message body: ``{"slot": ..., "ts": "2026-11-27T09:32:10.437029Z"}``."""
    now = now or datetime.now(UTC)
    ts = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return orjson.dumps({"slot": slot, "ts": ts}).decode()


async def run_heartbeat(
    conninfo: ConnInfo,
    *,
    interval: float,
    prefix: str,
    slot: str,
    metrics: BridgeMetrics,
    connect_timeout: float = 10.0,
) -> None:
    """Emit a heartbeat every ``interval`` seconds until cancelled."""
    conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
    warned = False
    try:
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(max(interval, connect_timeout) + 5):
                    if conn is None or conn.closed:
                        # In a thread: making an IAM token may refresh AWS credentials.
                        info = await asyncio.to_thread(resolve_conninfo, conninfo)
                        conn = await psycopg.AsyncConnection.connect(
                            info,
                            autocommit=True,
                            connect_timeout=max(1, math.ceil(connect_timeout)),
                            application_name="cdc-bridge-heartbeat",
                        )
                    await conn.execute(EMIT, (prefix, heartbeat_content(slot)))
            except Exception as exc:
                metrics.heartbeat_failures += 1
                log.warning("heartbeat failed (will retry): %s", first_line(exc))
                warned = True
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                    conn = None
                continue
            metrics.heartbeats += 1
            if warned:
                log.info("heartbeat works again")
                warned = False
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
