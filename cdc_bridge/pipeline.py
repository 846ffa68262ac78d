"""The bridge: wires source → decoder → assembler → router → sink, and the checkpointer back.

Data flows one way. The reader task pulls CopyBoth frames, decodes them, turns them into
changes, routes and publishes them; PubAcks come back through the sink's callback into
the checkpointer; the status task sends the checkpointer's confirmed LSN to PostgreSQL on
a timer and soon after it moves. The only thing that talks back to PostgreSQL is that
confirmed LSN.

Shutdown (SIGTERM/SIGINT → ``stop``): stop reading, wait for in-flight PubAcks (bounded
by ``shutdown_timeout``), send a final status update, return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import orjson
from prometheus_client import CollectorRegistry

from cdc_bridge.changes import (
    Change,
    ChangeAssembler,
    TransactionBegin,
    TransactionEnd,
)
from cdc_bridge.checkpoint import Checkpointer, TransactionTicket
from cdc_bridge.config import HEARTBEAT_SUBJECT, Settings
from cdc_bridge.errors import DecodeError, SetupError
from cdc_bridge.heartbeat import run_heartbeat
from cdc_bridge.http_server import HttpServer
from cdc_bridge.logs import bind_log_context
from cdc_bridge.lsn import format_lsn
from cdc_bridge.metrics import BridgeMetrics, SlotCollector
from cdc_bridge.pgoutput import PG_EPOCH_UNIX_MICROS, PrimaryKeepalive, Relation, decode_message
from cdc_bridge.provisioning import DatabaseState, TableRequest, check_database, ensure_replication
from cdc_bridge.router import Router
from cdc_bridge.routing import SubjectTemplate
from cdc_bridge.sink import JetStreamSink, StreamSpec, stream_subjects
from cdc_bridge.source import ReplicationSource

__all__ = ["BridgeStats", "run_bridge", "stream_spec"]

log = logging.getLogger(__name__)

# After a status update, wait at least this long before the next one, so that a burst of
# commits costs a few status updates rather than one per transaction.
STATUS_COALESCE_SECONDS = 0.1

# PostgreSQL timestamps count microseconds from 2000-01-01; this turns them into unix time.
_PG_EPOCH_UNIX = PG_EPOCH_UNIX_MICROS / 1e6


@dataclass
class BridgeStats:
    """Counters a caller (the demo, tests) may watch while the bridge runs."""

    changes: int = 0
    transactions: int = 0
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    metrics_port: int | None = None  # where /metrics listens, once it does


def stream_spec(settings: Settings) -> StreamSpec:
    nats = settings.nats
    if nats.subjects:
        subjects = tuple(nats.subjects)
    else:
        filters = [SubjectTemplate(t.subject).stream_filter for t in settings.tables.values()]
        if settings.messages.publish:
            filters.append(SubjectTemplate(settings.messages.subject).stream_filter)
        if settings.heartbeat.publish:
            filters.append(HEARTBEAT_SUBJECT)
        subjects = stream_subjects(filters)
    return StreamSpec(
        name=nats.stream,
        subjects=subjects,
        create=nats.create_stream,
        storage=nats.storage,
        replicas=nats.replicas,
        max_age=nats.max_age,
        max_bytes=nats.max_bytes,
        duplicate_window=nats.duplicate_window,
    )


def table_requests(settings: Settings) -> dict[str, TableRequest]:
    return {
        name: TableRequest(table.subject, tuple(table.key) if table.key else None)
        for name, table in settings.tables.items()
    }


async def run_bridge(
    settings: Settings,
    *,
    stop: asyncio.Event,
    stats: BridgeStats | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """Stream changes until ``stop`` is set; raise a :class:`CdcBridgeError` on failure.

    With ``metrics.enabled``, /metrics, /livez and /readyz are served from before the
    first connection until the end. Metrics go to ``registry`` (default: a new one).
    """
    stats = stats or BridgeStats()
    registry = registry or CollectorRegistry()
    metrics = BridgeMetrics(
        registry,
        max_in_flight=settings.nats.max_in_flight,
        ready_timeout=settings.metrics.ready_timeout,
    )
    # A callable: with postgres.iam_auth every connect needs a fresh token.
    registry.register(SlotCollector(settings.conninfo, settings.postgres.slot))
    server: HttpServer | None = None
    if settings.metrics.enabled:
        host, port = settings.metrics.host, settings.metrics.port
        server = HttpServer(
            host=host, port=port, registry=registry, readiness=metrics.readiness_problem
        )
        try:
            await server.start()
        except OSError as exc:
            raise SetupError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} "
                "(change metrics.port, or set metrics.enabled: false)"
            ) from None
        stats.metrics_port = server.port
        log.info("serving /metrics, /livez and /readyz on %s:%d", host, server.port)
    try:
        await _run(settings, stop, stats, metrics)
    finally:
        if server is not None:
            await server.close()


async def _run(
    settings: Settings, stop: asyncio.Event, stats: BridgeStats, metrics: BridgeMetrics
) -> None:
    pg = settings.postgres
    bind_log_context(slot=pg.slot)  # on every record of this task and the tasks it starts
    progress = asyncio.Event()
    checkpointer: Checkpointer | None = None

    def on_ack(ticket: TransactionTicket, duplicate: bool) -> None:
        assert checkpointer is not None
        checkpointer.acked(ticket)
        commit_time = ticket.commit_time
        if commit_time:
            metrics.acked_commit_time = commit_time
            metrics.commit_to_ack.observe(time.time() - commit_time)

    # NATS first: a bridge that cannot publish should not create a slot that pins WAL.
    sink: JetStreamSink[TransactionTicket] = await JetStreamSink.connect(
        settings.nats,
        on_ack=on_ack,
        max_in_flight=settings.nats.max_in_flight,
        ack_timeout=settings.nats.ack_timeout,
        metrics=metrics,
    )
    metrics.sink = sink
    try:
        # Check everything before creating anything (stream, publication, slot).
        state: DatabaseState = await asyncio.to_thread(
            check_database,
            settings.conninfo(),
            tables=table_requests(settings),
            connect_timeout=pg.connect_timeout,
        )
        await sink.ensure_stream(stream_spec(settings))
        confirmed, _ = await asyncio.to_thread(
            ensure_replication,
            settings.conninfo(),
            state,
            slot=pg.slot,
            publication=pg.publication,
            create_if_missing=pg.create_if_missing,
            connect_timeout=pg.connect_timeout,
        )
        checkpointer = Checkpointer(confirmed, on_advance=progress.set)
        metrics.checkpoint = checkpointer
        source = await ReplicationSource.open(
            settings.conninfo(),
            slot=pg.slot,
            publication=pg.publication,
            start_lsn=confirmed,
            connect_timeout=pg.connect_timeout,
            metrics=metrics,
        )
        metrics.source = source
        metrics.last_progress = time.monotonic()
        try:
            await _stream(
                settings, state, source, sink, checkpointer, progress, stop, stats, metrics
            )
        finally:
            await source.close()
    finally:
        await sink.close()


async def _stream(
    settings: Settings,
    state: DatabaseState,
    source: ReplicationSource,
    sink: JetStreamSink[TransactionTicket],
    checkpointer: Checkpointer,
    progress: asyncio.Event,
    stop: asyncio.Event,
    stats: BridgeStats,
    metrics: BridgeMetrics,
) -> None:
    heartbeat = settings.heartbeat
    heartbeat_router = (
        Router(slot=settings.postgres.slot, table_subjects={}, message_subject=HEARTBEAT_SUBJECT)
        if heartbeat.publish
        else None
    )
    router = Router(
        slot=settings.postgres.slot,
        table_subjects={name: t.subject for name, t in settings.tables.items()},
        message_subject=settings.messages.subject if settings.messages.publish else None,
    )
    assembler = ChangeAssembler(key_columns=state.key_columns)
    reader = asyncio.create_task(
        _read(
            source,
            sink,
            checkpointer,
            assembler,
            router,
            stats,
            metrics,
            heartbeat.prefix,
            heartbeat_router,
            settings.postgres.slot,
        ),
        name="wal-reader",
    )
    status = asyncio.create_task(
        _send_status(source, checkpointer, progress, settings.postgres.status_interval),
        name="standby-status",
    )
    failure = asyncio.create_task(sink.wait_failed(), name="sink-failure")
    stopped = asyncio.create_task(stop.wait(), name="stop")
    # Never ends by itself, and its failures are only warnings: not waited on below.
    beat: asyncio.Task[None] | None = None
    if heartbeat.interval > 0:
        beat = asyncio.create_task(
            run_heartbeat(
                settings.conninfo,
                interval=heartbeat.interval,
                prefix=heartbeat.prefix,
                slot=settings.postgres.slot,
                metrics=metrics,
                connect_timeout=settings.postgres.connect_timeout,
            ),
            name="heartbeat",
        )
    stats.ready.set()
    log.info(
        "streaming slot %s from %s to stream %s",
        settings.postgres.slot,
        format_lsn(checkpointer.confirmed_lsn),
        settings.nats.stream,
        extra={"lsn": format_lsn(checkpointer.confirmed_lsn), "stream": settings.nats.stream},
    )
    error: BaseException | None = None
    try:
        done, _ = await asyncio.wait(
            {reader, status, failure, stopped}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (reader, status, failure):
            if task in done and error is None:
                error = task.exception() or RuntimeError(f"{task.get_name()} ended")
        # No more WAL; let what is in flight be acked, so that it can be confirmed. After
        # a failure only briefly: the acks may never come.
        reader.cancel()
        # The reader's own failure, if any, is already in `error`.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        timeout = (
            settings.shutdown_timeout if error is None else min(5.0, settings.shutdown_timeout)
        )
        if not await sink.drain(timeout):
            log.warning(
                "stopping with %d messages unacknowledged; they will be re-sent from the "
                "slot at the next start",
                sink.in_flight,
            )
    finally:
        tasks: list[asyncio.Future[object]] = [reader, status, failure, stopped]  # type: ignore[list-item]
        if beat is not None:
            tasks.append(beat)  # type: ignore[arg-type]
        for pending in tasks:
            pending.cancel()
        for pending in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
        # Also after a failure: confirm what was acked, so a restart re-sends no more.
        try:
            await source.send_status(flush_lsn=checkpointer.confirmed_lsn)
            if not await source.finish():
                log.warning("PostgreSQL did not acknowledge the end of the stream in time")
        except Exception as exc:
            log.warning("could not send the final status update: %s", exc)
    log.info(
        "stopped: %d changes in %d transactions published, confirmed up to %s",
        stats.changes,
        stats.transactions,
        format_lsn(checkpointer.confirmed_lsn),
        extra={"lsn": format_lsn(checkpointer.confirmed_lsn)},
    )
    if error is not None:
        raise error


async def _read(
    source: ReplicationSource,
    sink: JetStreamSink[TransactionTicket],
    checkpointer: Checkpointer,
    assembler: ChangeAssembler,
    router: Router,
    stats: BridgeStats,
    metrics: BridgeMetrics,
    heartbeat_prefix: str,
    heartbeat_router: Router | None,
    slot: str,
) -> None:
    ticket: TransactionTicket | None = None
    unrouted: set[int] = set()  # relations already warned about
    kinds = metrics.pgoutput_messages
    table_ops: dict[int, dict[str, int]] = {}  # relation OID → its op counters
    monotonic = time.monotonic
    while True:
        frame = await source.read_frame()
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
        for event in assembler.feed(message, frame.wal_start):  # type: ignore[union-attr]
            if isinstance(event, Change):
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
                checkpointer.published(ticket)
                await sink.publish(outgoing.subject, outgoing.body, outgoing.headers, ticket)
                stats.changes += 1
                ops = table_ops.get(event.table.oid)
                if ops is None:
                    ops = table_ops[event.table.oid] = metrics.table_ops(event.table.qualified_name)
                ops[event.op] += 1
            elif isinstance(event, TransactionBegin):
                ticket = checkpointer.begin()
                ticket.commit_time = event.commit_ts / 1e6 + _PG_EPOCH_UNIX
            elif isinstance(event, TransactionEnd):
                if ticket is None:
                    raise DecodeError("Commit without Begin")
                checkpointer.commit(ticket, event.end_lsn)
                ticket = None
                stats.transactions += 1
                metrics.transactions += 1
            else:
                if event.prefix == heartbeat_prefix:
                    # Ours are published only with heartbeat.publish; others' never.
                    outgoing = (
                        heartbeat_router.route_message(event)
                        if heartbeat_router is not None and _is_own_heartbeat(event.content, slot)
                        else None
                    )
                else:
                    outgoing = router.route_message(event)
                if outgoing is None:
                    continue
                owner = ticket if event.transactional else checkpointer.standalone(event.lsn)
                if owner is None:
                    raise DecodeError("transactional message outside a transaction")
                checkpointer.published(owner)
                await sink.publish(outgoing.subject, outgoing.body, outgoing.headers, owner)


async def _send_status(
    source: ReplicationSource, checkpointer: Checkpointer, progress: asyncio.Event, interval: float
) -> None:
    """Standby status updates: every ``interval`` seconds, and soon after the checkpoint moves."""
    while True:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
        # cancellation that shutdown sends, leaving this task (and the bridge) stuck.
        # On the timer (nothing moved), ask the server to answer with a keepalive: a
        # quiet stream still shows progress (/readyz) and the idle slot gets confirmed.
        quiet = False
        try:
            async with asyncio.timeout(interval):
                await progress.wait()
        except TimeoutError:
            quiet = True
        progress.clear()
        await source.send_status(flush_lsn=checkpointer.confirmed_lsn, reply_requested=quiet)
        await asyncio.sleep(STATUS_COALESCE_SECONDS)


def _is_own_heartbeat(content: bytes, slot: str) -> bool:
    """Whether a heartbeat message was written by a bridge on our slot."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and body.get("slot") == slot
