"""``cdc-bridge verify``: prove that the stream and the tables agree, and repair where not.

1. One ``REPEATABLE READ`` snapshot of the tables; ``pg_current_wal_lsn()`` read inside
   it is L, and ``pg_current_snapshot()`` says which transactions it sees.
2. Wait (bounded) until the slot's ``confirmed_flush_lsn`` is at least L: then every
   change the snapshot sees is in the stream. A non-transactional logical message with
   the heartbeat prefix nudges an idle bridge to confirm.
3. Read the tables' messages (this slot's, on the tables' subjects) once, in stream
   order, and fold those committed at or before L (and seen by the snapshot) into the
   latest state per key (:mod:`cdc_bridge.verify.fold`).
4. Read each table in the snapshot, keyset page by keyset page, convert and publish
   each row as the bridge would (filters, masks, envelope) without sending it, and
   compare it with the fold.

``--repair`` republishes the current row of every mismatched key as op ``read`` (and a
delete for a row that is only in the stream) with ``Nats-Msg-Id``
``<slot>:verify:<L>:<table>:<n>``, which is not a WAL position, so the bridge's
read-back passes over it. The rows are locked (``FOR SHARE``) until the PubAcks are in,
so no newer change of them can reach the stream first.

The last result's summary goes to the NATS KV bucket ``cdc-bridge-verify`` (key
``<stream>.<slot>``), where ``cdc-bridge status`` finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from psycopg import sql
from psycopg.types.string import TextLoader

from cdc_bridge.admin import jetstream
from cdc_bridge.changes import Change, TableInfo
from cdc_bridge.config import Settings
from cdc_bridge.envelopes import ChangeEncoder, encoder_from_settings
from cdc_bridge.errors import ConnectError, SetupError, SinkError, first_line
from cdc_bridge.filters import ChangeFilters, build_filters
from cdc_bridge.heartbeat import EMIT, heartbeat_content
from cdc_bridge.lsn import format_lsn, parse_lsn
from cdc_bridge.pgoutput import PG_EPOCH_UNIX_MICROS
from cdc_bridge.pgsecurity import connect_error_hint
from cdc_bridge.pipeline import table_requests
from cdc_bridge.provisioning import DatabaseState, check_database
from cdc_bridge.router import Router
from cdc_bridge.routing import SubjectTemplate
from cdc_bridge.sink import stream_subjects
from cdc_bridge.snapshot import SnapshotReader, SnapshotTable
from cdc_bridge.source import SESSION_OPTIONS
from cdc_bridge.verify.fold import (
    ROW_OPS,
    SnapshotVisibility,
    TableFold,
    decode_op,
    decode_row,
    differing_columns,
    key_text,
    sample_predicate,
)
from cdc_bridge.verify.report import Differing, TableResult, VerifyResult

__all__ = [
    "RESULT_BUCKET",
    "VerifyOptions",
    "load_last_result",
    "repair_msg_id",
    "run_verify",
]

log = logging.getLogger(__name__)

#: The NATS KV bucket that keeps each (stream, slot)'s last verify summary.
RESULT_BUCKET = "cdc-bridge-verify"

_KV_KEY_UNSAFE = re.compile(r"[^-/_=.a-zA-Z0-9]")
_FETCH_BATCH = 2000
_PAGE_ROWS = 5000
_REPAIR_BATCH = 500
#: Bytes of WAL before L in which a message's transaction is checked against the snapshot.
_VISIBILITY_WINDOW = 16 * 1024 * 1024


def repair_msg_id(slot: str, lsn: str, table: str, number: int) -> str:
    """``<slot>:verify:<L>:<table>:<n>``: not a WAL position (the read-back passes over it),
    deterministic for one verify run, distinct between runs (L moves on)."""
    return f"{slot}:verify:{lsn}:{table}:{number}"


def result_key(stream: str, slot: str) -> str:
    return _KV_KEY_UNSAFE.sub("_", f"{stream}.{slot}")


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


# --------------------------------------------------------------------------- tables


@dataclass(slots=True)
class _Table:
    name: str
    table: SnapshotTable
    key_names: tuple[str, ...]
    fold: TableFold
    result: TableResult
    #: Mismatched keys to repair: canonical key -> (the table's key values as text, in
    #: page-column order, None if only in the stream; the stream's state of the row).
    repairs: dict[str, tuple[list[str | None] | None, dict[str, Any] | None]] = field(
        default_factory=dict
    )
    type_names: tuple[str, ...] = ()


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


def _connect(settings: Settings) -> psycopg.Connection[tuple[Any, ...]]:
    pg = settings.postgres
    try:
        return psycopg.connect(
            settings.conninfo(),
            autocommit=True,
            options=SESSION_OPTIONS,
            connect_timeout=max(1, math.ceil(pg.connect_timeout)),
            application_name="cdc-bridge verify",
        )
    except psycopg.Error as exc:
        reason = first_line(exc)
        hint = connect_error_hint(reason) or "check postgres.dsn"
        raise ConnectError(f"cannot connect to PostgreSQL: {reason} ({hint})") from None


# --------------------------------------------------------------------------- waiting


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
    with _connect(settings) as conn:
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


# --------------------------------------------------------------------------- stream


def _subject_filter(template: str, name: str) -> str:
    schema, table = name.split(".", 1)
    return SubjectTemplate(template).partial({"schema": schema, "table": table}).stream_filter


def history_note(info: StreamInfo) -> str | None:
    """Why the stream may no longer hold every message it was given, or None.

    Only streams with a limit (max_age, max_msgs, max_bytes, max_msgs_per_subject) drop
    messages by themselves; in a stream without one a missing message is a loss.
    """
    config, state = info.config, info.state
    limits = [
        f"{name} {value}"
        for name, value in (
            ("max_age", config.max_age),
            ("max_msgs", config.max_msgs),
            ("max_bytes", config.max_bytes),
            ("max_msgs_per_subject", config.max_msgs_per_subject),
        )
        if value is not None and value > 0
    ]
    if not limits:
        return None
    first = int(state.first_seq or 0)
    deleted = int(getattr(state, "num_deleted", 0) or 0)
    if first <= 1 and not deleted:
        return None
    dropped = f"its first {first - 1} messages" if first > 1 else "some messages"
    return (
        f"stream {config.name} no longer holds {dropped} ({', '.join(limits)}; first "
        f"sequence {first}): only keys whose state the stream still fully knows are "
        "compared; table rows without a message in it are counted as not comparable"
    )


def _fast_header_lines(raw: bytes) -> dict[str, str]:
    """``Name: Value`` lines of a header block: nats-py's own parser checks every
    character of every name, a third of the time verify spends reading the stream."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().decode("ascii", "replace")] = value.strip().decode("utf-8", "replace")
    return out


