"""``cdc-bridge setup``: create the publication, the slot and the stream, idempotently.

The same steps as ``run`` at start, in the same order (check everything, then stream,
then publication, then slot), with creation always allowed: it reuses
:func:`cdc_bridge.provisioning.ensure_replication` and
:meth:`cdc_bridge.sink.JetStreamSink.ensure_stream`. Reports what it created and what
was already there.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import click

from cdc_bridge.admin import database, jetstream
from cdc_bridge.config import Settings
from cdc_bridge.lsn import format_lsn
from cdc_bridge.pipeline import stream_spec, table_requests
from cdc_bridge.provisioning import check_database, connect, ensure_replication
from cdc_bridge.sink import JetStreamSink

__all__ = ["run_setup"]


def _publication_before(settings: Settings) -> database.PublicationInfo | None:
    pg = settings.postgres
    with connect(settings.conninfo(), pg.connect_timeout) as conn:
        return database.publication_info(conn, pg.publication)


async def run_setup(settings: Settings) -> int:
    pg = settings.postgres
    state = await asyncio.to_thread(
        check_database,
        settings.conninfo(),
        tables=table_requests(settings),
        connect_timeout=pg.connect_timeout,
    )
    spec = replace(stream_spec(settings), create=True)
    nc = await jetstream.connect(settings.nats)
    try:
        existed = await jetstream.stream_info(nc, spec.name) is not None
    finally:
        await jetstream.close(nc)
    sink: JetStreamSink[None] = await JetStreamSink.connect(
        settings.nats,
        on_ack=lambda ticket, duplicate: None,
        max_in_flight=1,
        ack_timeout=settings.nats.ack_timeout,
        name="cdc-bridge-setup",
    )
    try:
        # As run creates it: allowing atomic batches when they are wanted and possible.
        await sink.ensure_stream(spec, atomic_batches=settings.nats.atomic_batches)
    finally:
        await sink.close()
    subjects = ", ".join(spec.subjects)
    click.echo(f"stream {spec.name}: {'found' if existed else 'created'} (subjects {subjects})")
    before = await asyncio.to_thread(_publication_before, settings)
    confirmed, slot_created = await asyncio.to_thread(
        ensure_replication,
        settings.conninfo(),
        state,
        slot=pg.slot,
        publication=pg.publication,
        create_if_missing=True,
        connect_timeout=pg.connect_timeout,
    )
    tables = list(state.tables)
    if before is None:
        click.echo(f"publication {pg.publication}: created for {', '.join(tables)}")
    else:
        after = await asyncio.to_thread(_publication_before, settings)
        added = [t for t in tables if t not in before.tables]
        dropped = sorted(before.tables - after.tables) if after is not None else []
        click.echo(
            f"publication {pg.publication}: found"
            + (f", added {', '.join(added)}" if added else "")
            + (f", dropped {', '.join(dropped)}" if dropped else "")
            + ("" if added or dropped else f" (covers {', '.join(tables)})")
        )
    click.echo(
        f"slot {pg.slot}: {'created' if slot_created else 'found'} "
        f"(confirmed_flush_lsn {format_lsn(confirmed)})"
    )
    return 0
