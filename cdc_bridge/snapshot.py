"""The initial snapshot: the rows already in the tables, consistent with the slot.

When the bridge creates the slot (``snapshot.mode: initial``), it creates it over a
replication connection with ``CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')``, imports the
exported snapshot into a ``REPEATABLE READ`` transaction on a second connection, and reads
every configured table there, in primary-key order, one keyset page (``chunk_size`` rows)
at a time. Those rows are the tables exactly as of the slot's consistent point, so the
snapshot plus the changes the slot streams afterwards is the table: no gap, no overlap.
Each row is published as a change with op ``read``; streaming starts only after the
whole snapshot is acknowledged (the slot holds the WAL meanwhile).

Progress is kept in the NATS KV bucket ``cdc-bridge-snapshots`` (key: stream and slot),
written after each chunk's PubAcks. A crash loses the exported snapshot; the next start
finds the slot and an unfinished record, and resumes after the last acknowledged key in
a fresh ``REPEATABLE READ`` snapshot. Rows changed since the consistent point are then
read in their newer state, and the slot delivers those changes too, so every key still
ends in its latest state (README "Snapshots and backfills").

A session advisory lock per slot keeps a second bridge from snapshotting the same slot
at the same time; it waits, like a standby waits for the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from nats.js.errors import KeyNotFoundError
from psycopg import sql
from psycopg.types.string import TextLoader

from cdc_bridge.batching import TransactionPublisher
from cdc_bridge.changes import TableInfo, read_change
from cdc_bridge.checkpoint import Checkpointer, TransactionTicket
from cdc_bridge.errors import (
    ConnectError,
    PublishError,
    SetupError,
    SinkError,
    SlotBusyError,
    first_line,
)
from cdc_bridge.filters import ChangeFilters
from cdc_bridge.kv import open_bucket
from cdc_bridge.lsn import Lsn, format_lsn, parse_lsn
from cdc_bridge.metrics import BridgeMetrics
from cdc_bridge.oversized import PayloadLimit
from cdc_bridge.pgoutput import PG_EPOCH_UNIX_MICROS
from cdc_bridge.pgsecurity import connect_error_hint
from cdc_bridge.provisioning import TableCatalog
from cdc_bridge.router import Router
from cdc_bridge.sink import JetStreamSink
from cdc_bridge.source import SESSION_OPTIONS
from cdc_bridge.values import JsonValue, converter_for

__all__ = [
    "PROGRESS_BUCKET",
    "ProgressStore",
    "SnapshotReader",
    "SnapshotRecord",
    "SnapshotTarget",
    "connect_for_reading",
    "convert_row",
    "create_slot_exporting",
    "pace_rows",
    "run_snapshot",
    "snapshot_msg_id",
]

log = logging.getLogger(__name__)

#: The NATS KV bucket that holds each snapshot's progress.
PROGRESS_BUCKET = "cdc-bridge-snapshots"

# Replication commands: PostgreSQL 15 took options in parentheses; 14 only the keyword.
_OPTIONS_SYNTAX_VERSION = 150000

_KV_KEY_UNSAFE = re.compile(r"[^-/_=.a-zA-Z0-9]")


def snapshot_msg_id(slot: str, run: int, table: str, chunk: int, number: int) -> str:
    """``<slot>:snapshot:<run>:<table>:<chunk>:<n>``: not a WAL position, so the
    read-back passes over it. ``run`` counts snapshot attempts: a resumed snapshot reads
    other rows under the same chunk numbers, which must not be dropped as duplicates."""
    return f"{slot}:snapshot:{run}:{table}:{chunk}:{number}"


# --------------------------------------------------------------------------- progress


@dataclass
class TableProgress:
    last_key: list[str | None] | None = None  # the last acknowledged row's key, as text
    chunks: int = 0
    rows: int = 0
    done: bool = False


@dataclass
class SnapshotRecord:
    """One snapshot's progress, as stored in the KV bucket (JSON)."""

    slot: str
    mode: str
    run: int = 1
    lsn: str | None = None  # the slot's consistent point; None until the slot exists
    done: bool = False
    tables: dict[str, TableProgress] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "slot": self.slot,
                "mode": self.mode,
                "run": self.run,
                "lsn": self.lsn,
                "done": self.done,
                "tables": {
                    name: {
                        "last_key": p.last_key,
                        "chunks": p.chunks,
                        "rows": p.rows,
                        "done": p.done,
                    }
                    for name, p in self.tables.items()
                },
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> SnapshotRecord:
        raw: dict[str, Any] = orjson.loads(data)
        return cls(
            slot=str(raw["slot"]),
            mode=str(raw.get("mode", "initial")),
            run=int(raw.get("run", 1)),
            lsn=raw.get("lsn"),
            done=bool(raw.get("done", False)),
            tables={
                name: TableProgress(
                    last_key=p.get("last_key"),
                    chunks=int(p.get("chunks", 0)),
                    rows=int(p.get("rows", 0)),
                    done=bool(p.get("done", False)),
                )
                for name, p in raw.get("tables", {}).items()
            },
        )