async def _count_matching(nc: NatsClient, stream: str, filters: Sequence[str]) -> int:
    """How many messages of ``stream`` are on ``filters`` now (a consumer's num_pending)."""
    js = nc.jetstream(timeout=10.0)
    name = f"cdc-bridge-verify-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=60.0,
        mem_storage=True,
        num_replicas=1,
        filter_subjects=list(filters),
    )
    try:
        await js.add_consumer(stream, config)
        try:
            info = await js.consumer_info(stream, name)
        finally:
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, name)
    except Exception as exc:
        raise SinkError(f"cannot read stream {stream!r}: {first_line(exc)}") from None
    return int(info.num_pending or 0)


async def _fold_stream(
    nc: NatsClient,
    settings: Settings,
    tables: Mapping[str, _Table],
    lsn: int,
    visibility: SnapshotVisibility,
) -> int:
    """Fold the tables' messages (commit LSN <= ``lsn``) into their folds; return how many
    messages were read.

    One ordered push consumer (flow-controlled, no acks) on the tables' subjects, from
    the start; the messages present when it starts are read, later ones are not needed
    (they are past L: the bridge had confirmed L before).
    """
    stream = settings.nats.stream
    slot_prefix = f"{settings.postgres.slot}:"
    envelope = settings.envelope.format
    # Only a transaction that commits while the snapshot is taken can be below L and not
    # in it: its commit LSN is within microseconds of L. Older messages are not checked,
    # so a 32-bit xid from before a wraparound can never be mistaken for a newer one.
    visibility_floor = max(0, lsn - _VISIBILITY_WINDOW)
    filters = list(stream_subjects(_subject_filter(settings.tables[n].subject, n) for n in tables))
    pending = await _count_matching(nc, stream, filters)
    if not pending:
        return 0

    def fold(msg: Msg) -> None:
        headers = msg.headers or {}
        if not headers.get("Nats-Msg-Id", "").startswith(slot_prefix):
            return  # another bridge's (or no bridge's) message
        target = tables.get(headers.get("Cdc-Table", ""))
        if target is None or headers.get("Cdc-Dead-Letter"):
            return
        commit = headers.get("Cdc-Commit-Lsn")
        if commit is None:
            return
        commit_lsn = parse_lsn(commit)
        if commit_lsn > lsn:
            return
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(body, dict):
            return
        op = headers.get("Cdc-Op") or decode_op(envelope, body)
        if op not in ROW_OPS:
            return
        event = decode_row(envelope, op, body, target.key_names)
        if (
            event.xid is not None
            and commit_lsn >= visibility_floor
            and not visibility.visible(event.xid)
        ):
            return  # committed while the snapshot was taken, not in it
        target.fold.apply(event)

    read = 0
    done = asyncio.Event()
    last: Msg | None = None

    async def on_message(msg: Msg) -> None:
        nonlocal read, last
        if done.is_set():
            return
        read += 1
        last = msg
        fold(msg)
        if read >= pending:
            done.set()

    if hasattr(nc, "_parse_header_lines"):
        nc._parse_header_lines = _fast_header_lines  # type: ignore[method-assign]
    try:
        sub = await jetstream.subscribe_ordered(nc, stream, filters, on_message, from_start=True)
    except Exception as exc:
        raise SinkError(f"cannot read stream {stream!r}: {first_line(exc)}") from None
    try:
        seen = -1
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await done.wait()
            if done.is_set():
                break
            if read == seen:
                # Nothing for 5 s: messages deleted (retention) since they were counted?
                if last is None or (last.metadata.num_pending or 0) == 0:
                    break
                raise SinkError(
                    f"reading stream {stream!r} stalled after {read} of {pending} messages"
                )
            seen = read
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return read


