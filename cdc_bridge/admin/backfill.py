"""``cdc-bridge backfill``: request an online backfill, follow it, list or cancel them.

The running bridge does the work (``cdc_bridge/backfill.py``); this command only writes
the request into the NATS KV bucket, after checking the table and the WHERE clause
against the database, and then shows the progress the bridge records there.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

import click
import orjson
import psycopg
from psycopg import sql

from cdc_bridge.admin import jetstream
from cdc_bridge.backfill import (
    BackfillRecord,
    BackfillStore,
    combined_where,
    new_backfill_id,
)
from cdc_bridge.config import Settings
from cdc_bridge.errors import ConfigError, SetupError, first_line
from cdc_bridge.provisioning import connect

__all__ = [
    "cancel_backfill",
    "describe_backfill",
    "list_backfills",
    "progress_line",
    "request_backfill",
    "watch_backfill",
]

EXIT_OK = 0
EXIT_NOT_DONE = 1  # cancelled or failed

# How long to wait for a bridge to pick a request up before saying so.
_PICKUP_NOTICE = 10.0


def _store(settings: Settings, nc: Any) -> BackfillStore:
    return BackfillStore(nc, stream=settings.nats.stream, slot=settings.postgres.slot)


def _estimate(settings: Settings, table: str, where: str | None) -> int:
    """Check that ``table`` exists and ``where`` is valid on it; the planner's estimate."""
    schema, name = table.split(".", 1)
    clause = combined_where(settings.tables[table].where, where)
    query = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {}.{}{}").format(
        sql.Identifier(schema),
        sql.Identifier(name),
        sql.SQL(" WHERE ") + sql.SQL(clause) if clause else sql.SQL(""),
    )
    with connect(settings.conninfo(), settings.postgres.connect_timeout) as conn:
        try:
            row = conn.execute(query).fetchone()
        except psycopg.errors.UndefinedTable:
            raise SetupError(
                f"table {table} does not exist (check tables: in the config)"
            ) from None
        except psycopg.Error as exc:
            what = "--where" if where else f"tables.{table}.where"
            raise ConfigError(
                f"{what} is not a valid condition on {table}: {first_line(exc)}"
            ) from None
    assert row is not None
    plan: Any = row[0]
    if isinstance(plan, str):
        plan = orjson.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def describe_backfill(record: BackfillRecord) -> str:
    where = f" where {record.where}" if record.where else ""
    return f"backfill {record.id} of {record.table}{where}"


def progress_line(record: BackfillRecord) -> str:
    done = record.rows + record.dropped
    if record.final:
        rate = f", {record.rate:,.0f} rows/s" if record.rate else ""
        return f"{record.status}: {record.rows:,} rows published in {record.chunks} chunks{rate}"
    if record.estimated_rows:
        share = min(100.0, 100.0 * done / record.estimated_rows)
        bar = "#" * int(share / 5)
        total = f"{done:,} / ~{record.estimated_rows:,} rows [{bar:<20}] {share:3.0f}%"
    else:
        total = f"{done:,} rows"
    parts = [f"{record.status}: {total}"]
    if record.rate:
        parts.append(f"{record.rate:,.0f} rows/s")
    eta = record.eta_seconds
    if eta is not None and record.status == "running":
        parts.append(f"ETA {eta:,.0f}s")
    return ", ".join(parts)


def _summary(record: BackfillRecord) -> str:
    line = (
        f"{describe_backfill(record)}: {record.status}, {record.rows:,} rows published in "
        f"{record.chunks} chunks"
    )
    if record.dropped:
        line += f", {record.dropped:,} left out (newer changes were in the stream)"
    if record.rate:
        line += f", {record.rate:,.0f} rows/s"
    if record.error:
        line += f": {record.error}"
    return line


