"""The metrics module and the observability HTTP server, without any database or NATS."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cdc_bridge.heartbeat import heartbeat_content
from cdc_bridge.http_server import HttpServer
from cdc_bridge.local_servers import free_port
from cdc_bridge.metrics import BridgeMetrics, LightHistogram, SlotCollector
from cdc_bridge.pgoutput import Begin, Insert


@dataclass
class FakeSource:
    connected: bool = True


@dataclass
class FakeSink:
    connected: bool = True
    in_flight: int = 0
    in_flight_bytes: int = 0


@dataclass
class FakeCheckpoint:
    confirmed_lsn: int = 0


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return samples(registry)[(name, tuple(sorted(labels.items())))]


def test_counters_and_labels() -> None:
    registry = CollectorRegistry()
    metrics = BridgeMetrics(registry, max_in_flight=64, version="1.2.3")
    metrics.pgoutput_messages[Begin] += 2
    metrics.pgoutput_messages[Insert] += 5
    ops = metrics.table_ops("public.t")
    ops["insert"] += 3
    ops["delete"] += 1
    assert metrics.table_ops("public.t") is ops  # bound once, reused
    metrics.transactions += 2
    metrics.published += 4
    metrics.duplicates += 1
    metrics.publish_failed("timeout")
    metrics.status_updates += 7
    metrics.heartbeats += 2
    metrics.heartbeat_failures += 1

    assert value(registry, "cdc_bridge_build_info", version="1.2.3") == 1
    assert value(registry, "cdc_bridge_pgoutput_messages_total", kind="begin") == 2
    assert value(registry, "cdc_bridge_pgoutput_messages_total", kind="insert") == 5
    assert value(registry, "cdc_bridge_pgoutput_messages_total", kind="commit") == 0
    assert value(registry, "cdc_bridge_change_events_total", table="public.t", op="insert") == 3
    assert value(registry, "cdc_bridge_change_events_total", table="public.t", op="delete") == 1
    assert value(registry, "cdc_bridge_change_events_total", table="public.t", op="update") == 0
    assert value(registry, "cdc_bridge_transactions_total") == 2
    assert value(registry, "cdc_bridge_published_messages_total") == 4
    assert value(registry, "cdc_bridge_duplicate_messages_total") == 1
    assert value(registry, "cdc_bridge_publish_errors_total", reason="timeout") == 1
    assert value(registry, "cdc_bridge_publish_errors_total", reason="refused") == 0
    assert value(registry, "cdc_bridge_standby_status_updates_total") == 7
    assert value(registry, "cdc_bridge_reconnects_total", target="postgres") == 0
    assert value(registry, "cdc_bridge_reconnects_total", target="nats") == 0
    assert value(registry, "cdc_bridge_heartbeats_total") == 2
    assert value(registry, "cdc_bridge_heartbeat_failures_total") == 1
    assert value(registry, "cdc_bridge_in_flight_capacity") == 64
    assert value(registry, "cdc_bridge_in_flight_messages") == 0
    assert value(registry, "cdc_bridge_source_connected") == 0
    assert value(registry, "cdc_bridge_sink_connected") == 0


def test_live_gauges_and_lag() -> None:
    registry = CollectorRegistry()
    metrics = BridgeMetrics(registry, max_in_flight=8)
    found = samples(registry)
    # Nothing known yet: no lag reported rather than a made-up zero.
    assert not any(name.startswith("cdc_bridge_replication_lag") for name, _ in found)
    metrics.source = FakeSource()
    metrics.sink = FakeSink(in_flight=3)
    metrics.checkpoint = FakeCheckpoint(confirmed_lsn=1000)
    metrics.server_wal_end = 1500
    metrics.acked_commit_time = time.time() - 2.0
    assert value(registry, "cdc_bridge_source_connected") == 1
    assert value(registry, "cdc_bridge_sink_connected") == 1
    assert value(registry, "cdc_bridge_in_flight_messages") == 3
    assert value(registry, "cdc_bridge_replication_lag_bytes") == 500
    assert 1.9 < value(registry, "cdc_bridge_replication_lag_seconds") < 5
    metrics.caught_up_time = time.time()  # a newer keepalive with nothing in flight
    assert value(registry, "cdc_bridge_replication_lag_seconds") < 1
    metrics.server_wal_end = 900  # confirmed past the last keepalive: no negative lag
    assert value(registry, "cdc_bridge_replication_lag_bytes") == 0
    # Standing by (after streaming once): the old session's numbers are not reported.
    metrics.standby_reason = "standing by: slot in use"
    found = samples(registry)
    assert value(registry, "cdc_bridge_standby") == 1
    for gone in ("replication_lag_seconds", "replication_lag_bytes", "confirmed_lsn"):
        assert not any(name == f"cdc_bridge_{gone}" for name, _ in found), gone


def test_backfill_gauges_exist_only_while_one_runs() -> None:
    registry = CollectorRegistry()
    metrics = BridgeMetrics(registry)
    assert not [n for n, _ in samples(registry) if n.startswith("cdc_bridge_backfill_eta")]
    metrics.backfill_rows, metrics.backfill_dropped = 7_990, 10
    metrics.backfill_table, metrics.backfill_estimated = "public.t", 10_000
    metrics.backfill_done, metrics.backfill_seconds = 8_000, 4.0
    assert value(registry, "cdc_bridge_backfill_rows_total") == 7_990
    assert value(registry, "cdc_bridge_backfill_dropped_rows_total") == 10
    assert value(registry, "cdc_bridge_backfill_estimated_rows", table="public.t") == 10_000
    assert value(registry, "cdc_bridge_backfill_done_rows", table="public.t") == 8_000
    assert value(registry, "cdc_bridge_backfill_rows_per_second", table="public.t") == 2_000
    assert value(registry, "cdc_bridge_backfill_eta_seconds", table="public.t") == 1.0
    metrics.backfill_table = None
    assert not [n for n, _ in samples(registry) if n.startswith("cdc_bridge_backfill_done")]


def test_light_histogram_uses_le_buckets() -> None:
    registry = CollectorRegistry()
    metrics = BridgeMetrics(registry)
    histogram = metrics.publish_duration
    for seconds in (0.0005, 0.0007, 0.002, 100.0):
        histogram.observe(seconds)
    name = "cdc_bridge_publish_duration_seconds"
    assert value(registry, name + "_bucket", le="0.0005") == 1  # le: the bound is included
    assert value(registry, name + "_bucket", le="0.001") == 2
    assert value(registry, name + "_bucket", le="0.0025") == 3
    assert value(registry, name + "_bucket", le="30.0") == 3
    assert value(registry, name + "_bucket", le="+Inf") == 4
    assert value(registry, name + "_count") == 4
    assert value(registry, name + "_sum") == pytest.approx(100.0032)
    assert value(registry, "cdc_bridge_commit_to_ack_seconds_count") == 0


def test_light_histogram_alone() -> None:
    histogram = LightHistogram((1.0, 2.0))
    histogram.observe(1.5)
    histogram.observe(3)
    assert histogram.counts == [0, 1, 1]
    assert histogram.sum == 4.5


def test_default_registry_is_not_touched() -> None:
    from prometheus_client import REGISTRY

    before = {m.name for m in REGISTRY.collect()}
    BridgeMetrics(CollectorRegistry())
    BridgeMetrics(None)
    assert {m.name for m in REGISTRY.collect()} == before
    assert not any(name.startswith("cdc_bridge") for name in before)


def test_readiness_reasons() -> None:
    metrics = BridgeMetrics(ready_timeout=60)
    assert metrics.readiness_problem() == "the replication stream from PostgreSQL is not open"
    metrics.source = source = FakeSource()
    assert metrics.readiness_problem() == "not connected to NATS"
    metrics.sink = sink = FakeSink()
    assert metrics.readiness_problem() == "no progress yet"
    metrics.last_progress = 1000.0
    assert metrics.readiness_problem(now=1059.0) is None
    problem = metrics.readiness_problem(now=1075.0)
    assert problem is not None
    assert problem.startswith("no progress for 75s")
    assert "metrics.ready_timeout is 60s" in problem
    sink.connected = False
    assert metrics.readiness_problem(now=1001.0) == "not connected to NATS"
    source.connected = False
    assert metrics.readiness_problem(now=1001.0) == (
        "the replication stream from PostgreSQL is not open"
    )


def test_slot_collector_without_a_database_yields_nothing() -> None:
    registry = CollectorRegistry()
    BridgeMetrics(registry)
    dsn = f"postgresql://nobody@127.0.0.1:{free_port()}/db"
    registry.register(SlotCollector(dsn, "cdc_bridge", connect_timeout=1))
    started = time.monotonic()
    names = {name for name, _ in samples(registry)}
    assert time.monotonic() - started < 5
    assert "cdc_bridge_published_messages_total" in names
    assert not any(name.startswith("cdc_bridge_slot_") for name in names)


def test_heartbeat_content() -> None:
    from datetime import UTC, datetime

    when = datetime(2026, 11, 27, 9, 32, 10, 437029, tzinfo=UTC)
    assert heartbeat_content("s1", when) == '{"slot":"s1","ts":"2026-11-27T09:32:10.437029Z"}'


# ------------------------------------------------------------------------ the HTTP server


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def test_http_endpoints() -> None:
    registry = CollectorRegistry()
    metrics = BridgeMetrics(registry, max_in_flight=5)
    server = HttpServer(host="127.0.0.1", port=0, registry=registry, readiness=metrics.readiness)
    await server.start()
    try:
        port = server.port
        assert port > 0

        status, headers, body = await get(port, "/livez")
        assert (status, body) == (200, b"ok\n")
        assert headers["Connection"] == "close"
        assert headers["Content-Length"] == "3"

        status, _, body = await get(port, "/readyz")
        assert (status, body) == (503, b"the replication stream from PostgreSQL is not open\n")
        metrics.source, metrics.sink = FakeSource(), FakeSink()
        metrics.last_progress = time.monotonic()
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        metrics.last_progress = time.monotonic() - 61
        status, _, body = await get(port, "/readyz?verbose=1")
        assert status == 503
        assert body.startswith(b"no progress for 61s")
        assert body.endswith(b"\n")
        assert body.count(b"\n") == 1

        metrics.published = 9
        status, headers, body = await get(port, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=")
        assert b"cdc_bridge_published_messages_total 9.0\n" in body
        assert b"cdc_bridge_in_flight_capacity 5.0\n" in body

        for path in ("/", "/metrics/x", "/healthz"):
            status, _, _ = await get(port, path)
            assert status == 404, path
        status, _, _ = await request(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == 404
        status, _, _ = await request(port, b"garbage\r\n\r\n")
        assert status == 400
    finally:
        await server.close()


async def test_http_server_survives_a_silent_client() -> None:
    registry = CollectorRegistry()
    server = HttpServer(
        host="127.0.0.1", port=0, registry=registry, readiness=lambda: (True, "ready")
    )
    await server.start()
    try:
        _, idle = await asyncio.open_connection("127.0.0.1", server.port)  # sends nothing
        status, _, body = await get(server.port, "/livez")
        assert (status, body) == (200, b"ok\n")
        idle.close()
    finally:
        await server.close()


def test_the_initial_snapshot_is_ready_while_its_chunks_are_acknowledged() -> None:
    metrics = BridgeMetrics(ready_timeout=60)
    metrics.snapshotting = "taking the initial snapshot (public.t)"
    assert metrics.readiness(now=100) == (
        False,
        "taking the initial snapshot (public.t), but not connected to NATS",
    )
    metrics.sink = FakeSink()
    metrics.last_progress = 50.0
    assert metrics.readiness(now=100) == (True, "ready, taking the initial snapshot (public.t)")
    assert metrics.readiness(now=111) == (
        False,
        "taking the initial snapshot (public.t), but no chunk acknowledged for 61s",
    )
    metrics.snapshotting = None  # streaming now: its own rules
    assert metrics.readiness(now=100) == (
        False,
        "the replication stream from PostgreSQL is not open",
    )


def test_a_standby_is_ready_while_it_keeps_trying_with_nats_connected() -> None:
    metrics = BridgeMetrics(ready_timeout=60)
    metrics.standby_reason = "standing by: replication slot 'x' is in use by another process"
    assert metrics.readiness(now=100) == (False, "standing by, but not connected to NATS")
    metrics.sink = FakeSink()
    metrics.last_progress = 50.0
    assert metrics.readiness(now=100) == (
        True,
        "ready, standing by: replication slot 'x' is in use by another process",
    )
    assert metrics.readiness(now=111) == (
        False,
        "standing by, but no attempt to take the slot for 61s",
    )
    metrics.standby_reason = None  # took over: the streaming rules apply again
    assert metrics.readiness(now=100) == (
        False,
        "the replication stream from PostgreSQL is not open",
    )
