"""Prometheus metrics: plain counters on the hot path, metric families at scrape time.

The reader and the sink touch these counters once or twice per message, so they are
plain attributes and dicts of ints (an increment costs tens of nanoseconds; a
prometheus_client ``Counter.inc`` takes a lock and costs ten times more). Labelled
counters are dicts bound once per label set (a table's ops when the table is first
routed), so the hot path never formats or looks up label values. ``BridgeCollector``
turns the numbers into metric families when ``/metrics`` is scraped, on the injected
registry, never the global one.

``SlotCollector`` reads the slot's state from PostgreSQL at scrape time over its own
short-lived connection; when that fails, its metrics are just absent from the scrape.

Label values come only from fixed enums (message kinds, ops, error reasons, wal_status)
or from the configuration (table names), so the number of series is bounded.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, Literal, Protocol

import psycopg
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cdc_bridge import __version__
from cdc_bridge.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
)
from cdc_bridge.pgsecurity import ConnInfo, resolve_conninfo

__all__ = [
    "MESSAGE_KINDS",
    "OPS",
    "PUBLISH_ERROR_REASONS",
    "WAL_STATUSES",
    "BridgeCollector",
    "BridgeMetrics",
    "LightHistogram",
    "PublishErrorReason",
    "SlotCollector",
]

log = logging.getLogger(__name__)

#: pgoutput message class → the ``kind`` label of ``cdc_bridge_pgoutput_messages``.
MESSAGE_KINDS: Final[dict[type, str]] = {
    Begin: "begin",
    Commit: "commit",
    Relation: "relation",
    Type: "type",
    Insert: "insert",
    Update: "update",
    Delete: "delete",
    Truncate: "truncate",
    LogicalMessage: "message",
    Origin: "origin",
    StreamStart: "stream_start",
    StreamStop: "stream_stop",
    StreamCommit: "stream_commit",
    StreamAbort: "stream_abort",
}
OPS: Final = ("insert", "update", "delete", "truncate", "read")
PublishErrorReason = Literal["refused", "timeout", "too_large", "connection"]
PUBLISH_ERROR_REASONS: Final[tuple[PublishErrorReason, ...]] = (
    "refused",
    "timeout",
    "too_large",
    "connection",
)
RECONNECT_TARGETS: Final = ("postgres", "nats")
WAL_STATUSES: Final = ("reserved", "extended", "unreserved", "lost")

PUBLISH_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
COMMIT_TO_ACK_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


class LightHistogram:
    """A histogram without locks: ``observe`` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts = list(self.counts)  # a copy: the event loop may add to it meanwhile
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class _Connected(Protocol):
    @property
    def connected(self) -> bool: ...


class _Sink(_Connected, Protocol):
    @property
    def in_flight(self) -> int: ...

    @property
    def in_flight_bytes(self) -> int: ...


class _Checkpoint(Protocol):
    @property
    def confirmed_lsn(self) -> int: ...


