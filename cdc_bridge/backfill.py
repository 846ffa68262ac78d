"""Online backfills: re-send a table (or the rows a WHERE clause picks) while streaming.

``cdc-bridge backfill TABLE`` stores a request in the NATS KV bucket
``cdc-bridge-backfills`` (key ``<stream>.<slot>.<id>``). The bridge that holds the slot
polls the bucket and runs the requests one at a time, oldest first:

1. a *start* watermark tells the reader to track the table (``watermarks.py``);
2. per chunk of ``snapshot.chunk_size`` rows, in key order after the last acknowledged
   key: a *low* watermark, the chunk read in a ``REPEATABLE READ`` snapshot, a *high*
   watermark; the reader publishes the chunk inside the high watermark's transaction
   (op ``read``, ``Nats-Msg-Id`` ``<slot>:<its commit LSN>:<n>``), leaving out rows a
   concurrent transaction changed; the runner waits until the slot is confirmed past
   that transaction (every row acknowledged), then stores the progress in the record;
3. the record ends ``done``, ``cancelled`` (``cdc-bridge backfill --cancel``) or
   ``failed`` (with the error).

A crash or a reconnect loses only the chunk in flight: the next session resumes after
the last stored key. Its rows may then be published twice (under other ids), each time
in a state at least as new as the stream before it, so consumers that keep the latest
state per key converge. ``snapshot.max_rows_per_second`` paces the reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from psycopg import sql

from cdc_bridge.config import Settings
from cdc_bridge.errors import ConnectError, SetupError, SinkError, first_line
from cdc_bridge.kv import open_bucket
from cdc_bridge.metrics import BridgeMetrics
from cdc_bridge.provisioning import DatabaseState
from cdc_bridge.snapshot import (
    SnapshotReader,
    SnapshotTable,
    connect_for_reading,
    convert_row,
    pace_rows,
)
from cdc_bridge.watermarks import WATERMARK_PREFIX, ChunkRequest, Watermarks, XidSnapshot

__all__ = [
    "BACKFILL_BUCKET",
    "FINAL_STATUSES",
    "BackfillRecord",
    "BackfillRunner",
    "BackfillStore",
    "combined_where",
    "new_backfill_id",
]

log = logging.getLogger(__name__)

#: The NATS KV bucket holding backfill requests and their progress.
BACKFILL_BUCKET = "cdc-bridge-backfills"

FINAL_STATUSES = frozenset({"done", "cancelled", "failed"})

_KV_KEY_UNSAFE = re.compile(r"[^-_=a-zA-Z0-9]")
# Transactional: the commit flushes the WAL, so the walsender sends the watermark at
# once (a non-transactional one waits for the WAL writer, up to wal_writer_delay).
_EMIT = "SELECT pg_logical_emit_message(true, %s, %s)"


def new_backfill_id() -> str:
    """Sortable by request time: ``20261127T161502-3fa2``."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def combined_where(*clauses: str | None) -> str | None:
    """The clauses ANDed, each in parentheses (None if there are none)."""
    present = [c for c in clauses if c]
    return " AND ".join(f"({c})" for c in present) if present else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class BackfillRecord:
    """One backfill request and its progress, as stored in the KV bucket (JSON)."""

    id: str
    table: str
    where: str | None = None
    status: str = "pending"  # pending | running | done | cancelled | failed
    cancel_requested: bool = False
    requested_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None
    estimated_rows: int | None = None
    rows: int = 0  # rows read and published (acknowledged)
    dropped: int = 0  # rows left out: a concurrent change carried a newer state
    chunks: int = 0
    reread_chunks: int = 0
    last_key: list[str | None] | None = None
    key_columns: list[str] | None = None  # what last_key holds (the chunks' order)
    active_seconds: float = 0.0  # time spent running (for the rate), across sessions
    error: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> BackfillRecord:
        raw = orjson.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def rate(self) -> float | None:
        """Rows per second while running."""
        return self.rows / self.active_seconds if self.active_seconds > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        if not rate or self.estimated_rows is None:
            return None
        return max(0.0, (self.estimated_rows - self.rows - self.dropped) / rate)