# --------------------------------------------------------------------------- table


def _published(
    info: TableInfo,
    row: dict[str, Any],
    key_names: Sequence[str],
    *,
    lsn: int,
    filters: ChangeFilters | None,
    encoder: ChangeEncoder,
    envelope: str,
    slot: str,
) -> dict[str, Any] | None:
    """The row as the stream would state it: filtered, masked, encoded and decoded."""
    change = _read_change(info, row, key_names, lsn)
    if filters is not None and not filters.apply(change):
        return None
    if envelope == "native":
        # The native envelope is the row itself as JSON: a round trip is the same.
        return orjson.loads(orjson.dumps(change.after))  # type: ignore[no-any-return]
    body = orjson.loads(encoder(change, slot))
    return decode_row(envelope, "read", body, key_names).row


def _compare_table(
    reader: SnapshotReader,
    target: _Table,
    *,
    lsn: int,
    filters: ChangeFilters | None,
    encoder: ChangeEncoder,
    envelope: str,
    slot: str,
    examples: int,
    repair: bool,
    sample_by_key: bool = False,
) -> None:
    """Read the table in the snapshot, page by page, and compare each row with the fold.

    ``sample_by_key``: the published key is the converted key (native envelope, key not
    masked), so a row outside the sample is skipped before the rest of it is converted.
    """
    table, fold, result = target.table, target.fold, target.result
    info = table.info
    names = info.column_names
    converters = info.converters
    states = fold.states
    keep = fold.keep
    key_positions = [names.index(k) for k in target.key_names if k in names]
    sample_by_key = sample_by_key and len(key_positions) == len(target.key_names)
    after: list[str | None] | None = None
    while True:
        rows = reader.page(table, after, _PAGE_ROWS)
        if not rows:
            break
        after = [rows[-1][i] for i in table.page_positions]
        for values in rows:
            if keep is not None and sample_by_key:
                parts = [(i, values[i]) for i in key_positions]
                early = orjson.dumps(
                    [None if v is None else converters[i](v) for i, v in parts]
                ).decode()
                if not keep(early):
                    continue
            row = {
                names[i]: None if value is None else converters[i](value)
                for i, value in enumerate(values)
            }
            published = _published(
                info,
                row,
                target.key_names,
                lsn=lsn,
                filters=filters,
                encoder=encoder,
                envelope=envelope,
                slot=slot,
            )
            if published is None:
                continue
            key = key_text(target.key_names, published)
            if key is None or (keep is not None and not keep(key)):
                continue
            result.table_rows += 1
            if key in states:
                state = states.pop(key)
            elif fold.baseline_known:
                state = None
            else:
                result.unverifiable += 1
                continue
            result.checked += 1
            key_dict = dict(zip(target.key_names, orjson.loads(key), strict=True))
            if state is None:
                result.only_in_table += 1
                if len(result.only_in_table_examples) < examples:
                    result.only_in_table_examples.append(key_dict)
            else:
                columns = differing_columns(published, state)
                if not columns:
                    continue
                result.differing += 1
                for column in columns:
                    result.differing_columns[column] = result.differing_columns.get(column, 0) + 1
                if len(result.differing_examples) < examples:
                    result.differing_examples.append(Differing(key_dict, columns))
            if repair:
                target.repairs[key] = ([values[i] for i in table.page_positions], state)
        if len(rows) < _PAGE_ROWS:
            break
    # What is left in the fold: keys the table does not have (in the snapshot).
    for key, state in states.items():
        if state is None:
            continue  # gone from both
        result.checked += 1
        result.only_in_stream += 1
        if len(result.only_in_stream_examples) < examples:
            result.only_in_stream_examples.append(
                dict(zip(target.key_names, orjson.loads(key), strict=True))
            )
        if repair:
            target.repairs[key] = (None, state)


