"""``cdc-bridge verify``: prove that the stream and the tables agree, and repair where not.

1. One ``REPEATABLE READ`` snapshot of the tables; ``pg_current_wal_lsn()`` read inside
   it is L, and ``pg_current_snapshot()`` says which transactions it sees.
2. Wait (bounded) until the slot's ``confirmed_flush_lsn`` is at least L: then every
   change the snapshot sees is in the stream. A non-transactional logical message with
   the heartbeat prefix nudges an idle bridge to confirm.
3. Read the tables' messages (this slot's, on the tables' subjects) once, in stream
   order, and fold those committed at or before L (and seen by the snapshot) into the
   latest state per key (:mod:`.stream`, :mod:`.fold`).
4. Read each table in the snapshot, keyset page by keyset page, convert and publish
   each row as the bridge would (filters, masks, envelope) without sending it, and
   compare it with the fold (:mod:`.table`).

``--repair`` republishes the current row of every mismatched key as op ``read`` (and a
delete for a row that is only in the stream) with ``Nats-Msg-Id``
``<slot>:verify:<L>:<table>:<n>``, which is not a WAL position, so the bridge's
read-back passes over it. The rows are locked (``FOR SHARE``) until the PubAcks are in,
so no newer change of them can reach the stream first (:mod:`.repair`).

The last result's summary goes to the NATS KV bucket ``cdc-bridge-verify`` (key
``<stream>.<slot>``), where ``cdc-bridge status`` finds it (:mod:`.results`).

This module keeps the order of those steps, the options, and the wait for the bridge;
each step's work is in the module named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from cdc_bridge.admin import jetstream
from cdc_bridge.config import Settings
from cdc_bridge.envelopes import encoder_from_settings
from cdc_bridge.errors import SetupError, first_line
from cdc_bridge.filters import build_filters
from cdc_bridge.heartbeat import EMIT, heartbeat_content
from cdc_bridge.lsn import format_lsn, parse_lsn
from cdc_bridge.pipeline import table_requests
from cdc_bridge.provisioning import DatabaseState, check_database
from cdc_bridge.verify.fold import SnapshotVisibility, TableFold, sample_predicate
from cdc_bridge.verify.repair import repair
from cdc_bridge.verify.report import TableResult, VerifyResult
from cdc_bridge.verify.results import RESULT_BUCKET, store_result
from cdc_bridge.verify.stream import fold_stream, history_note
from cdc_bridge.verify.table import Target, compare_table, connect, count_rows, open_snapshot

__all__ = ["VerifyOptions", "run_verify", "wait_for_bridge"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    tables: tuple[str, ...] = ()  # empty: every configured table
    sample: int | None = None  # keys per table, about; None: all of them
    max_mismatch: float = 0.0  # percent
    examples: int = 5
    repair: bool = False
    wait: float = 60.0  # seconds to wait for the bridge to confirm L
    seed: str | None = None  # the sample's hash salt (default: random)
    store: bool = True  # keep the summary for cdc-bridge status


def _refuse_unverifiable(settings: Settings, names: Sequence[str]) -> None:
    for name in names:
        ops = set(settings.tables[name].ops)
        missing = [op for op in ("insert", "update", "delete", "truncate") if op not in ops]
        if missing:
            raise SetupError(
                f"tables.{name}.ops leaves out {', '.join(missing)}: the stream does not "
                f"mirror {name}, so verify cannot compare it (name the other tables: "
                "cdc-bridge verify TABLE ...)"
            )


def _slot_position(conn: psycopg.Connection[tuple[Any, ...]], slot: str) -> tuple[int, bool]:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        raise SetupError(
            f"replication slot {slot!r} does not exist: no bridge streams these tables "
            "(start cdc-bridge run, or check postgres.slot)"
        )
    confirmed = parse_lsn(str(row[0])) if row[0] is not None else 0
    return confirmed, bool(row[1])


def wait_for_bridge(settings: Settings, lsn: int, timeout: float) -> float:
    """Wait until the slot has confirmed ``lsn``; return the seconds waited.

    :class:`SetupError` saying whether the bridge is stopped or behind, after ``timeout``.
    """
    slot = settings.postgres.slot
    started = time.monotonic()
    with connect(settings) as conn:
        confirmed, active = _slot_position(conn, slot)
        if confirmed >= lsn:
            return 0.0
        # Something to decode past L: an idle bridge confirms past it at its next status
        # update. The heartbeat's prefix: the bridge already handles those.
        with contextlib.suppress(psycopg.Error):
            conn.execute(EMIT, (settings.heartbeat.prefix, heartbeat_content(slot)))
        delay = 0.05
        while True:
            confirmed, active = _slot_position(conn, slot)
            if confirmed >= lsn:
                return time.monotonic() - started
            waited = time.monotonic() - started
            if waited >= timeout:
                break
            time.sleep(min(delay, max(0.0, timeout - waited)))
            delay = min(delay * 2, 1.0)
    behind = lsn - confirmed
    if not active:
        raise SetupError(
            f"slot {slot!r} is not active: no bridge is running (it confirmed "
            f"{format_lsn(confirmed)}, verify needs {format_lsn(lsn)}); start the bridge, "
            "then run verify again"
        )
    raise SetupError(
        f"the bridge is {behind} bytes of WAL behind after {timeout:g}s (slot {slot!r} "
        f"confirmed {format_lsn(confirmed)}, verify needs {format_lsn(lsn)}): let it catch "
        "up, or give it longer with --wait SECONDS"
    )


async def run_verify(settings: Settings, options: VerifyOptions) -> VerifyResult:
    """Verify the tables against the stream (and repair, if asked); the result."""
    started_wall = time.time()
    started = time.monotonic()
    timings: dict[str, float] = {}
    names = list(options.tables) or list(settings.tables)
    unknown = [n for n in names if n not in settings.tables]
    if unknown:
        raise SetupError(
            f"table {unknown[0]} is not in the config's tables: "
            f"(configured: {', '.join(settings.tables)})"
        )
    _refuse_unverifiable(settings, names)
    pg = settings.postgres
    envelope = settings.envelope.format
    state: DatabaseState = await asyncio.to_thread(
        check_database,
        settings.conninfo(),
        tables={n: r for n, r in table_requests(settings).items() if n in names},
        connect_timeout=pg.connect_timeout,
    )
    nc = await jetstream.connect(settings.nats)
    try:
        info = await jetstream.stream_info(nc, settings.nats.stream)
        if info is None:
            raise SetupError(
                f"stream {settings.nats.stream!r} does not exist (check nats.stream; "
                "the bridge creates it at start)"
            )
        reader, conn, lsn, snapshot_text, snapshot_tables = await asyncio.to_thread(
            open_snapshot, settings, state, names
        )
        try:
            timings["wait"] = await asyncio.to_thread(wait_for_bridge, settings, lsn, options.wait)
            # After the wait: the stream holds every change up to L.
            info = await jetstream.stream_info(nc, settings.nats.stream) or info
            note = history_note(info)
            keeps: dict[str, Callable[[str], bool] | None] = dict.fromkeys(names)
            if options.sample is not None:
                seed = options.seed or secrets.token_hex(8)
                for name in names:
                    total = await asyncio.to_thread(count_rows, conn, snapshot_tables[name])
                    fraction = options.sample / total if total else 1.0
                    keeps[name] = sample_predicate(fraction, seed)
            lsn_text = format_lsn(lsn)
            targets = {
                name: Target(
                    name=name,
                    table=snapshot_tables[name],
                    key_names=tuple(state.key_columns.get(name, ())),
                    fold=TableFold(baseline_known=note is None, keep=keeps[name]),
                    result=TableResult(name),
                )
                for name in names
            }
            visibility = SnapshotVisibility(snapshot_text)
            phase = time.monotonic()
            await fold_stream(nc, settings, targets, lsn, visibility)
            timings["stream"] = time.monotonic() - phase
            phase = time.monotonic()
            filters = build_filters({n: settings.tables[n] for n in names})
            encoder = encoder_from_settings(settings)
            for target in targets.values():
                target.result.messages = target.fold.messages
                target.result.stream_keys = sum(
                    1 for s in target.fold.states.values() if s is not None
                )
                await asyncio.to_thread(
                    compare_table,
                    reader,
                    target,
                    lsn=lsn,
                    filters=filters,
                    encoder=encoder,
                    envelope=envelope,
                    slot=pg.slot,
                    examples=options.examples,
                    repair=options.repair,
                    sample_by_key=envelope == "native"
                    and not set(settings.tables[target.name].mask) & set(target.key_names),
                )
            timings["tables"] = time.monotonic() - phase
        finally:
            await asyncio.to_thread(reader.close)
        result = VerifyResult(
            stream=settings.nats.stream,
            slot=pg.slot,
            lsn=lsn_text,
            envelope=envelope,
            mode="sample" if options.sample is not None else "full",
            sample=options.sample,
            max_mismatch=options.max_mismatch,
            started=datetime.fromtimestamp(started_wall, UTC).isoformat().replace("+00:00", "Z"),
            tables=[t.result for t in targets.values()],
            history_note=note,
            first_seq=int(info.state.first_seq or 1),
            repair=options.repair,
        )
        if options.repair and any(t.repairs for t in targets.values()):
            phase = time.monotonic()
            await repair(settings, nc, targets, lsn_text, filters)
            timings["repair"] = time.monotonic() - phase
        result.timings = {k: round(v, 3) for k, v in timings.items()}
        result.duration_seconds = time.monotonic() - started
        if options.store:
            try:
                await store_result(nc, settings.nats.stream, pg.slot, result.summary())
            except Exception as exc:
                log.warning(
                    "could not keep the verify result in NATS KV bucket %s: %s",
                    RESULT_BUCKET,
                    first_line(exc),
                )
        return result
    finally:
        await jetstream.close(nc)