class BridgeMetrics:
    """The bridge's numbers. The pipeline, source and sink update them in place."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_in_flight: int = 0,
        ready_timeout: float = 60.0,
        version: str = __version__,
    ) -> None:
        self.version = version
        self.max_in_flight = max_in_flight
        self.ready_timeout = ready_timeout
        # Counters.
        self.pgoutput_messages: dict[type, int] = dict.fromkeys(MESSAGE_KINDS, 0)
        self.change_events: dict[str, dict[str, int]] = {}  # table → op → count
        self.skipped_changes = 0
        self.transactions = 0
        self.published = 0
        self.duplicates = 0
        self.publish_errors: dict[str, int] = dict.fromkeys(PUBLISH_ERROR_REASONS, 0)
        self.status_updates = 0
        self.reconnects: dict[str, int] = dict.fromkeys(RECONNECT_TARGETS, 0)
        self.heartbeats = 0
        self.heartbeat_failures = 0
        self.already_published = 0  # messages skipped: the stream held them (read-back)
        self.filtered_changes = 0  # left out by tables.<t>.ops
        self.dead_letters = 0
        # Online backfills (backfill.py): the running one's table and estimate.
        self.backfill_rows = 0
        self.backfill_dropped = 0
        self.backfill_chunks = 0
        self.backfill_reread_chunks = 0
        self.backfill_table: str | None = None
        self.backfill_estimated = 0
        self.backfill_done = 0  # the running one's rows read (published or left out)
        self.backfill_seconds = 0.0  # … and the time it has run
        # Histograms.
        self.publish_duration = LightHistogram(PUBLISH_BUCKETS)
        self.commit_to_ack = LightHistogram(COMMIT_TO_ACK_BUCKETS)
        # State read at scrape time.
        self.last_progress: float | None = None  # time.monotonic() of a frame or PubAck
        self.acked_commit_time = 0.0  # unix time of the newest acked change's commit
        self.caught_up_time = 0.0  # unix time of the last keepalive with nothing open
        self.server_wal_end = 0  # from the last keepalive
        self.source: _Connected | None = None
        self.sink: _Sink | None = None
        self.checkpoint: _Checkpoint | None = None
        self.standby_reason: str | None = None  # set while waiting for a busy slot
        self.snapshotting: str | None = None  # set while the initial snapshot runs
        if registry is not None:
            registry.register(BridgeCollector(self))

    def table_ops(self, table: str) -> dict[str, int]:
        """The per-op change counters of ``table``, created on first use; keep the result."""
        ops = self.change_events.get(table)
        if ops is None:
            ops = self.change_events[table] = dict.fromkeys(OPS, 0)
        return ops

    def publish_failed(self, reason: PublishErrorReason) -> None:
        self.publish_errors[reason] += 1

    def readiness(self, now: float | None = None) -> tuple[bool, str]:
        """(ready, one line) for ``/readyz``.

        A standby is ready: it is healthy in its role (connected to NATS, trying for the
        slot), so that a Deployment with two replicas rolls out and drains normally;
        ``cdc_bridge_standby`` and the text tell the roles apart.
        """
        now = time.monotonic() if now is None else now
        if self.snapshotting is not None:
            # Not streaming yet, but doing its job: a snapshot of a big table takes
            # longer than a rollout waits for readiness.
            if self.sink is None or not self.sink.connected:
                return False, f"{self.snapshotting}, but not connected to NATS"
            idle = now - (self.last_progress or 0.0)
            if idle > self.ready_timeout:
                return False, f"{self.snapshotting}, but no chunk acknowledged for {idle:.0f}s"
            return True, f"ready, {self.snapshotting}"
        if self.standby_reason is not None:
            if self.sink is None or not self.sink.connected:
                return False, "standing by, but not connected to NATS"
            idle = now - (self.last_progress or 0.0)
            if idle > self.ready_timeout:
                return False, f"standing by, but no attempt to take the slot for {idle:.0f}s"
            return True, f"ready, {self.standby_reason}"
        problem = self.readiness_problem(now)
        return problem is None, problem or "ready"

    def readiness_problem(self, now: float | None = None) -> str | None:
        """None when ready; else one line saying why not."""
        if self.source is None or not self.source.connected:
            return "the replication stream from PostgreSQL is not open"
        if self.sink is None or not self.sink.connected:
            return "not connected to NATS"
        now = time.monotonic() if now is None else now
        if self.last_progress is None:
            return "no progress yet"
        idle = now - self.last_progress
        if idle > self.ready_timeout:
            return (
                f"no progress for {idle:.0f}s: no frame from PostgreSQL and no PubAck "
                f"(metrics.ready_timeout is {self.ready_timeout:g}s)"
            )
        return None


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class BridgeCollector(Collector):
    """Turns :class:`BridgeMetrics` into metric families at scrape time."""

    def __init__(self, metrics: BridgeMetrics) -> None:
        self._m = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check for clashes; collect() is cheap but needs no call here

    def collect(self) -> Iterator[Metric]:
        m = self._m
        info = GaugeMetricFamily(
            "cdc_bridge_build_info", "cdc-bridge version (always 1)", labels=["version"]
        )
        info.add_metric([m.version], 1)
        yield info
        source, sink, checkpoint = m.source, m.sink, m.checkpoint
        yield _gauge(
            "cdc_bridge_source_connected",
            "1 while the replication stream from PostgreSQL is open",
            1 if source is not None and source.connected else 0,
        )
        yield _gauge(
            "cdc_bridge_sink_connected",
            "1 while connected to NATS",
            1 if sink is not None and sink.connected else 0,
        )
        kinds = CounterMetricFamily(
            "cdc_bridge_pgoutput_messages", "pgoutput messages decoded, by kind", labels=["kind"]
        )
        for cls, count in list(m.pgoutput_messages.items()):
            kinds.add_metric([MESSAGE_KINDS[cls]], count)
        yield kinds
        changes = CounterMetricFamily(
            "cdc_bridge_change_events",
            "row changes of configured tables published, by table and op",
            labels=["table", "op"],
        )
        for table, ops in list(m.change_events.items()):
            for op, count in list(ops.items()):
                changes.add_metric([table, op], count)
        yield changes
        yield _counter(
            "cdc_bridge_skipped_changes",
            "row changes of tables in the publication but not in tables: (not published)",
            m.skipped_changes,
        )
        yield _counter("cdc_bridge_transactions", "transactions decoded", m.transactions)
        yield _counter(
            "cdc_bridge_published_messages", "messages published to JetStream", m.published
        )
        yield _counter(
            "cdc_bridge_duplicate_messages",
            "PubAcks with duplicate=true (JetStream already had the Nats-Msg-Id)",
            m.duplicates,
        )
        errors = CounterMetricFamily(
            "cdc_bridge_publish_errors", "failed publishes, by reason", labels=["reason"]
        )
        for reason, count in list(m.publish_errors.items()):
            errors.add_metric([reason], count)
        yield errors
        yield m.publish_duration.family(
            "cdc_bridge_publish_duration_seconds", "from publishing a message to its PubAck"
        )
        yield m.commit_to_ack.family(
            "cdc_bridge_commit_to_ack_seconds",
            "from a change's commit in PostgreSQL (its commit_ts) to its PubAck (one per "
            "message, or per atomic batch)",
        )
        caught_up = max(m.acked_commit_time, m.caught_up_time)
        if m.standby_reason is not None:
            # Whatever this process measured while it streamed is stale now.
            caught_up = 0.0
            checkpoint = None
        if caught_up:
            yield _gauge(
                "cdc_bridge_replication_lag_seconds",
                "now minus the commit time of the last acked change, or of the last "
                "keepalive received with nothing in flight",
                max(0.0, time.time() - caught_up),
            )
        if m.server_wal_end and checkpoint is not None:
            yield _gauge(
                "cdc_bridge_replication_lag_bytes",
                "server WAL end (from keepalives) minus the confirmed LSN",
                max(0, m.server_wal_end - checkpoint.confirmed_lsn),
            )
        if checkpoint is not None:
            yield _gauge(
                "cdc_bridge_confirmed_lsn",
                "the LSN last confirmed as done (as a number)",
                checkpoint.confirmed_lsn,
            )
        yield _gauge(
            "cdc_bridge_in_flight_messages",
            "published messages awaiting their PubAck",
            sink.in_flight if sink is not None else 0,
        )
        yield _gauge(
            "cdc_bridge_in_flight_bytes",
            "bytes of published messages awaiting their PubAck",
            sink.in_flight_bytes if sink is not None else 0,
        )
        yield _counter(
            "cdc_bridge_already_published_messages",
            "messages not re-sent after a restart or reconnect: the stream already held them",
            m.already_published,
        )
        yield _counter(
            "cdc_bridge_filtered_changes",
            "row changes not published because of tables.<t>.ops",
            m.filtered_changes,
        )
        yield _counter(
            "cdc_bridge_dead_letters",
            "oversized messages replaced by a marker on nats.dead_letter_subject",
            m.dead_letters,
        )
        yield _counter(
            "cdc_bridge_backfill_rows",
            "rows published by online backfills (op read, acknowledged)",
            m.backfill_rows,
        )
        yield _counter(
            "cdc_bridge_backfill_dropped_rows",
            "backfill rows left out because a concurrent change in the stream is newer",
            m.backfill_dropped,
        )
        yield _counter("cdc_bridge_backfill_chunks", "backfill chunks published", m.backfill_chunks)
        yield _counter(
            "cdc_bridge_backfill_reread_chunks",
            "backfill chunks read again (the table changed shape meanwhile, or an older "
            "commit was not visible yet)",
            m.backfill_reread_chunks,
        )
        running = GaugeMetricFamily(
            "cdc_bridge_backfill_estimated_rows",
            "the planner's estimate of the running backfill's rows (absent when none runs)",
            labels=["table"],
        )
        done = GaugeMetricFamily(
            "cdc_bridge_backfill_done_rows",
            "rows the running backfill has read so far (published or left out)",
            labels=["table"],
        )
        rate = GaugeMetricFamily(
            "cdc_bridge_backfill_rows_per_second",
            "the running backfill's rate so far",
            labels=["table"],
        )
        eta = GaugeMetricFamily(
            "cdc_bridge_backfill_eta_seconds",
            "the running backfill's time left at its rate so far, against the estimate",
            labels=["table"],
        )
        if m.backfill_table is not None:
            table = m.backfill_table
            running.add_metric([table], m.backfill_estimated)
            done.add_metric([table], m.backfill_done)
            if m.backfill_seconds > 0 and m.backfill_done > 0:
                per_second = m.backfill_done / m.backfill_seconds
                rate.add_metric([table], per_second)
                left = max(0, m.backfill_estimated - m.backfill_done)
                eta.add_metric([table], left / per_second)
        yield running
        yield done
        yield rate
        yield eta
        yield _gauge(
            "cdc_bridge_standby",
            "1 while waiting for the slot another process streams from",
            1 if m.standby_reason is not None else 0,
        )
        yield _gauge(
            "cdc_bridge_in_flight_capacity",
            "nats.max_in_flight: published messages that may await a PubAck at once",
            m.max_in_flight,
        )
        yield _counter(
            "cdc_bridge_standby_status_updates",
            "standby status updates sent to PostgreSQL",
            m.status_updates,
        )
        reconnects = CounterMetricFamily(
            "cdc_bridge_reconnects", "reconnections, by target", labels=["target"]
        )
        for target, count in list(m.reconnects.items()):
            reconnects.add_metric([target], count)
        yield reconnects
        yield _counter(
            "cdc_bridge_heartbeats", "heartbeat messages written to PostgreSQL", m.heartbeats
        )
        yield _counter(
            "cdc_bridge_heartbeat_failures",
            "heartbeats that could not be written",
            m.heartbeat_failures,
        )


SLOT_QUERY = """
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8,
       wal_status, safe_wal_size::float8, active
