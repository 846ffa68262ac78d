"""The hot loop: replication frames → pgoutput messages → events → messages → publishes.

One :class:`WalReader` per session. It owns nothing but the per-transaction state (the
open ticket, wal2json markers, the read-back's skip list); the session hands it the
source, sink, checkpointer, publisher, assembler and routers it wires up.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import orjson

from cdc_bridge.batching import TransactionPublisher
from cdc_bridge.changes import (
    Change,
    ChangeAssembler,
    SchemaChange,
    TransactionBegin,
    TransactionEnd,
    read_change,
)
from cdc_bridge.checkpoint import Checkpointer, TransactionTicket
from cdc_bridge.config import Settings
from cdc_bridge.envelopes import wal2json_begin, wal2json_commit
from cdc_bridge.errors import (
    DecodeError,
    PublishError,
)
from cdc_bridge.filters import build_filters
from cdc_bridge.lsn import format_lsn
from cdc_bridge.metrics import BridgeMetrics
from cdc_bridge.oversized import PayloadLimit
from cdc_bridge.pgoutput import PG_EPOCH_UNIX_MICROS, PrimaryKeepalive, Relation, decode_message
from cdc_bridge.readback import (
    BEGIN_MARKER_INDEX,
    COMMIT_MARKER_INDEX,
    Position,
    ReadBack,
)
from cdc_bridge.router import OutgoingMessage, Router
from cdc_bridge.sink import JetStreamSink
from cdc_bridge.source import ReplicationSource
from cdc_bridge.watermarks import WATERMARK_PREFIX, ChunkOutcome, ChunkRequest, Watermarks

if TYPE_CHECKING:
    from cdc_bridge.pipeline import BridgeStats

__all__ = ["WalReader"]

log = logging.getLogger(__name__)

# PostgreSQL timestamps count microseconds from 2000-01-01; this turns them into unix time.
_PG_EPOCH_UNIX = PG_EPOCH_UNIX_MICROS / 1e6


class WalReader:
    """The hot loop: frame → pgoutput message → events → messages → publishes."""

    def __init__(
        self,
        settings: Settings,
        source: ReplicationSource,
        sink: JetStreamSink[TransactionTicket],
        checkpointer: Checkpointer,
        publisher: TransactionPublisher,
        assembler: ChangeAssembler,
        router: Router,
        heartbeat_router: Router | None,
        stats: BridgeStats,
        metrics: BridgeMetrics,
        stored: ReadBack | None,
        watermarks: Watermarks | None = None,
    ) -> None:
        self.source = source
        self.sink = sink
        self.checkpointer = checkpointer
        self.publisher = publisher
        self.assembler = assembler
        self.router = router
        self.heartbeat_router = heartbeat_router
        self.stats = stats
        self.metrics = metrics
        self.slot = settings.postgres.slot
        self.heartbeat_prefix = settings.heartbeat.prefix
        self.limit = PayloadLimit.from_settings(settings, sink, metrics, atomic=publisher.atomic)
        # What the stream holds already of what the slot sends again: not re-sent.
        self.stored = stored
        envelope = settings.envelope
        # wal2json's transaction markers: their include_* options, or None when off.
        self.markers: dict[str, bool] | None = (
            {
                "include_xids": envelope.include_xids,
                "include_timestamp": envelope.include_timestamp,
                "include_lsn": envelope.include_lsn,
            }
            if envelope.transaction_markers
            else None
        )
        self.markers_subject = envelope.markers_subject
        self.transaction: TransactionBegin | None = None
        self.begin_marked = False  # the open transaction's B marker went out (or was there)
        # None when no table filters or masks anything: then changes cost nothing here.
        self.filters = build_filters(settings.tables)
        # Online backfills' watermarks (backfill.py); None: no backfills in this session.
        self.watermarks = watermarks

    async def _open(self, ticket: TransactionTicket) -> None:
        """Before the first message of a transaction: its B marker (markers are on; the
        callers check, so that the hot path creates no coroutine per change without them).

        Called before that message's read-back check, so that the marker is checked in
        stream order too (it precedes every message of its transaction).
        """
        if not self.begin_marked:
            self.begin_marked = True
            await self._marker("B", ticket, 0)

    async def _marker(self, kind: str, ticket: TransactionTicket, end_lsn: int) -> None:
        """wal2json's B or C marker of the open transaction (``envelope.transaction_markers``)."""
        transaction, options = self.transaction, self.markers
        assert transaction is not None
        assert options is not None
        index = BEGIN_MARKER_INDEX if kind == "B" else COMMIT_MARKER_INDEX
        if self._already_stored(transaction.commit_lsn, index):
            return
        if kind == "B":
            body = wal2json_begin(
                transaction.xid, transaction.commit_ts, transaction.commit_lsn, **options
            )
        else:
            body = wal2json_commit(
                transaction.xid, transaction.commit_ts, transaction.commit_lsn, end_lsn, **options
            )
        commit_lsn = format_lsn(transaction.commit_lsn)
        headers = {
            "Nats-Msg-Id": f"{self.slot}:{commit_lsn}:{kind}",
            "Cdc-Op": "begin" if kind == "B" else "commit",
            "Cdc-Commit-Lsn": commit_lsn,
        }
        await self.publisher.add(OutgoingMessage(self.markers_subject, headers, body), ticket)

    def _already_stored(self, lsn: int, index: int) -> bool:
        stored = self.stored
        if stored is None:
            return False
        position = Position(lsn, index)
        held = stored.holds(position)
        if held is None:
            self.stored = None  # past the newest stored message: everything is new
            return False
        if held:
            self.metrics.already_published += 1
            return True
        log.warning(
            "re-sending %s: the stream lacks it but holds later changes (JetStream refused "
            "it earlier?); it lands after them",
            position,
            extra={"lsn": format_lsn(lsn)},
        )
        return False

    async def _publish_chunk(
        self, chunk: ChunkRequest, ticket: TransactionTicket, lsn: int
    ) -> None:
        """A backfill chunk at its high watermark (message ``lsn``): its rows that no
        concurrent change overtook, as op ``read`` messages of the watermark's own
        transaction, so that they are confirmed with it."""
        assert self.watermarks is not None
        assert chunk.result is not None
        transaction = self.transaction
        assert transaction is not None
        rows = self.watermarks.select(chunk)
        info = chunk.table
        if rows is None or info is None:
            chunk.result.set_result(None)  # read it again
            return
        if self.markers is not None:
            await self._open(ticket)
        filters, router, publisher = self.filters, self.router, self.publisher
        commit_lsn = transaction.commit_lsn
        commit_text = format_lsn(commit_lsn)
        published = 0
        for row in rows:
            change = read_change(
                info,
                row,
                lsn=lsn,
                commit_lsn=commit_lsn,
                xid=transaction.xid,
                commit_ts=transaction.commit_ts,
                # After the watermark message's own index (0): a position of its own.
                index=published + 1,
            )
            if filters is not None and not filters.apply(change):
                continue
            outgoing = router.route_read(change, f"{self.slot}:{commit_text}:{published + 1}")
            if outgoing is None:
                continue
            outgoing.headers["Cdc-Backfill"] = chunk.backfill_id
            try:
                outgoing = self.limit.fit(outgoing, info.qualified_name, change.key)
            except PublishError:
                await publisher.flush()
                raise
            await publisher.add(outgoing, ticket)
            published += 1
        chunk.result.set_result(ChunkOutcome(commit_lsn, published, len(chunk.rows) - len(rows)))

    async def run(self) -> None:
        source, sink, checkpointer, publisher = (
            self.source,
            self.sink,
            self.checkpointer,
            self.publisher,
        )
        router, stats, metrics = self.router, self.stats, self.metrics
        filters = self.filters
        watermarks = self.watermarks
        recent_commits = watermarks.recent_commits if watermarks is not None else None
        ticket: TransactionTicket | None = None
        unrouted: set[int] = set()  # relations already warned about
        kinds = metrics.pgoutput_messages
        table_ops: dict[int, dict[str, int]] = {}  # relation OID → its op counters
        monotonic = time.monotonic

        async def idle() -> None:
            # No more WAL at hand: commit the batch of the transactions read so far
            # (never in the middle of one).
            if ticket is None:
                await publisher.flush()

        while True:
            frame = await source.read_frame(idle)
            metrics.last_progress = monotonic()
            if type(frame) is PrimaryKeepalive:
                metrics.server_wal_end = frame.wal_end
                checkpointer.keepalive(frame.wal_end)
                if checkpointer.idle:
                    metrics.caught_up_time = frame.send_time / 1e6 + _PG_EPOCH_UNIX
                if frame.reply_requested:
                    await source.send_status(flush_lsn=checkpointer.confirmed_lsn)
                continue
            message = decode_message(frame.payload)  # type: ignore[union-attr]
            kinds[type(message)] += 1
            if type(message) is Relation:
                router.forget_table(message.oid)
                unrouted.discard(message.oid)
                table_ops.pop(message.oid, None)  # its name may have changed
            for event in self.assembler.feed(message, frame.wal_start):  # type: ignore[union-attr]
                if isinstance(event, Change):
                    if watermarks is not None:  # a backfill's reads must not overtake it
                        tracker = watermarks.tracker
                        if tracker is not None and event.table.oid == tracker.oid:
                            tracker.observe(event)
                    # ops, columns, masks; a change left out still ends its transaction.
                    if filters is not None and not filters.apply(event):
                        metrics.filtered_changes += 1
                        continue
                    outgoing = router.route_change(event)
                    if outgoing is None:
                        metrics.skipped_changes += 1
                        if event.table.oid not in unrouted:
                            unrouted.add(event.table.oid)
                            log.warning(
                                "skipping changes of %s: it is in the publication but not in "
                                "tables: (renamed, or added to the publication by hand?)",
                                event.table.qualified_name,
                                extra={
                                    "table": event.table.qualified_name,
                                    "lsn": format_lsn(event.lsn),
                                },
                            )
                        continue
                    if ticket is None:
                        raise DecodeError("row change outside a transaction")
                    if self.markers is not None:
                        await self._open(ticket)
                    if self._already_stored(event.commit_lsn, event.index):
                        continue
                    table = event.table.qualified_name
                    try:
                        outgoing = self.limit.fit(outgoing, table, event.key)
                    except PublishError:
                        # Stop exactly at this change: what came before it goes out
                        # (and is confirmed), nothing after it.
                        await publisher.flush()
                        raise
                    await publisher.add(outgoing, ticket)
                    stats.changes += 1
                    ops = table_ops.get(event.table.oid)
                    if ops is None:
                        ops = table_ops[event.table.oid] = metrics.table_ops(table)
                    ops[event.op] += 1
                elif isinstance(event, SchemaChange):
                    if watermarks is not None:  # a backfill chunk read in the old shape
                        tracker = watermarks.tracker
                        if tracker is not None and event.after.oid == tracker.oid:
                            tracker.reshape()
                    if filters is not None:  # never show a left-out column, even by name
                        event = dataclasses.replace(
                            event,
                            before=filters.published_table(event.before),
                            after=filters.published_table(event.after),
                        )
                    outgoing = router.route_schema_change(event)
                    log.info(
                        "%s changed shape: %s",
                        event.after.qualified_name,
                        _describe_schema_change(event),
                        extra={"table": event.after.qualified_name, "lsn": format_lsn(event.lsn)},
                    )
                    if outgoing is not None:
                        if ticket is None:
                            raise DecodeError("schema change outside a transaction")
                        if self.markers is not None:
                            await self._open(ticket)
                        await publisher.add(outgoing, ticket)
                elif isinstance(event, TransactionBegin):
                    ticket = checkpointer.begin()
                    ticket.commit_time = event.commit_ts / 1e6 + _PG_EPOCH_UNIX
                    self.transaction = event
                    self.begin_marked = False
                elif isinstance(event, TransactionEnd):
                    if ticket is None:
                        raise DecodeError("Commit without Begin")
                    if self.begin_marked:
                        await self._marker("C", ticket, event.end_lsn)
                    # Kept open for the next transactions while WAL keeps coming;
                    # committed by ``idle`` when the reader has to wait.
                    await publisher.end(ticket, flush=False)
                    checkpointer.commit(ticket, event.end_lsn)
                    ticket = None
                    if recent_commits is not None and self.transaction is not None:
                        recent_commits.append(self.transaction.xid)
                    stats.transactions += 1
                    metrics.transactions += 1
                else:
                    if event.prefix == WATERMARK_PREFIX:
                        # Transactional (their commit flushes the WAL, so they arrive
                        # at once); never published themselves.
                        chunk = (
                            watermarks.on_message(event.content, event.lsn)
                            if watermarks is not None and ticket is not None
                            else None
                        )
                        if chunk is not None:
                            assert ticket is not None
                            await self._publish_chunk(chunk, ticket, event.lsn)
                        continue
                    if event.prefix == self.heartbeat_prefix:
                        # Ours are published only with heartbeat.publish; others' never.
                        outgoing = (
                            self.heartbeat_router.route_message(event)
                            if self.heartbeat_router is not None
                            and _is_own_heartbeat(event.content, self.slot)
                            else None
                        )
                    else:
                        outgoing = router.route_message(event)
                    if outgoing is None:
                        continue
                    index = event.index if event.transactional else -1
                    if event.transactional:
                        if ticket is None:
                            raise DecodeError("transactional message outside a transaction")
                        if self.markers is not None:
                            await self._open(ticket)
                    if self._already_stored(event.commit_lsn, index):
                        continue
                    outgoing = self.limit.fit(outgoing, None, None)
                    if ticket is not None and event.transactional:
                        await publisher.add(outgoing, ticket)
                    else:
                        owner = checkpointer.standalone(event.lsn)
                        checkpointer.published(owner)
                        await publisher.flush()  # what came before it goes first
                        await sink.publish(outgoing.subject, outgoing.body, outgoing.headers, owner)


def _describe_schema_change(event: SchemaChange) -> str:
    parts = []
    if event.before.qualified_name != event.after.qualified_name:
        parts.append(f"renamed from {event.before.qualified_name}")
    for what, names in (
        ("added", event.added),
        ("dropped", event.dropped),
        ("type changed", event.type_changed),
    ):
        if names:
            parts.append(f"{what} {', '.join(names)}")
    parts.extend(f"renamed {old} to {new}" for old, new in event.renamed.items())
    if event.before.key_names != event.after.key_names:
        parts.append(f"key now ({', '.join(event.after.key_names)})")
    if event.before.replica_identity != event.after.replica_identity:
        parts.append(f"replica identity now {event.after.replica_identity}")
    return "; ".join(parts) or "column flags changed"


def _is_own_heartbeat(content: bytes, slot: str) -> bool:
    """Whether a heartbeat message was written by a bridge on our slot."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and body.get("slot") == slot