class ProgressStore:
    """The progress record of one (stream, slot) in the KV bucket; the bucket is created
    on the first write, so a bridge that never snapshots never needs it."""

    def __init__(self, client: Any, *, stream: str, slot: str) -> None:
        self._js = client.jetstream()
        self._kv: Any = None
        self.key = _KV_KEY_UNSAFE.sub("_", f"{stream}.{slot}")

    async def _bucket(self, create: bool) -> Any:
        if self._kv is None:
            self._kv = await open_bucket(self._js, PROGRESS_BUCKET, create=create)
        return self._kv

    async def get(self) -> SnapshotRecord | None:
        try:
            kv = await self._bucket(create=False)
            if kv is None:
                return None
            try:
                entry = await kv.get(self.key)
            except KeyNotFoundError:
                return None
        except Exception as exc:
            raise SinkError(f"cannot read snapshot progress from NATS KV: {exc}") from None
        if not entry.value:
            return None
        return SnapshotRecord.from_json(entry.value)

    async def put(self, record: SnapshotRecord) -> None:
        try:
            kv = await self._bucket(create=True)
            await kv.put(self.key, record.to_json())
        except Exception as exc:
            raise SinkError(
                f"cannot store snapshot progress in NATS KV bucket {PROGRESS_BUCKET}: {exc}"
            ) from None


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class SnapshotTable:
    info: TableInfo
    sql_name: sql.Composable
    page_columns: tuple[str, ...]  # keyset order: the primary key (or the key)
    page_positions: tuple[int, ...]  # where they are among the selected columns
    where: str | None


def connect_for_reading(
    conninfo: str, *, connect_timeout: float, application_name: str
) -> psycopg.Connection[tuple[Any, ...]]:
    """An autocommit connection whose text output matches the walsender's (so values
    read from tables convert like streamed ones); :class:`ConnectError` with a hint."""
    try:
        return psycopg.connect(
            conninfo,
            autocommit=True,
            options=SESSION_OPTIONS,
            connect_timeout=max(1, math.ceil(connect_timeout)),
            application_name=application_name,
        )
    except psycopg.Error as exc:
        reason = first_line(exc)
        hint = connect_error_hint(reason) or "check postgres.dsn"
        raise ConnectError(f"cannot connect to PostgreSQL: {reason} ({hint})") from None


