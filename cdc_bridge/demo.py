"""``cdc-bridge demo``: the whole path on throwaway servers, watched live.

A temporary PostgreSQL and nats-server (the ``embedded`` extra) on free loopback ports,
a ``conversations`` table, the bridge routing it to ``messages.<conversation_uuid>`` in
stream ``conversational-memory``, a writer producing a realistic trickle of chat traffic,
and a JetStream consumer printing what lands in the stream, with the commit-to-ack
latency of each message. Everything is removed when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import click
import nats
import orjson
import psycopg

from cdc_bridge.config import Settings
from cdc_bridge.local_servers import LocalNats, LocalPostgres, start_nats, start_postgres
from cdc_bridge.pipeline import BridgeStats, run_bridge

__all__ = ["CONVERSATIONS_DDL", "run_demo"]

STREAM = "conversational-memory"
SUBJECT = "messages.{conversation_uuid}"

CONVERSATIONS_DDL = """
CREATE TABLE conversations (
    id bigserial PRIMARY KEY,
    conversation_uuid uuid NOT NULL,
    role text NOT NULL,
    content text NOT NULL,
    metadata jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Deletes must carry conversation_uuid to be routed to messages.<conversation_uuid>.
ALTER TABLE conversations REPLICA IDENTITY FULL;
"""

_LINES = [
    ("user", "Can you summarise yesterday's meeting?"),
    ("assistant", "Sure: the team agreed to ship the CDC bridge on Friday."),
    ("user", "Who owns the Helm chart?"),
    ("assistant", "Dana does; the review is on Thursday."),
    ("user", "Remind me what JetStream dedup window we chose."),
    ("assistant", "Two minutes, keyed on Nats-Msg-Id."),
    ("user", "Thanks! 👍"),
]


def demo_settings(postgres: LocalPostgres, server: LocalNats) -> Settings:
    return Settings(
        postgres={
            "dsn": postgres.dsn(),
            "slot": "cdc_bridge_demo",
            "publication": "cdc_bridge_demo",
        },
        nats={"url": server.url, "stream": STREAM, "max_age": 3600},
        tables={"public.conversations": {"subject": SUBJECT}},
        metrics={"host": "127.0.0.1", "port": 0},  # a free port, printed at start
        shutdown_timeout=10,
    )


async def run_demo(
    *, stop: asyncio.Event, verbose: bool, rate: float, duration: float | None, burst: int
) -> None:
    say = click.echo
    say("starting PostgreSQL and nats-server on free loopback ports ...")
    postgres = await asyncio.to_thread(start_postgres)
    server: LocalNats | None = None
    try:
        server = await asyncio.to_thread(start_nats)
        say(f"  PostgreSQL {postgres.dsn()}\n  NATS       {server.url}")
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            conn.execute(CONVERSATIONS_DDL)
        settings = demo_settings(postgres, server)
        stats = BridgeStats()
        bridge_stop = asyncio.Event()
        bridge = asyncio.create_task(run_bridge(settings, stop=bridge_stop, stats=stats))
        await _wait_ready(bridge, stats)
        say(f"bridge streaming public.conversations -> {SUBJECT} in stream {STREAM}")
        say(f"  metrics    http://127.0.0.1:{stats.metrics_port}/metrics (also /readyz)")
        say("Ctrl-C to stop.\n")
        received = _Counter()
        watcher = await _watch(server.url, verbose, received)
        try:
            if burst:
                await _burst(postgres, burst, received, bridge)
            writer = asyncio.create_task(_trickle(postgres, rate))
            waiters = [asyncio.create_task(stop.wait()), bridge, writer]
            if duration is not None:
                waiters.append(asyncio.create_task(asyncio.sleep(duration)))
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            if bridge in done:
                bridge.result()  # the bridge failed: raise its error
        finally:
            bridge_stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await bridge
            await asyncio.sleep(0.5)  # let the last acks reach the watcher
            await watcher.close()
        say(
            f"\n{received.count} messages received from JetStream; "
            f"{stats.changes} changes in {stats.transactions} transactions published."
        )
    finally:
        say("removing the temporary servers and their data ...")
        if server is not None:
            await asyncio.to_thread(server.cleanup)
        await asyncio.to_thread(postgres.cleanup)


async def _wait_ready(bridge: asyncio.Task[None], stats: BridgeStats) -> None:
    ready = asyncio.create_task(stats.ready.wait())
    done, _ = await asyncio.wait({bridge, ready}, return_when=asyncio.FIRST_COMPLETED)
    if bridge in done:
        ready.cancel()
        bridge.result()


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()
        self.quiet = False  # during a burst, count without printing


async def _watch(url: str, verbose: bool, received: _Counter) -> Any:
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def show(msg: Any) -> None:
        received.count += 1
        received.changed.set()
        if received.quiet:
            return
        body = orjson.loads(msg.data)
        source = body.get("source", {})
        latency = ""
        if source.get("commit_ts"):
            committed = datetime.fromisoformat(source["commit_ts"])
            latency = f"{(datetime.now(UTC) - committed).total_seconds() * 1000:7.1f} ms"
        key = orjson.dumps(body.get("key")).decode()
        click.echo(f"{msg.subject:<52} {body.get('op', '?'):<8} key={key:<14} {latency}")
        if verbose:
            for name, value in (msg.headers or {}).items():
                click.echo(f"    {name}: {value}")
            click.echo(
                "    "
                + orjson.dumps(body, option=orjson.OPT_INDENT_2).decode().replace("\n", "\n    ")
            )

    sub = await js.subscribe("messages.>", stream=STREAM, ordered_consumer=True, cb=show)
    return _Watcher(nc, sub)


class _Watcher:
    def __init__(self, nc: Any, sub: Any) -> None:
        self._nc = nc
        self._sub = sub

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        await self._nc.close()


async def _burst(
    postgres: LocalPostgres, rows: int, received: _Counter, bridge: asyncio.Task[None]
) -> None:
    """Insert ``rows`` rows in transactions of 1,000 and time their arrival in the stream."""
    received.quiet = True
    click.echo(f"burst: inserting {rows} rows ...")
    start_count = received.count
    conversation = uuid.uuid4()
    started = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(postgres.dsn(), autocommit=True) as conn:
        remaining = rows
        while remaining:
            size = min(1000, remaining)
            await conn.execute(
                "INSERT INTO conversations (conversation_uuid, role, content, metadata) "
                "SELECT %s, 'user', 'burst message ' || g, jsonb_build_object('n', g) "
                "FROM generate_series(1, %s) g",
                (conversation, size),
            )
            remaining -= size
    written = time.perf_counter() - started
    while received.count - start_count < rows:
        if bridge.done():
            bridge.result()
        received.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await received.changed.wait()
    elapsed = time.perf_counter() - started
    received.quiet = False
    click.echo(
        f"burst: {rows} rows written in {written:.2f}s, all in the stream after {elapsed:.2f}s "
        f"-> {rows / elapsed:,.0f} rows/s end to end\n"
    )


async def _trickle(postgres: LocalPostgres, rate: float) -> None:
    """Chat traffic: mostly new messages, some edits, a few deletes, one rollback."""
    rng = random.Random()
    conversations = [uuid.uuid4() for _ in range(3)]
    ids: list[int] = []
    async with await psycopg.AsyncConnection.connect(postgres.dsn(), autocommit=True) as conn:
        turn = 0
        while True:
            await asyncio.sleep(1.0 / rate)
            choice = rng.random()
            if choice < 0.7 or len(ids) < 3:
                role, text = _LINES[turn % len(_LINES)]
                turn += 1
                row = await (
                    await conn.execute(
                        "INSERT INTO conversations (conversation_uuid, role, content, metadata) "
                        "VALUES (%s, %s, %s, %s) RETURNING id",
                        (
                            rng.choice(conversations),
                            role,
                            text,
                            orjson.dumps({"model": "demo-1", "tokens": len(text.split())}).decode(),
                        ),
                    )
                ).fetchone()
                assert row is not None
                ids.append(int(row[0]))
            elif choice < 0.9:
                await conn.execute(
                    "UPDATE conversations SET content = content || ' (edited)', "
                    "metadata = metadata || '{\"edited\": true}' WHERE id = %s",
                    (rng.choice(ids),),
                )
            else:
                victim = ids.pop(rng.randrange(len(ids)))
                await conn.execute("DELETE FROM conversations WHERE id = %s", (victim,))