# --------------------------------------------------------------------------- repair


async def _repair_table(
    conn: psycopg.Connection[tuple[Any, ...]],
    nc: NatsClient,
    settings: Settings,
    target: _Table,
    lsn_text: str,
    filters: ChangeFilters | None,
    router: Router,
) -> int:
    """Republish the current row of each mismatched key; return how many were sent.

    Per batch of keys, in one transaction: lock the rows (``FOR SHARE``; without the
    lock, with a warning, if the role may not take it), publish, wait for the PubAcks,
    commit. A change of a locked row waits for the commit, so it reaches the stream
    after the repair, never before.
    """
    stream = settings.nats.stream
    slot = settings.postgres.slot
    js = nc.jetstream(timeout=max(settings.nats.ack_timeout, 5.0))
    table = target.table
    info = table.info
    names = info.column_names
    page_columns = table.page_columns
    casts = [sql.SQL(target.type_names[i]) for i in table.page_positions]
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in names)
    key_sql = sql.SQL(", ").join(sql.Identifier(c) for c in page_columns)
    one_key = sql.SQL("({})").format(
        sql.SQL(", ").join(sql.SQL("CAST({} AS {})").format(sql.Placeholder(), c) for c in casts)
    )
    masked = set(settings.tables[target.name].mask)
    # A row only in the stream is looked up by the key the stream states, where that is
    # the table's own key, unmasked.
    lookup = page_columns == target.key_names and not masked & set(page_columns)
    sent = 0
    number = 0
    items = list(target.repairs.items())
    for start in range(0, len(items), _REPAIR_BATCH):
        batch = items[start : start + _REPAIR_BATCH]
        raw: list[list[Any]] = []
        for key, (values, _) in batch:
            if values is not None:
                raw.append(list(values))
            elif lookup:
                raw.append(
                    [
                        v if isinstance(v, str) or v is None else orjson.dumps(v).decode()
                        for v in orjson.loads(key)
                    ]
                )
        conditions: list[sql.Composable] = [
            sql.SQL("({}) IN ({})").format(key_sql, sql.SQL(", ").join([one_key] * len(raw)))
        ]
        if table.where:
            conditions.append(sql.SQL("({})").format(sql.SQL(table.where)))
        select = sql.SQL("SELECT {} FROM {} WHERE {}").format(
            columns, table.sql_name, sql.SQL(" AND ").join(conditions)
        )
        params = [v for values in raw for v in values]
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        try:
            with conn.transaction():
                rows: list[tuple[Any, ...]] = []
                if raw:
                    rows = _locked_rows(conn, select, params, target.name)
                lock_row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                assert lock_row is not None
                now_lsn = parse_lsn(str(lock_row[0]))
                current: dict[str, Change] = {}
                for found_row in rows:
                    row = {
                        names[i]: None if value is None else info.converters[i](value)
                        for i, value in enumerate(found_row)
                    }
                    change = _read_change(info, row, target.key_names, now_lsn)
                    if filters is not None and not filters.apply(change):
                        continue
                    assert change.after is not None
                    found_key = key_text(target.key_names, _json_round_trip(change.after))
                    if found_key is not None:
                        current[found_key] = change
                for key, (_, stream_state) in batch:
                    msg_id = repair_msg_id(slot, lsn_text, target.name, number)
                    number += 1
                    found = current.get(key)
                    if found is not None:
                        found.index = number - 1
                        outgoing = router.route_read(found, msg_id)
                    elif stream_state is not None:
                        outgoing = _repair_delete(
                            router, target, key, stream_state, now_lsn, filters, settings
                        )
                    else:
                        continue  # gone from the table, and the stream says so already
                    if outgoing is None:
                        continue
                    headers = dict(outgoing.headers)
                    headers.pop("Cdc-Index", None)
                    headers["Nats-Msg-Id"] = msg_id
                    headers["Cdc-Repair"] = lsn_text
                    messages.append((outgoing.subject, outgoing.body, headers))
                for subject, body, headers in messages:
                    try:
                        await js.publish(subject, body, headers=headers, stream=stream)
                    except Exception as exc:
                        raise SinkError(
                            f"cannot publish the repair of {target.name} to {subject!r}: "
                            f"{first_line(exc)}"
                        ) from None
                    sent += 1
        except psycopg.Error as exc:
            raise SetupError(
                f"cannot read the rows of {target.name} to repair: {first_line(exc)}"
            ) from None
    return sent