async def request_backfill(
    settings: Settings,
    table: str,
    where: str | None,
    *,
    detach: bool,
    stop: asyncio.Event,
    interval: float = 0.5,
) -> int:
    if table not in settings.tables:
        configured = ", ".join(sorted(settings.tables))
        raise ConfigError(
            f"table {table} is not in the config's tables: (configured: {configured}); "
            "a backfill re-sends a streamed table"
        )
    estimate = await asyncio.to_thread(_estimate, settings, table, where)
    record = BackfillRecord(id=new_backfill_id(), table=table, where=where, estimated_rows=estimate)
    nc = await jetstream.connect(settings.nats)
    try:
        await _store(settings, nc).create(record)
        click.echo(
            f"{describe_backfill(record)} requested (about {estimate:,} rows); the bridge "
            f"streaming slot {settings.postgres.slot} runs it"
        )
        if detach:
            click.echo(f"follow it with: cdc-bridge backfill --watch {record.id}")
            return EXIT_OK
        return await _follow(settings, nc, record.id, stop, interval)
    finally:
        await jetstream.close(nc)


async def watch_backfill(
    settings: Settings, backfill_id: str, *, stop: asyncio.Event, interval: float = 0.5
) -> int:
    nc = await jetstream.connect(settings.nats)
    try:
        return await _follow(settings, nc, backfill_id, stop, interval)
    finally:
        await jetstream.close(nc)


async def _follow(
    settings: Settings, nc: Any, backfill_id: str, stop: asyncio.Event, interval: float
) -> int:
    """Show the progress until the backfill ends; Ctrl-C (``stop``) detaches: it goes on."""
    store = _store(settings, nc)
    tty = sys.stderr.isatty()
    started = time.monotonic()
    noticed = False
    last_line = ""
    last_print = 0.0
    while not stop.is_set():
        found = await store.get(backfill_id)
        if found is None:
            raise SetupError(
                f"no backfill {backfill_id} for stream {settings.nats.stream} and slot "
                f"{settings.postgres.slot} (list them with: cdc-bridge backfill --list)"
            )
        record = found[0]
        if record.final:
            if tty and last_line:
                click.echo("", err=True)
            click.echo(_summary(record))
            return EXIT_OK if record.status == "done" else EXIT_NOT_DONE
        now = time.monotonic()
        if record.status == "pending" and not noticed and now - started > _PICKUP_NOTICE:
            noticed = True
            click.echo(
                f"still pending: no bridge on slot {settings.postgres.slot} has picked it "
                "up yet (is one running?); it starts when one does",
                err=True,
            )
        line = progress_line(record)
        if tty:
            click.echo(f"\r{line:<100}", nl=False, err=True)
        elif line != last_line and now - last_print >= 5.0:
            click.echo(line, err=True)
            last_print = now
        last_line = line
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    click.echo(
        f"\ndetached; the backfill goes on in the bridge (cancel it with: cdc-bridge "
        f"backfill --cancel {backfill_id})",
        err=True,
    )
    return EXIT_OK


async def list_backfills(settings: Settings, *, as_json: bool) -> int:
    nc = await jetstream.connect(settings.nats)
    try:
        records = [record for record, _ in await _store(settings, nc).all()]
    finally:
        await jetstream.close(nc)
    if as_json:
        click.echo(orjson.dumps([orjson.loads(r.to_json()) for r in records]).decode())
        return EXIT_OK
    if not records:
        click.echo(f"no backfills for stream {settings.nats.stream}, slot {settings.postgres.slot}")
    for record in records:
        click.echo(f"{describe_backfill(record)}: {progress_line(record)}")
    return EXIT_OK


async def cancel_backfill(settings: Settings, backfill_id: str) -> int:
    nc = await jetstream.connect(settings.nats)
    try:
        store = _store(settings, nc)
        while True:
            found = await store.get(backfill_id)
            if found is None:
                raise SetupError(
                    f"no backfill {backfill_id} (list them with: cdc-bridge backfill --list)"
                )
            record, revision = found
            if record.final:
                click.echo(f"{describe_backfill(record)} has already ended: {record.status}")
                return EXIT_NOT_DONE
            record.cancel_requested = True
            if record.status == "pending":  # no bridge has started it: cancelled now
                record.status = "cancelled"
                record.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if await store.update(record, revision) is not None:
                break
        if record.status == "cancelled":
            click.echo(f"{describe_backfill(record)} cancelled")
        else:
            click.echo(
                f"{describe_backfill(record)}: cancel requested; the bridge stops it after the "
                "chunk in flight"
            )
        return EXIT_OK
    finally:
        await jetstream.close(nc)
