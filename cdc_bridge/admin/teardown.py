"""``cdc-bridge teardown``: drop the slot, the publication and (unless kept) the stream.

The slot goes first, so nothing pins WAL any more, and never while it is active: a
running bridge holds it (``active_pid``), and dropping it under the bridge would lose
its position. Asks before dropping anything unless ``--yes``.
"""

from __future__ import annotations

import asyncio

import click

from cdc_bridge.admin import database, jetstream
from cdc_bridge.config import Settings
from cdc_bridge.errors import SetupError
from cdc_bridge.provisioning import connect

__all__ = ["run_teardown"]


def _slot_before(settings: Settings) -> database.SlotInfo | None:
    pg = settings.postgres
    with connect(settings.conninfo(), pg.connect_timeout) as conn:
        return database.slot_info(conn, pg.slot)


def _drop(settings: Settings, slot: bool) -> bool:
    """Drop slot (if it exists) and publication; True if the publication existed."""
    pg = settings.postgres
    with connect(settings.conninfo(), pg.connect_timeout) as conn:
        if slot:
            database.drop_slot(conn, pg.slot)
        existed = database.publication_info(conn, pg.publication) is not None
        database.drop_publication(conn, pg.publication)
        return existed


async def _delete_stream(settings: Settings) -> bool:
    nc = await jetstream.connect(settings.nats)
    try:
        return await jetstream.delete_stream(nc, settings.nats.stream)
    finally:
        await jetstream.close(nc)


def _confirmed() -> bool:
    try:
        return click.confirm("Continue?", default=False, err=True)
    except click.Abort:  # end of input (no terminal) or Ctrl-C at the prompt
        click.echo("", err=True)
        return False


def run_teardown(settings: Settings, *, yes: bool, keep_stream: bool) -> int:
    """Synchronous: the confirmation prompt must not run inside an event loop."""
    pg = settings.postgres
    stream = settings.nats.stream
    slot = _slot_before(settings)
    if slot is not None and slot.active:
        raise SetupError(database.active_slot_message(pg.slot, slot.active_pid))
    targets = [f"replication slot {pg.slot}", f"publication {pg.publication}"]
    if not keep_stream:
        targets.append(f"JetStream stream {stream} and every message in it")
    click.echo("This drops " + ", ".join(targets) + ".", err=True)
    if slot is not None:
        click.echo(
            f"Dropping the slot loses its position ({slot.confirmed_flush_lsn}): a new slot "
            "starts at the current WAL position, and changes made in between are never "
            f"streamed. The WAL it retains ({slot.lag_bytes} bytes behind) is freed.",
            err=True,
        )
    if not yes and not _confirmed():
        raise SetupError("teardown cancelled: nothing was dropped")
    publication_existed = _drop(settings, slot is not None)
    click.echo(f"slot {pg.slot}: {'dropped' if slot is not None else 'not found'}")
    click.echo(f"publication {pg.publication}: {'dropped' if publication_existed else 'not found'}")
    if keep_stream:
        click.echo(f"stream {stream}: kept")
        return 0
    deleted = asyncio.run(_delete_stream(settings))
    click.echo(f"stream {stream}: {'deleted' if deleted else 'not found'}")
    return 0