def _locked_rows(
    conn: psycopg.Connection[tuple[Any, ...]],
    select: sql.Composed,
    params: list[Any],
    name: str,
) -> list[tuple[Any, ...]]:
    """The rows, locked FOR SHARE if the role may (that needs UPDATE privilege)."""
    try:
        with conn.transaction():  # a savepoint: a refused lock leaves the outer one usable
            return conn.execute(select + sql.SQL(" FOR SHARE"), params).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        log.warning(
            "cannot lock the rows of %s to repair them (FOR SHARE needs UPDATE privilege): "
            "repairing without the lock; a change made meanwhile can reach the stream "
            "before its repair, so run verify again afterwards",
            name,
        )
        return conn.execute(select, params).fetchall()


def _now_pg() -> int:
    """Now, in PostgreSQL's microseconds since 2000-01-01 (a Change's commit time)."""
    return int(time.time() * 1e6) - PG_EPOCH_UNIX_MICROS


def _read_change(
    info: TableInfo, row: dict[str, Any], key_names: Sequence[str], lsn: int
) -> Change:
    return Change(
        op="read",
        table=info,
        key={k: row.get(k) for k in key_names},
        after=row,
        before=None,
        unchanged_toast=[],
        lsn=lsn,
        commit_lsn=lsn,
        xid=0,
        commit_ts=_now_pg(),
        index=0,
    )


def _json_round_trip(after: Mapping[str, Any]) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(after))  # type: ignore[no-any-return]


def _repair_delete(
    router: Router,
    target: _Table,
    key: str,
    stream_state: dict[str, Any],
    now_lsn: int,
    filters: ChangeFilters | None,
    settings: Settings,
) -> Any:
    """A delete for a row the table does not have (any more) but the stream still has.

    Its old row is what the stream last stated, already in published form (so it is not
    filtered again): all of it in the native envelope; the key and subject columns in
    the others, whose encoders expect the bridge's own values.
    """
    before: dict[str, Any] = dict(zip(target.key_names, orjson.loads(key), strict=True))
    if settings.envelope.format == "native":
        before = {**stream_state, **before}
    else:
        template = SubjectTemplate(settings.tables[target.name].subject)
        for column in template.placeholders:
            if column in stream_state and column not in before:
                before[column] = stream_state[column]
    info = target.table.info
    view = filters.published_table(info) if filters is not None else info
    change = Change(
        op="delete",
        table=view,
        key={k: before.get(k) for k in target.key_names},
        after=None,
        before=before,
        unchanged_toast=[],
        lsn=now_lsn,
        commit_lsn=now_lsn,
        xid=0,
        commit_ts=_now_pg(),
        index=0,
    )
    return router.route_change(change)


