"""The bridge: wires source → decoder → assembler → router → sink, and the checkpointer back.

Data flows one way. The reader task pulls CopyBoth frames, decodes them, turns them into
changes, routes and publishes them; PubAcks come back through the sink's callback into
the checkpointer; the status task sends the checkpointer's confirmed LSN to PostgreSQL on
a timer and soon after it moves. The only thing that talks back to PostgreSQL is that
confirmed LSN.

A *session* is one pass of: connect to NATS, check the database, ensure stream,
publication and slot, take the slot (standing by while another process holds it), read
back what this slot already stored in the stream, then stream. A session that creates
the slot (``snapshot.mode: initial``), or finds its snapshot unfinished, first publishes
the tables' rows in the slot's snapshot (:mod:`cdc_bridge.snapshot`). When a connection is lost
after setup has once succeeded (standing by or streaming), the session ends and a new
one starts after a capped, jittered backoff: WAL is re-read from the slot's confirmed
position, and what the stream already holds is not sent again, so nothing is lost and
nothing duplicated. Errors in the first setup, and errors no retry can fix, end the
bridge instead.

Shutdown (SIGTERM/SIGINT → ``stop``): stop reading, wait for in-flight PubAcks (bounded
by ``shutdown_timeout``), send a final status update, return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from cdc_bridge.backfill import BackfillRunner, BackfillStore
from cdc_bridge.batching import TransactionPublisher
from cdc_bridge.changes import (
    ChangeAssembler,
)
from cdc_bridge.checkpoint import Checkpointer, TransactionTicket
from cdc_bridge.config import HEARTBEAT_SUBJECT, ReconnectSettings, Settings
from cdc_bridge.envelopes import encoder_from_settings
from cdc_bridge.errors import (
    CdcBridgeError,
    ConnectError,
    SetupError,
    SlotBusyError,
    SourceError,
)
from cdc_bridge.filters import build_filters, mask_kind
from cdc_bridge.heartbeat import run_heartbeat
from cdc_bridge.http_server import HttpServer
from cdc_bridge.logs import bind_log_context
from cdc_bridge.lsn import Lsn, format_lsn
from cdc_bridge.metrics import BridgeMetrics, SlotCollector
from cdc_bridge.oversized import PayloadLimit
from cdc_bridge.provisioning import (
    DatabaseState,
    TableRequest,
    check_database,
    ensure_replication,
    slot_confirmed_lsn,
)
from cdc_bridge.readback import (
    ReadBack,
    is_stored,
    last_published,
    position_of,
    read_back,
)
from cdc_bridge.reader import WalReader
from cdc_bridge.router import Router
from cdc_bridge.routing import SubjectTemplate
from cdc_bridge.sink import JetStreamSink, StreamSpec, stream_subjects
from cdc_bridge.snapshot import (
    ProgressStore,
    SnapshotReader,
    SnapshotRecord,
    SnapshotTarget,
    create_slot_exporting,
    run_snapshot,
)
from cdc_bridge.source import ReplicationSource
from cdc_bridge.watermarks import Watermarks

__all__ = ["BridgeStats", "run_bridge", "stream_spec"]

log = logging.getLogger(__name__)

# After a status update, wait at least this long before the next one, so that a burst of
# commits costs a few status updates rather than one per transaction.
STATUS_COALESCE_SECONDS = 0.1


@dataclass
class BridgeStats:
    """Counters a caller (the demo, tests) may watch while the bridge runs."""

    changes: int = 0
    transactions: int = 0
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    metrics_port: int | None = None  # where /metrics listens, once it does


def own_subjects(settings: Settings) -> tuple[str, ...]:
    """Subject filters covering every message this bridge may publish."""
    filters = [SubjectTemplate(t.subject).stream_filter for t in settings.tables.values()]
    if settings.messages.publish:
        filters.append(SubjectTemplate(settings.messages.subject).stream_filter)
    if settings.schema_changes.publish:
        filters.append(SubjectTemplate(settings.schema_changes.subject).stream_filter)
    if settings.envelope.transaction_markers:
        filters.append(settings.envelope.markers_subject)
    if settings.heartbeat.publish:
        filters.append(HEARTBEAT_SUBJECT)
    if settings.nats.oversized == "dead-letter":
        filters.append(settings.nats.dead_letter_subject)
    return stream_subjects(filters)


def stream_spec(settings: Settings) -> StreamSpec:
    nats = settings.nats
    subjects = tuple(nats.subjects) if nats.subjects else own_subjects(settings)
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
        name: TableRequest(
            table.subject,
            tuple(table.key) if table.key else None,
            columns=tuple(table.columns) if table.columns is not None else None,
            exclude_columns=tuple(table.exclude_columns),
            masks=tuple((c, mask_kind(rule)) for c, rule in table.mask.items()),
            where=table.where,
        )
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
        server = HttpServer(host=host, port=port, registry=registry, readiness=metrics.readiness)
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


class Backoff:
    """Capped exponential backoff with full jitter: a fleet restarting together spreads out."""

    def __init__(self, settings: ReconnectSettings, rng: random.Random | None = None) -> None:
        self._initial = settings.initial_delay
        self._max = settings.max_delay
        self._rng = rng or random.Random()
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._max, self._initial * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 60)
        return self._rng.uniform(ceiling / 2, ceiling)


async def _run(
    settings: Settings, stop: asyncio.Event, stats: BridgeStats, metrics: BridgeMetrics
) -> None:
    bind_log_context(slot=settings.postgres.slot)  # on every record of this task and its tasks
    backoff = Backoff(settings.reconnect)
    established = False  # a session once got through setup (standing by or streaming)
    while True:
        session = _Session(settings, stop, stats, metrics)
        started = time.monotonic()
        try:
            await session.run()
            return
        except CdcBridgeError as exc:
            established = established or session.established
            # Before setup has once succeeded, an error is most likely a setup problem:
            # say so and exit. Afterwards, lost connections are retried.
            if not exc.retriable or not established:
                raise
            error = exc
        if time.monotonic() - started > settings.reconnect.max_delay:
            backoff.reset()  # that session ran well: start the backoff over
        target = "postgres" if isinstance(error, SourceError | ConnectError) else "nats"
        metrics.reconnects[target] += 1
        delay = backoff.next_delay()
        log.warning("%s; reconnecting in %.1fs", error, delay)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        if stop.is_set():
            return


class _Session:
    """One connection to each server, from connect to the end of streaming."""

    def __init__(
        self,
        settings: Settings,
        stop: asyncio.Event,
        stats: BridgeStats,
        metrics: BridgeMetrics,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.stats = stats
        self.metrics = metrics
        self.established = False  # setup done: standing by or streaming
        self.progress = asyncio.Event()
        self.checkpointer: Checkpointer | None = None

    def _on_ack(self, ticket: TransactionTicket, duplicate: bool) -> None:
        assert self.checkpointer is not None
        self.checkpointer.acked(ticket)
        commit_time = ticket.commit_time
        if commit_time:
            self.metrics.acked_commit_time = commit_time
            self.metrics.commit_to_ack.observe(time.time() - commit_time)

    async def run(self) -> None:
        settings, metrics = self.settings, self.metrics
        pg, nats = settings.postgres, settings.nats
        # NATS first: a bridge that cannot publish should not create a slot that pins WAL.
        sink: JetStreamSink[TransactionTicket] = await JetStreamSink.connect(
            nats,
            on_ack=self._on_ack,
            max_in_flight=nats.max_in_flight,
            max_in_flight_bytes=nats.max_in_flight_bytes,
            ack_timeout=nats.ack_timeout,
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
            spec = stream_spec(settings)
            await sink.ensure_stream(spec, atomic_batches=nats.atomic_batches)
            subjects = own_subjects(settings)

            async def batch_stored(subject: str, headers: dict[str, str]) -> bool:
                position = position_of(headers.get("Nats-Msg-Id", ""), pg.slot)
                return position is not None and await is_stored(
                    sink.client, spec.name, subject, position, pg.slot
                )

            sink.is_stored = batch_stored
            # Before the slot is ours this is only a hint (another bridge may be
            # publishing), good enough to refuse recreating a dropped slot.
            hint = await last_published(sink.client, spec.name, subjects, pg.slot)
            mode = settings.snapshot.mode
            if mode == "initial_only":
                await self._snapshot_only(state, sink, spec.name)
                return
            store = (
                ProgressStore(sink.client, stream=spec.name, slot=pg.slot)
                if mode == "initial"
                else None
            )
            exported: list[SnapshotReader] = []
            creator: Callable[[], Lsn] | None = None
            if store is not None:
                previous = await store.get()
                # A new slot gets a new snapshot run, recorded before the slot exists: a
                # crash between creating it and the first chunk then still resumes.
                pending = SnapshotRecord(
                    slot=pg.slot, mode=mode, run=previous.run + 1 if previous else 1
                )
                loop = asyncio.get_running_loop()

                def creator() -> Lsn:
                    lsn, reader = create_slot_exporting(
                        settings.conninfo(),
                        pg.slot,
                        connect_timeout=pg.connect_timeout,
                        before_create=lambda: asyncio.run_coroutine_threadsafe(
                            store.put(pending), loop
                        ).result(),
                    )
                    exported.append(reader)
                    return lsn

            try:
                confirmed, _ = await asyncio.to_thread(
                    ensure_replication,
                    settings.conninfo(),
                    state,
                    slot=pg.slot,
                    publication=pg.publication,
                    create_if_missing=pg.create_if_missing,
                    connect_timeout=pg.connect_timeout,
                    stream_position=hint,
                    recreate_slot=pg.recreate_slot,
                    slot_creator=creator,
                )
                if store is not None and not await self._initial_snapshot(
                    state, sink, store, exported[0] if exported else None, confirmed
                ):
                    return  # stopped
            finally:
                for reader in exported:
                    await asyncio.to_thread(reader.close)
            opened = await self._take_slot(confirmed, sink)
            if opened is None:
                return  # stopped while standing by
            source, start = opened
            metrics.source = source
            metrics.last_progress = time.monotonic()
            try:
                # The slot is ours: nobody else publishes for it now.
                stored = await read_back(sink.client, spec.name, subjects, pg.slot, since_lsn=start)
                if stored is not None and stored.newest.lsn >= start:
                    log.info(
                        "the stream already holds changes up to %s, past the slot's "
                        "confirmed %s (stopped before confirming them): not re-sending those",
                        stored.newest,
                        format_lsn(start),
                        extra={"lsn": format_lsn(start)},
                    )
                self.checkpointer = Checkpointer(start, on_advance=self.progress.set)
                metrics.checkpoint = self.checkpointer
                await self._stream(state, source, sink, self.checkpointer, stored)
            finally:
                await source.close()
        finally:
            metrics.standby_reason = None
            await sink.close()

    async def _stand_by(self, busy: SlotBusyError, *, first: bool) -> bool:
        """Wait ``reconnect.standby_interval`` while another process has the slot.

        False if the bridge was stopped meanwhile.
        """
        interval = self.settings.reconnect.standby_interval
        if first:
            log.warning("standing by: %s; trying again every %gs", busy, interval)
        self.metrics.standby_reason = f"standing by: {busy}"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await self.stop.wait()
        return not self.stop.is_set()

    async def _take_slot(
        self, confirmed: int, sink: JetStreamSink[TransactionTicket]
    ) -> tuple[ReplicationSource, int] | None:
        """Open the replication stream; while another process has the slot, stand by."""
        settings, metrics = self.settings, self.metrics
        pg = settings.postgres
        waited = False
        # Setup has worked: from here on a lost connection is retried, not fatal.
        self.established = True
        while True:
            sink.raise_if_failed()  # a standby that lost NATS starts over
            metrics.last_progress = time.monotonic()
            try:
                source = await ReplicationSource.open(
                    settings.conninfo(),
                    slot=pg.slot,
                    publication=pg.publication,
                    start_lsn=0 if waited else confirmed,  # 0: the slot's own position
                    connect_timeout=pg.connect_timeout,
                    receive_timeout=pg.receive_timeout,
                    metrics=metrics,
                )
            except SlotBusyError as exc:
                if not await self._stand_by(exc, first=not waited):
                    return None
                waited = True
                continue
            metrics.standby_reason = None
            break
        if waited:
            # The other process moved the slot on while we waited.
            try:
                confirmed = await asyncio.to_thread(
                    slot_confirmed_lsn,
                    settings.conninfo(),
                    pg.slot,
                    connect_timeout=pg.connect_timeout,
                )
            except BaseException:
                await source.close()
                raise
            log.info("took over slot %s at %s", pg.slot, format_lsn(confirmed))
        return source, confirmed

    def _router(self) -> Router:
        settings = self.settings
        return Router(
            slot=settings.postgres.slot,
            table_subjects={name: t.subject for name, t in settings.tables.items()},
            message_subject=settings.messages.subject if settings.messages.publish else None,
            message_prefixes=(
                frozenset(settings.messages.prefixes)
                if settings.messages.prefixes is not None
                else None
            ),
            schema_subject=(
                settings.schema_changes.subject if settings.schema_changes.publish else None
            ),
            encoder=encoder_from_settings(settings),
        )

    def _publisher(
        self, sink: JetStreamSink[TransactionTicket], checkpointer: Checkpointer
    ) -> TransactionPublisher:
        nats = self.settings.nats
        return TransactionPublisher(
            sink,
            checkpointer,
            atomic=sink.atomic_batches,
            # Half the window at most, so that a batch can always be completed.
            batch_size=min(nats.atomic_batch_size, max(2, nats.max_in_flight // 2)),
            batch_bytes=max(1, nats.max_in_flight_bytes // 2),
        )

    async def _initial_snapshot(
        self,
        state: DatabaseState,
        sink: JetStreamSink[TransactionTicket],
        store: ProgressStore,
        reader: SnapshotReader | None,
        confirmed: int,
    ) -> bool:
        """Snapshot mode initial, once the slot exists; False if stopped before the end.

        ``reader`` holds the snapshot the slot exported when this session created it.
        Otherwise an unfinished snapshot of this slot (its record still at the slot's
        consistent point) is resumed in a fresh snapshot; anything else streams only.
        """
        settings = self.settings
        pg = settings.postgres
        # Setup has worked: a lost connection from here on is retried (and resumes).
        self.established = True
        if reader is None:
            record = await store.get()
            if not _unfinished(record, confirmed):
                return True
            waited = False
            while reader is None:
                try:
                    reader = await asyncio.to_thread(
                        SnapshotReader.connect,
                        settings.conninfo(),
                        slot=pg.slot,
                        connect_timeout=pg.connect_timeout,
                    )
                except SlotBusyError as exc:
                    if not await self._stand_by(exc, first=not waited):
                        return False
                    waited = True
            self.metrics.standby_reason = None
            try:
                record = await store.get()  # another bridge may have finished it meanwhile
                if not _unfinished(record, confirmed):
                    return True
                assert record is not None
                await asyncio.to_thread(reader.begin, None)
                record.run += 1
                record.lsn = format_lsn(confirmed)
                return await self._publish_snapshot(state, sink, store, reader, record, confirmed)
            finally:
                await asyncio.to_thread(reader.close)
        record = SnapshotRecord(slot=pg.slot, mode="initial", lsn=format_lsn(confirmed))
        previous = await store.get()
        record.run = previous.run if previous is not None else 1
        return await self._publish_snapshot(state, sink, store, reader, record, confirmed)

    async def _snapshot_only(
        self, state: DatabaseState, sink: JetStreamSink[TransactionTicket], stream: str
    ) -> None:
        """Snapshot mode initial_only: a snapshot of the tables, no slot; then return."""
        settings = self.settings
        pg = settings.postgres
        store = ProgressStore(sink.client, stream=stream, slot=pg.slot)
        reader = await asyncio.to_thread(
            SnapshotReader.connect,
            settings.conninfo(),
            slot=pg.slot,
            connect_timeout=pg.connect_timeout,
        )
        try:
            previous = await store.get()
            if previous is not None and previous.mode == "initial_only" and not previous.done:
                record = previous  # resume the unfinished one
                record.run += 1
            else:
                record = SnapshotRecord(
                    slot=pg.slot, mode="initial_only", run=previous.run + 1 if previous else 1
                )
            await asyncio.to_thread(reader.begin, None)
            lsn = await asyncio.to_thread(_current_wal_lsn, reader)
            if await self._publish_snapshot(state, sink, store, reader, record, lsn):
                log.info("snapshot.mode is initial_only: done, exiting without a slot")
        finally:
            await asyncio.to_thread(reader.close)

    async def _publish_snapshot(
        self,
        state: DatabaseState,
        sink: JetStreamSink[TransactionTicket],
        store: ProgressStore,
        reader: SnapshotReader,
        record: SnapshotRecord,
        lsn: int,
    ) -> bool:
        settings = self.settings
        await store.put(record)
        checkpointer = Checkpointer(lsn)
        self.checkpointer = checkpointer  # the sink's acks go there
        targets = [
            SnapshotTarget(
                name,
                state.tables[name],
                tuple(state.key_columns.get(name, ())),
                table.where,
            )
            for name, table in settings.tables.items()
        ]
        try:
            return await run_snapshot(
                reader,
                record,
                store,
                targets,
                lsn=lsn,
                slot=settings.postgres.slot,
                chunk_size=settings.snapshot.chunk_size,
                type_aliases=state.type_aliases,
                router=self._router(),
                filters=build_filters(settings.tables),
                sink=sink,
                checkpointer=checkpointer,
                publisher=self._publisher(sink, checkpointer),
                ack_timeout=max(settings.nats.ack_timeout, 1.0) * 2,
                stop=self.stop,
                metrics=self.metrics,
                rows_per_second=settings.snapshot.max_rows_per_second,
                limit=PayloadLimit.from_settings(
                    settings, sink, self.metrics, atomic=sink.atomic_batches
                ),
            )
        finally:
            self.metrics.snapshotting = None  # /readyz: the snapshot's rules end here

    async def _stream(
        self,
        state: DatabaseState,
        source: ReplicationSource,
        sink: JetStreamSink[TransactionTicket],
        checkpointer: Checkpointer,
        stored: ReadBack | None,
    ) -> None:
        settings, stats, metrics, stop = self.settings, self.stats, self.metrics, self.stop
        heartbeat = settings.heartbeat
        slot = settings.postgres.slot
        heartbeat_router = (
            Router(slot=slot, table_subjects={}, message_subject=HEARTBEAT_SUBJECT)
            if heartbeat.publish
            else None
        )
        router = self._router()
        publisher = self._publisher(sink, checkpointer)
        watermarks = Watermarks(slot)
        reader = asyncio.create_task(
            WalReader(
                settings,
                source,
                sink,
                checkpointer,
                publisher,
                ChangeAssembler(
                    key_columns=state.key_columns,
                    type_aliases=state.type_aliases,
                    default_keys=frozenset(
                        name for name, table in settings.tables.items() if not table.key
                    ),
                ),
                router,
                heartbeat_router,
                stats,
                metrics,
                stored,
                watermarks,
            ).run(),
            name="wal-reader",
        )
        # Online backfills (cdc-bridge backfill): never fatal, not waited on below.
        backfills = asyncio.create_task(
            BackfillRunner(
                settings,
                state,
                BackfillStore(sink.client, stream=settings.nats.stream, slot=slot),
                watermarks,
                lambda: checkpointer.confirmed_lsn,
                metrics,
            ).run(),
            name="backfills",
        )
        status = asyncio.create_task(
            _send_status(source, checkpointer, self.progress, settings.postgres.status_interval),
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
                    slot=slot,
                    metrics=metrics,
                    connect_timeout=settings.postgres.connect_timeout,
                ),
                name="heartbeat",
            )
        stats.ready.set()
        log.info(
            "streaming slot %s from %s to stream %s",
            slot,
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
            # No more WAL; let what is in flight be acked, so that it can be confirmed.
            # After a failure only briefly: the acks may never come.
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
            tasks: list[asyncio.Future[object]] = [reader, status, failure, stopped, backfills]  # type: ignore[list-item]
            if beat is not None:
                tasks.append(beat)  # type: ignore[arg-type]
            await _cancel_all(tasks, timeout=5.0)
            # Also after a failure: confirm what was acked, so a restart re-sends no more.
            # Not over a replication connection that has just failed: it is gone.
            if not isinstance(error, SourceError):
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


async def _cancel_all(tasks: Sequence[asyncio.Future[object]], *, timeout: float) -> None:  # noqa: ASYNC109
    """Cancel ``tasks`` and wait for them, at most ``timeout``: a task blocked where a
    cancellation gets swallowed (nats-py's flush behind a frozen server) must not hang
    the end of the session; it is left behind with a warning."""
    for task in tasks:
        task.cancel()
    done, stuck = await asyncio.wait(tasks, timeout=timeout)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: the session's error is reported elsewhere
    for task in stuck:
        name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        log.warning("%s did not stop within %gs after being cancelled; left behind", name, timeout)


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


def _unfinished(record: SnapshotRecord | None, confirmed: int) -> bool:
    """Whether ``record`` is an unfinished snapshot of the slot now at ``confirmed``.

    The slot is confirmed nowhere past its consistent point until its snapshot is done
    (streaming starts after it), so a record at another position is of an older slot.
    """
    if record is None or record.done or record.mode != "initial":
        return False
    return record.lsn is None or record.lsn == format_lsn(confirmed)


def _current_wal_lsn(reader: SnapshotReader) -> int:
    return reader.wal_position()