class BackfillStore:
    """The backfill records of one (stream, slot) in the KV bucket."""

    def __init__(self, client: Any, *, stream: str, slot: str) -> None:
        self._js = client.jetstream()
        self._kv: Any = None
        self.prefix = f"{_KV_KEY_UNSAFE.sub('_', stream)}.{_KV_KEY_UNSAFE.sub('_', slot)}"

    def key(self, backfill_id: str) -> str:
        return f"{self.prefix}.{backfill_id}"

    async def _bucket(self, create: bool) -> Any:
        if self._kv is None:
            self._kv = await open_bucket(self._js, BACKFILL_BUCKET, create=create)
        return self._kv

    async def create(self, record: BackfillRecord) -> None:
        try:
            kv = await self._bucket(create=True)
            await kv.create(self.key(record.id), record.to_json())
        except Exception as exc:
            raise SinkError(
                f"cannot store the backfill request in NATS KV bucket {BACKFILL_BUCKET}: {exc}"
            ) from None

    async def get(self, backfill_id: str) -> tuple[BackfillRecord, int] | None:
        """The record and its revision (for :meth:`update`), or None."""
        try:
            kv = await self._bucket(create=False)
            if kv is None:
                return None
            try:
                entry = await kv.get(self.key(backfill_id))
            except KeyNotFoundError:
                return None
        except Exception as exc:
            raise SinkError(f"cannot read backfill {backfill_id} from NATS KV: {exc}") from None
        if not entry.value:
            return None
        return BackfillRecord.from_json(entry.value), entry.revision

    async def update(self, record: BackfillRecord, revision: int) -> int | None:
        """Store ``record`` if the stored one is still at ``revision``; the new revision,
        or None if someone else wrote it in between (read it again)."""
        try:
            kv = await self._bucket(create=True)
            return int(await kv.update(self.key(record.id), record.to_json(), last=revision))
        except KeyWrongLastSequenceError:
            return None
        except Exception as exc:
            raise SinkError(f"cannot store backfill {record.id} in NATS KV: {exc}") from None

    async def last_sequence(self) -> int:
        """The bucket's newest write (0 without a bucket): unchanged, nothing to look at."""
        try:
            kv = await self._bucket(create=False)
            if kv is None:
                return 0
            status = await kv.status()
        except Exception as exc:
            raise SinkError(f"cannot read NATS KV bucket {BACKFILL_BUCKET}: {exc}") from None
        return int(status.stream_info.state.last_seq)

    async def all(self) -> list[tuple[BackfillRecord, int]]:
        """Every record of this stream and slot, oldest request first.

        Listed from the bucket's stream (its subjects, then one get per key), not with a
        KV watcher: nats-py's watcher can signal "no more" before the first entries it
        was sent, and a listing that comes back empty by mistake would leave a request
        unseen.
        """
        try:
            kv = await self._bucket(create=False)
            if kv is None:
                return []
            subject_prefix = f"$KV.{BACKFILL_BUCKET}."
            info = await self._js.stream_info(
                f"KV_{BACKFILL_BUCKET}", subjects_filter=f"{subject_prefix}{self.prefix}.*"
            )
            found: list[tuple[BackfillRecord, int]] = []
            for subject in info.state.subjects or {}:
                try:
                    entry = await kv.get(subject[len(subject_prefix) :])
                except KeyNotFoundError:
                    continue  # deleted since
                if entry.value:
                    found.append((BackfillRecord.from_json(entry.value), entry.revision))
        except Exception as exc:
            raise SinkError(f"cannot list backfills in NATS KV: {exc}") from None
        found.sort(key=lambda item: item[0].id)
        return found


# --------------------------------------------------------------------------- the runner


class _Cancelled(Exception):
    pass