class SnapshotReader:
    """A ``REPEATABLE READ`` transaction reading tables page by page (blocking calls:
    run them in a thread). Values come back as PostgreSQL's text output, formatted with
    the walsender's settings, so they convert exactly like streamed values."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        self._conn = conn

    @classmethod
    def connect(cls, conninfo: str, *, slot: str, connect_timeout: float) -> SnapshotReader:
        """Connect and take the slot's snapshot lock (:class:`SlotBusyError` if held)."""
        conn = connect_for_reading(
            conninfo, connect_timeout=connect_timeout, application_name="cdc-bridge snapshot"
        )
        try:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtext('cdc-bridge snapshot'), hashtext(%s))",
                (slot,),
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        if not row or not row[0]:
            conn.close()
            raise SlotBusyError(f"another process is taking the snapshot of slot {slot!r}")
        return cls(conn)

    def begin(self, snapshot: str | None) -> None:
        """Open the transaction, in the exported ``snapshot`` if given (else a fresh one)."""
        conn = self._conn
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if snapshot is not None:
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        else:
            conn.execute("SELECT 1")  # the first query takes the snapshot

    def table(
        self,
        name: str,
        catalog: TableCatalog,
        key_names: Sequence[str],
        *,
        type_aliases: Mapping[int, int],
        where: str | None,
        by_identity: bool = False,
    ) -> SnapshotTable:
        """The columns pgoutput would send (generated ones are not), typed by OID.

        Pages go in primary-key order; with ``by_identity``, in the order of a REPLICA
        IDENTITY USING INDEX (the columns a streamed delete carries, which an online
        backfill needs to recognise the rows a delete touched).
        """
        conn = self._conn
        rows = conn.execute(
            """
            SELECT a.attrelid::int8, a.attname, a.atttypid::int8, a.atttypmod
            FROM pg_attribute a
            WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
              AND a.attgenerated = ''
            ORDER BY a.attnum
            """,
            (catalog.sql_name,),
        ).fetchall()
        oid = int(rows[0][0]) if rows else 0
        names = tuple(str(r[1]) for r in rows)
        type_oids = tuple(int(r[2]) for r in rows)
        for type_oid in set(type_oids):
            conn.adapters.register_loader(type_oid, TextLoader)  # the raw text output
        info = TableInfo(
            oid=oid,
            schema=catalog.schema,
            table=catalog.table,
            column_names=names,
            converters=tuple(converter_for(type_aliases.get(t, t)) for t in type_oids),
            type_oids=type_oids,
            key_names=tuple(key_names),
            identity_names=frozenset(catalog.identity_columns),
            replica_identity=catalog.replica_identity,
            config_name=name,
            type_modifiers=tuple(int(r[3]) for r in rows),
        )
        page_columns = catalog.primary_key or tuple(key_names)
        if by_identity and catalog.replica_identity == "i" and catalog.identity_columns:
            page_columns = tuple(catalog.identity_columns)
        missing = [c for c in page_columns if c not in names]
        if not page_columns or missing:
            raise SetupError(
                f"cannot read {name} in key order: it needs a primary key (or "
                f"tables.{name}.key) of stored columns (snapshots, backfills and verify read "
                "tables that way; snapshot.mode: never skips the initial snapshot)"
            )
        return SnapshotTable(
            info,
            sql.SQL("{}.{}").format(sql.Identifier(catalog.schema), sql.Identifier(catalog.table)),
            page_columns,
            tuple(names.index(c) for c in page_columns),
            where,
        )

    def page(
        self, table: SnapshotTable, after: Sequence[str | None] | None, limit: int
    ) -> list[tuple[str | None, ...]]:
        """Up to ``limit`` rows after key ``after`` (None: from the start), in key order."""
        keys = sql.SQL(", ").join(sql.Identifier(c) for c in table.page_columns)
        conditions: list[sql.Composable] = []
        if table.where:
            conditions.append(sql.SQL("({})").format(sql.SQL(table.where)))
        if after is not None:
            # Literals, not parameters: with none, a '%' in the WHERE clause stays itself.
            conditions.append(
                sql.SQL("({}) > ({})").format(
                    keys, sql.SQL(", ").join(sql.Literal(v) for v in after)
                )
            )
        query = sql.SQL(
            "SELECT {columns} FROM {table}{where} ORDER BY {keys} LIMIT {limit}"
        ).format(
            columns=sql.SQL(", ").join(sql.Identifier(c) for c in table.info.column_names),
            table=table.sql_name,
            where=(
                sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions)
                if conditions
                else sql.SQL("")
            ),
            keys=keys,
            limit=sql.Literal(limit),
        )
        return self._conn.execute(query).fetchall()

    def page_in_snapshot(
        self, table: SnapshotTable, after: Sequence[str | None] | None, limit: int
    ) -> tuple[str, list[tuple[str | None, ...]]]:
        """A page read in a fresh ``REPEATABLE READ`` snapshot, and that snapshot
        (``pg_current_snapshot()`` text) for the backfill's watermark bookkeeping."""
        conn = self._conn
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        try:
            row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
            assert row is not None
            rows = self.page(table, after, limit)
        finally:
            conn.execute("COMMIT")
        return str(row[0]), rows

    def execute(self, query: sql.Composable | str, params: Sequence[Any] | None = None) -> Any:
        """One statement outside any page (the backfill's watermarks, its estimate)."""
        return self._conn.execute(query, params)  # type: ignore[arg-type]

    def wal_position(self) -> int:
        """The server's current WAL position (for a snapshot without a slot)."""
        row = self._conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return parse_lsn(str(row[0]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()  # ends the transaction and releases the lock


def convert_row(
    names: Sequence[str],
    converters: Sequence[Callable[[str], JsonValue]],
    values: Sequence[str | None],
) -> dict[str, JsonValue]:
    """A row of text values (as the reader returns them) converted like streamed ones."""
    return {
        names[i]: None if value is None else converters[i](value) for i, value in enumerate(values)
    }


async def pace_rows(rows: int, started: float, rows_per_second: float) -> None:
    """Sleep so that ``rows`` read since ``started`` (monotonic) keep to the pace
    (``snapshot.max_rows_per_second``; 0: no limit)."""
    if rows_per_second > 0:
        await asyncio.sleep(max(0.0, rows / rows_per_second - (time.monotonic() - started)))


def _key_text(columns: Sequence[str], values: Sequence[str | None]) -> str:
    return orjson.dumps(dict(zip(columns, values, strict=True))).decode()


def create_slot_exporting(
    conninfo: str,
    slot: str,
    *,
    connect_timeout: float,
    before_create: Callable[[], None] = lambda: None,
) -> tuple[Lsn, SnapshotReader]:
    """Create ``slot`` exporting its snapshot, import it into a reader; return both.

    The exporting replication connection stays open until the reader's transaction has
    run ``SET TRANSACTION SNAPSHOT``, then it is closed (the imported snapshot stays
    valid for the importing transaction).
    """
    reader = SnapshotReader.connect(conninfo, slot=slot, connect_timeout=connect_timeout)
    try:
        before_create()
        with psycopg.connect(
            conninfo,
            replication="database",
            autocommit=True,
            connect_timeout=max(1, math.ceil(connect_timeout)),
            application_name="cdc-bridge",
        ) as replication:
            if replication.info.server_version >= _OPTIONS_SYNTAX_VERSION:
                options = sql.SQL("(SNAPSHOT 'export')")
            else:
                options = sql.SQL("EXPORT_SNAPSHOT")
            row = replication.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}").format(
                    sql.Identifier(slot), options
                )
            ).fetchone()
            assert row is not None
            reader.begin(str(row[2]))
        return parse_lsn(str(row[1])), reader
    except BaseException:
        reader.close()
        raise