# --------------------------------------------------------------------------- result store


async def store_result(nc: NatsClient, stream: str, slot: str, summary: dict[str, Any]) -> None:
    js = nc.jetstream()
    try:
        kv = await js.key_value(RESULT_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        kv = await js.create_key_value(bucket=RESULT_BUCKET, history=10)
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


# --------------------------------------------------------------------------- the command


def _type_names(conn: psycopg.Connection[tuple[Any, ...]], info: TableInfo) -> tuple[str, ...]:
    rows = conn.execute(
        "SELECT format_type(t, m) FROM unnest(%s::oid[], %s::int[]) AS u(t, m)",
        (list(info.type_oids), list(info.type_modifiers or [-1] * len(info.type_oids))),
    ).fetchall()
    return tuple(str(r[0]) for r in rows)


def _count_rows(conn: psycopg.Connection[tuple[Any, ...]], table: SnapshotTable) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(table.sql_name)
    if table.where:
        query += sql.SQL(" WHERE ({})").format(sql.SQL(table.where))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _open_snapshot(
    settings: Settings, state: DatabaseState, names: Sequence[str]
) -> tuple[SnapshotReader, psycopg.Connection[tuple[Any, ...]], int, str, dict[str, SnapshotTable]]:
    conn = _connect(settings)
    try:
        reader = SnapshotReader(conn)
        reader.begin(None)
        row = conn.execute(
            "SELECT pg_current_wal_lsn()::text, pg_current_snapshot()::text"
        ).fetchone()
        assert row is not None
        lsn = parse_lsn(str(row[0]))
        tables = {
            name: reader.table(
                name,
                state.tables[name],
                tuple(state.key_columns.get(name, ())),
                type_aliases=state.type_aliases,
                where=settings.tables[name].where,
            )
            for name in names
        }
    except psycopg.Error as exc:
        conn.close()
        raise SetupError(f"cannot take the snapshot to verify: {first_line(exc)}") from None
    except BaseException:
        conn.close()
        raise
    return reader, conn, lsn, str(row[1]), tables


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
            _open_snapshot, settings, state, names
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
                    total = await asyncio.to_thread(_count_rows, conn, snapshot_tables[name])
                    fraction = options.sample / total if total else 1.0
                    keeps[name] = sample_predicate(fraction, seed)
            lsn_text = format_lsn(lsn)
            targets = {
                name: _Table(
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
            await _fold_stream(nc, settings, targets, lsn, visibility)
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
                    _compare_table,
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
            await _repair(settings, nc, targets, lsn_text, filters)
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


async def _repair(
    settings: Settings,
    nc: NatsClient,
    targets: Mapping[str, _Table],
    lsn_text: str,
    filters: ChangeFilters | None,
) -> None:
    router = Router(
        slot=settings.postgres.slot,
        table_subjects={name: t.subject for name, t in settings.tables.items()},
        message_subject=None,
        encoder=encoder_from_settings(settings),
    )
    conn = await asyncio.to_thread(_connect, settings)
    try:
        for target in targets.values():
            if not target.repairs:
                continue
            info = target.table.info
            # The converters take each type's text output, as the snapshot read it.
            for type_oid in set(info.type_oids):
                conn.adapters.register_loader(type_oid, TextLoader)
            target.type_names = await asyncio.to_thread(_type_names, conn, info)
            target.result.repaired = await _repair_table(
                conn, nc, settings, target, lsn_text, filters, router
            )
            log.info("republished %d keys of %s", target.result.repaired, target.name)
    finally:
        await asyncio.to_thread(conn.close)