class BackfillRunner:
    """Runs the backfill requests of this bridge's slot, one at a time (a session task).

    Its failures never stop the stream: a backfill whose table or WHERE clause fails is
    marked ``failed``; a lost connection leaves it ``running`` for the next attempt.
    """

    def __init__(
        self,
        settings: Settings,
        state: DatabaseState,
        store: BackfillStore,
        watermarks: Watermarks,
        confirmed_lsn: Callable[[], int],
        metrics: BridgeMetrics,
        *,
        poll_interval: float = 1.0,
    ) -> None:
        self.settings = settings
        self.state = state
        self.store = store
        self.watermarks = watermarks
        self.confirmed_lsn = confirmed_lsn
        self.metrics = metrics
        self.poll_interval = poll_interval
        self._looked_at = -1  # the bucket's last sequence when it held nothing to run

    async def run(self) -> None:
        while True:
            try:
                record = await self._next()
                if record is None:
                    await asyncio.sleep(self.poll_interval)
                    continue
                await self._run(*record)
            except asyncio.CancelledError:
                raise
            except _Cancelled:  # its record was deleted by hand
                continue
            except (ConnectError, SinkError) as exc:
                log.warning("backfill paused: %s; retrying", exc)
                await asyncio.sleep(max(self.poll_interval, 5.0))
            except Exception as exc:  # never the stream's end: log it, try again later
                log.warning("backfill paused: unexpected %s: %s", type(exc).__name__, exc)
                log.debug("backfill error", exc_info=True)
                await asyncio.sleep(max(self.poll_interval, 5.0))
            finally:
                self.watermarks.stop()
                self.metrics.backfill_table = None

    async def _next(self) -> tuple[BackfillRecord, int] | None:
        # A listing is a consumer on the bucket: only when something was written.
        sequence = await self.store.last_sequence()
        if sequence == self._looked_at:
            return None
        for record, revision in await self.store.all():
            if not record.final:
                return record, revision
        self._looked_at = sequence
        return None

    async def _save(self, record: BackfillRecord, revision: int) -> int:
        """Store progress; a concurrent write (a cancel request) is merged in."""
        while True:
            stored = await self.store.update(record, revision)
            if stored is not None:
                return stored
            current = await self.store.get(record.id)
            if current is None:
                raise _Cancelled  # deleted by hand
            fresh, revision = current
            if fresh.cancel_requested:
                record.cancel_requested = True

    async def _run(self, record: BackfillRecord, revision: int) -> None:
        settings = self.settings
        table_settings = settings.tables.get(record.table)
        catalog = self.state.tables.get(record.table)
        if record.cancel_requested:
            record.status, record.finished_at = "cancelled", _now()
            await self._save(record, revision)
            return
        if table_settings is None or catalog is None:
            record.status, record.finished_at = "failed", _now()
            record.error = f"table {record.table} is not in this bridge's tables:"
            await self._save(record, revision)
            return
        resumed = record.status == "running"
        record.status = "running"
        record.started_at = record.started_at or _now()
        revision = await self._save(record, revision)
        log.info(
            "%s backfill %s of %s%s",
            "resuming" if resumed else "starting",
            record.id,
            record.table,
            f" where {record.where}" if record.where else "",
            extra={"table": record.table},
        )
        reader = await asyncio.to_thread(self._connect)
        try:
            table = await asyncio.to_thread(
                reader.table,
                record.table,
                catalog,
                tuple(self.state.key_columns.get(record.table, ())),
                type_aliases=self.state.type_aliases,
                where=combined_where(table_settings.where, record.where),
                by_identity=True,
            )
            if record.key_columns != list(table.page_columns):
                if record.last_key is not None:  # the table's key changed since
                    log.warning(
                        "backfill %s: %s is now read by (%s), not (%s): starting over",
                        record.id,
                        record.table,
                        ", ".join(table.page_columns),
                        ", ".join(record.key_columns or ()),
                    )
                record.key_columns, record.last_key = list(table.page_columns), None
            if record.estimated_rows is None:
                record.estimated_rows = await asyncio.to_thread(_estimate, reader, table)
            self.metrics.backfill_table = record.table
            self.metrics.backfill_estimated = record.estimated_rows or 0
            self.metrics.backfill_done = record.rows + record.dropped
            self.metrics.backfill_seconds = record.active_seconds
            await self._start(reader, table)
            revision = await self._chunks(reader, table, record, revision)
            record.status, record.finished_at = "done", _now()
        except _Cancelled:
            record.status, record.finished_at = "cancelled", _now()
            log.info("backfill %s of %s cancelled", record.id, record.table)
        except (psycopg.Error, SetupError) as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise ConnectError(f"PostgreSQL connection lost: {first_line(exc)}") from None
            record.status, record.finished_at = "failed", _now()
            record.error = first_line(exc)
            log.warning("backfill %s of %s failed: %s", record.id, record.table, record.error)
        finally:
            await asyncio.to_thread(reader.close)
        with contextlib.suppress(_Cancelled):
            await self._save(record, revision)
        if record.status == "done":
            log.info(
                "backfill %s of %s done: %d rows published, %d left out for newer changes, "
                "in %.1fs (%.0f rows/s)",
                record.id,
                record.table,
                record.rows,
                record.dropped,
                record.active_seconds,
                record.rate or 0.0,
                extra={"table": record.table},
            )

    def _connect(self) -> SnapshotReader:
        return SnapshotReader(
            connect_for_reading(
                self.settings.conninfo(),
                connect_timeout=self.settings.postgres.connect_timeout,
                application_name="cdc-bridge backfill",
            )
        )

    async def _emit(self, reader: SnapshotReader, token: str, mark: str) -> None:
        content = Watermarks.content(self.watermarks.slot, token, mark)
        await asyncio.to_thread(reader.execute, _EMIT, (WATERMARK_PREFIX, content))

    async def _start(self, reader: SnapshotReader, table: SnapshotTable) -> None:
        """Have the reader track the table from a start watermark on."""
        token = secrets.token_hex(8)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.watermarks.starts[token] = (future, table.info.oid, table.page_columns)
        await self._emit(reader, token, "start")
        await future

    async def _chunks(
        self, reader: SnapshotReader, table: SnapshotTable, record: BackfillRecord, revision: int
    ) -> int:
        snapshot_settings = self.settings.snapshot
        chunk_size = snapshot_settings.chunk_size
        pace = snapshot_settings.max_rows_per_second
        metrics = self.metrics
        loop = asyncio.get_running_loop()
        while True:
            current = await self.store.get(record.id)
            if current is None or current[0].cancel_requested:
                raise _Cancelled
            revision = current[1]
            started = time.monotonic()
            token = secrets.token_hex(8)
            chunk = ChunkRequest(token, record.id, result=loop.create_future())
            self.watermarks.chunks[token] = chunk
            await self._emit(reader, token, "low")
            snapshot_text, rows = await asyncio.to_thread(
                reader.page_in_snapshot, table, record.last_key, chunk_size
            )
            info = table.info
            chunk.table = info
            chunk.snapshot = XidSnapshot.parse(snapshot_text)
            chunk.rows = [convert_row(info.column_names, info.converters, r) for r in rows]
            await self._emit(reader, token, "high")
            assert chunk.result is not None
            outcome = await chunk.result
            if outcome is None:
                table = await asyncio.to_thread(
                    reader.table,
                    record.table,
                    self.state.tables[record.table],
                    table.info.key_names,
                    type_aliases=self.state.type_aliases,
                    where=table.where,
                    by_identity=True,
                )  # in its new shape, if that was why
                record.reread_chunks += 1
                metrics.backfill_reread_chunks += 1
                log.info(
                    "backfill %s: reading chunk %d of %s again (the table changed shape, a "
                    "row it cannot name was touched, or a transaction older than the "
                    "backfill was not visible yet)",
                    record.id,
                    record.chunks,
                    record.table,
                )
                continue
            # Every row acknowledged (and all before them): polled, because the
            # checkpointer's one advance callback belongs to the status sender.
            while self.confirmed_lsn() <= outcome.high_lsn:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if rows:
                record.last_key = [rows[-1][i] for i in table.page_positions]
            record.rows += outcome.published
            record.dropped += outcome.dropped
            record.chunks += 1
            metrics.backfill_rows += outcome.published
            metrics.backfill_dropped += outcome.dropped
            metrics.backfill_chunks += 1
            await pace_rows(len(rows), started, pace)
            record.active_seconds += time.monotonic() - started
            metrics.backfill_done = record.rows + record.dropped
            metrics.backfill_seconds = record.active_seconds
            if len(rows) < chunk_size:
                return revision
            revision = await self._save(record, revision)


def _estimate(reader: SnapshotReader, table: SnapshotTable) -> int:
    """The planner's estimate of the rows to backfill (cheap, even on a big table)."""
    query = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {}{}").format(
        table.sql_name,
        sql.SQL(" WHERE ") + sql.SQL(table.where) if table.where else sql.SQL(""),
    )
    row = reader.execute(query).fetchone()
    assert row is not None
    plan = row[0]
    if isinstance(plan, str):
        plan = orjson.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])