# --------------------------------------------------------------------------- publishing


@dataclass(frozen=True, slots=True)
class SnapshotTarget:
    """A table to snapshot: its config name, catalog entry, key and row filter."""

    name: str
    catalog: TableCatalog
    key_names: tuple[str, ...]
    where: str | None


async def run_snapshot(
    reader: SnapshotReader,
    record: SnapshotRecord,
    store: ProgressStore,
    targets: Sequence[SnapshotTarget],
    *,
    lsn: int,
    slot: str,
    chunk_size: int,
    type_aliases: Mapping[int, int],
    router: Router,
    filters: ChangeFilters | None,
    sink: JetStreamSink[TransactionTicket],
    checkpointer: Checkpointer,
    publisher: TransactionPublisher,
    ack_timeout: float,
    stop: asyncio.Event,
    metrics: BridgeMetrics | None = None,
    rows_per_second: float = 0.0,
    limit: PayloadLimit | None = None,
) -> bool:
    """Publish every target's rows not yet acknowledged; True when the whole snapshot is.

    After each chunk: wait for its PubAcks, then store the progress. Returns False if
    ``stop`` was set (between chunks).
    """
    started = time.monotonic()
    total = 0
    commit_ts = int(time.time() * 1e6) - PG_EPOCH_UNIX_MICROS
    for target in targets:
        progress = record.tables.setdefault(target.name, TableProgress())
        if progress.done:
            continue
        table = await asyncio.to_thread(
            reader.table,
            target.name,
            target.catalog,
            target.key_names,
            type_aliases=type_aliases,
            where=target.where,
        )
        info = table.info
        if progress.last_key is not None:
            log.info(
                "resuming snapshot of %s after key %s (%d rows in %d chunks acknowledged)",
                target.name,
                _key_text(table.page_columns, progress.last_key),
                progress.rows,
                progress.chunks,
                extra={"table": target.name},
            )
        else:
            log.info("snapshot of %s starting", target.name, extra={"table": target.name})
        if metrics is not None:
            metrics.snapshotting = f"taking the initial snapshot ({target.name})"
            metrics.last_progress = time.monotonic()
        table_started = time.monotonic()
        table_rows = 0
        converters = info.converters
        names = info.column_names
        fetch = asyncio.create_task(
            asyncio.to_thread(reader.page, table, progress.last_key, chunk_size)
        )
        try:
            while True:
                rows = await fetch
                if not rows:
                    break
                last_key = [rows[-1][i] for i in table.page_positions]
                if len(rows) == chunk_size:  # read the next page while this one goes out
                    fetch = asyncio.create_task(
                        asyncio.to_thread(reader.page, table, last_key, chunk_size)
                    )
                chunk = progress.chunks
                chunk_started = time.monotonic()
                ticket = checkpointer.begin()
                for number, values in enumerate(rows):
                    change = read_change(
                        info,
                        convert_row(names, converters, values),
                        lsn=lsn,
                        commit_lsn=lsn,
                        xid=0,
                        commit_ts=commit_ts,
                        index=progress.rows + number,
                    )
                    if filters is not None and not filters.apply(change):
                        continue
                    outgoing = router.route_read(
                        change, snapshot_msg_id(slot, record.run, target.name, chunk, number)
                    )
                    if outgoing is None:
                        continue
                    if limit is not None:
                        try:
                            outgoing = limit.fit(outgoing, target.name, change.key)
                        except PublishError:
                            await publisher.flush()  # the rows before it go out first
                            raise
                    await publisher.add(outgoing, ticket)
                await publisher.end(ticket)
                checkpointer.commit(ticket, lsn)
                if not await sink.drain(ack_timeout):
                    sink.raise_if_failed()
                    raise SinkError(
                        f"the snapshot chunk {chunk} of {target.name} was not acknowledged "
                        f"within {ack_timeout}s"
                    )
                progress.chunks = chunk + 1
                progress.rows += len(rows)
                progress.last_key = last_key
                table_rows += len(rows)
                total += len(rows)
                if metrics is not None:
                    metrics.table_ops(target.name)["read"] += len(rows)
                    metrics.last_progress = time.monotonic()
                if len(rows) < chunk_size:
                    progress.done = True
                await store.put(record)
                if progress.done:
                    break
                if stop.is_set():
                    return False
                await pace_rows(len(rows), chunk_started, rows_per_second)
        finally:
            if not fetch.done():
                fetch.cancel()
            with contextlib.suppress(BaseException):
                await fetch
        if not progress.done:  # an empty last page
            progress.done = True
            await store.put(record)
        elapsed = time.monotonic() - table_started
        log.info(
            "snapshot of %s done: %d rows in this run, %d in all, in %.1fs (%.0f rows/s)",
            target.name,
            table_rows,
            progress.rows,
            elapsed,
            table_rows / elapsed if elapsed > 0 else 0.0,
            extra={"table": target.name},
        )
    record.done = True
    await store.put(record)
    elapsed = time.monotonic() - started
    log.info(
        "snapshot complete: %d rows published in %.1fs (%.0f rows/s), consistent with %s",
        total,
        elapsed,
        total / elapsed if elapsed > 0 else 0.0,
        format_lsn(lsn),
        extra={"lsn": format_lsn(lsn)},
    )
    return True