FROM pg_replication_slots WHERE slot_name = %s
"""


class SlotCollector(Collector):
    """The replication slot's state, queried at scrape time over a short-lived connection."""

    def __init__(self, conninfo: ConnInfo, slot: str, *, connect_timeout: float = 2.0) -> None:
        self._conninfo = conninfo
        self._slot = slot
        self._connect_timeout = max(1, math.ceil(connect_timeout))

    def describe(self) -> Iterable[Metric]:
        return []  # never query the database when registering

    def _query(self) -> tuple[float | None, str | None, float | None, bool] | None:
        try:
            with psycopg.connect(
                resolve_conninfo(self._conninfo),
                autocommit=True,
                connect_timeout=self._connect_timeout,
                options="-c statement_timeout=2000",
                application_name="cdc-bridge-metrics",
            ) as conn:
                row = conn.execute(SLOT_QUERY, (self._slot,)).fetchone()
        except Exception as exc:
            log.debug("slot metrics unavailable: %s", exc)
            return None
        if row is None:
            return None
        retained, status, safe, active = row
        return retained, status, safe, bool(active)

    def collect(self) -> Iterator[Metric]:
        row = self._query()
        if row is None:
            return
        retained, status, safe, active = row
        labels = ["slot"]
        if retained is not None:
            family = GaugeMetricFamily(
                "cdc_bridge_slot_retained_wal_bytes",
                "WAL the slot keeps on the server: pg_current_wal_lsn() - restart_lsn",
                labels=labels,
            )
            family.add_metric([self._slot], retained)
            yield family
        if status is not None:
            family = GaugeMetricFamily(
                "cdc_bridge_slot_wal_status",
                "the slot's wal_status: 1 for the current one",
                labels=[*labels, "status"],
            )
            for name in WAL_STATUSES:
                family.add_metric([self._slot, name], 1 if name == status else 0)
            yield family
        if safe is not None:
            family = GaugeMetricFamily(
                "cdc_bridge_slot_safe_wal_size_bytes",
                "WAL that can still be written before the slot is in danger of being lost",
                labels=labels,
            )
            family.add_metric([self._slot], safe)
            yield family
        family = GaugeMetricFamily(
            "cdc_bridge_slot_active", "1 while a process streams from the slot", labels=labels
        )
        family.add_metric([self._slot], 1 if active else 0)
        yield family
