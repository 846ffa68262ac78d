"""/metrics, /readyz and the heartbeat against a real PostgreSQL and nats-server."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdc_bridge.local_servers import free_port
from cdc_bridge.lsn import parse_lsn
from tests.fixtures.bridge import (
    BridgeProcess,
    read_stream,
    slot_state,
    wait_for_messages,
    write_config,
)

pytestmark = pytest.mark.servers

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def scrape(port: int) -> Samples:
    status, text = http_get(port, "/metrics")
    assert status == 200
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def metric(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def current_wal_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def test_metrics_and_readiness_while_streaming(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    port = free_port()
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
        extra={
            "metrics": {"host": "127.0.0.1", "port": port},
            "nats": {"max_in_flight": 77},
            "heartbeat": {"interval": 0},
        },
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        assert http_get(port, "/livez") == (200, "ok\n")
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, 10, "/readyz 200")
        assert http_get(port, "/readyz") == (200, "ready\n")
        assert http_get(port, "/nothing")[0] == 404

        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")  # one transaction
            conn.execute("UPDATE t SET v = 'c' WHERE id = 1")
            conn.execute("INSERT INTO t VALUES (3, 'd')")
            conn.execute("INSERT INTO other VALUES (1)")  # not in tables: not published
        wait_for_messages(nats.url, stream_name, 4)
        wait_for(
            # Every message published and acked (consecutive transactions may share
            # an atomic batch, so there are 1 to 3 PubAcks).
            lambda: (
                (found := scrape(port))
                and metric(found, "cdc_bridge_published_messages_total") == 4
                and metric(found, "cdc_bridge_in_flight_messages") == 0
            ),
            10,
            "4 messages published and acked",
        )
        found = scrape(port)
        table = "public.t"
        assert metric(found, "cdc_bridge_change_events_total", table=table, op="insert") == 3
        assert metric(found, "cdc_bridge_change_events_total", table=table, op="update") == 1
        assert metric(found, "cdc_bridge_change_events_total", table=table, op="delete") == 0
        assert not any(
            name == "cdc_bridge_change_events_total" and ("table", "public.other") in labels
            for name, labels in found
        )
        # The publication has only public.t, so `other` never reaches the bridge.
        assert metric(found, "cdc_bridge_skipped_changes_total") == 0
        # 3 transactions: PostgreSQL 15+ sends nothing for the one without published rows.
        assert metric(found, "cdc_bridge_transactions_total") == 3
        assert metric(found, "cdc_bridge_published_messages_total") == 4
        assert metric(found, "cdc_bridge_duplicate_messages_total") == 0
        assert metric(found, "cdc_bridge_pgoutput_messages_total", kind="insert") == 3
        assert metric(found, "cdc_bridge_pgoutput_messages_total", kind="update") == 1
        assert metric(found, "cdc_bridge_pgoutput_messages_total", kind="begin") == 3
        assert metric(found, "cdc_bridge_pgoutput_messages_total", kind="commit") == 3
        assert metric(found, "cdc_bridge_pgoutput_messages_total", kind="relation") == 1
        for reason in ("refused", "timeout", "too_large", "connection"):
            assert metric(found, "cdc_bridge_publish_errors_total", reason=reason) == 0
        assert metric(found, "cdc_bridge_in_flight_capacity") == 77
        assert metric(found, "cdc_bridge_in_flight_messages") == 0
        assert metric(found, "cdc_bridge_source_connected") == 1
        assert metric(found, "cdc_bridge_sink_connected") == 1
        assert metric(found, "cdc_bridge_reconnects_total", target="postgres") == 0
        assert metric(found, "cdc_bridge_reconnects_total", target="nats") == 0
        acks = metric(found, "cdc_bridge_publish_duration_seconds_count")
        assert 1 <= acks <= 3  # PubAcks: one per atomic batch of whole transactions
        assert metric(found, "cdc_bridge_commit_to_ack_seconds_count") == acks
        assert 0 < metric(found, "cdc_bridge_commit_to_ack_seconds_sum") < acks * 10
        assert metric(found, "cdc_bridge_in_flight_bytes") == 0
        assert metric(found, "cdc_bridge_already_published_messages_total") == 0
        assert metric(found, "cdc_bridge_dead_letters_total") == 0
        assert metric(found, "cdc_bridge_standby") == 0
        assert 0 <= metric(found, "cdc_bridge_replication_lag_seconds") < 30
        assert metric(found, "cdc_bridge_standby_status_updates_total") >= 1

        slot = "cdc_bridge"
        assert metric(found, "cdc_bridge_slot_active", slot=slot) == 1
        assert 0 <= metric(found, "cdc_bridge_slot_retained_wal_bytes", slot=slot) < 1 << 30
        statuses = {
            status: metric(found, "cdc_bridge_slot_wal_status", slot=slot, status=status)
            for status in ("reserved", "extended", "unreserved", "lost")
        }
        assert sum(statuses.values()) == 1
        assert statuses["lost"] == 0
        # safe_wal_size is NULL (absent) unless max_slot_wal_keep_size is set.
        safe = found.get(("cdc_bridge_slot_safe_wal_size_bytes", (("slot", slot),)))
        assert safe is None or safe > 0
        assert http_get(port, "/readyz") == (200, "ready\n")
    finally:
        code = bridge.terminate()
    assert code == 0, bridge.log_text()
    assert f"serving /metrics, /livez and /readyz on 127.0.0.1:{port}" in bridge.log_text()


def test_metrics_port_zero_picks_a_free_port(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
        extra={"metrics": {"host": "127.0.0.1", "port": 0}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        found = re.search(
            r"serving /metrics, /livez and /readyz on 127\.0\.0\.1:(\d+)", bridge.log_text()
        )
        assert found is not None, bridge.log_text()
        port = int(found[1])
        assert port > 0
        assert http_get(port, "/livez") == (200, "ok\n")
    finally:
        assert bridge.terminate() == 0


def test_metrics_port_in_use_is_one_line_error(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "config.yaml",
            dsn=database,
            nats_url=nats.url,
            stream=stream_name,
            tables={"public.t": {}},
            extra={"metrics": {"host": "127.0.0.1", "port": port}},
        )
        bridge = BridgeProcess(config, tmp_path / "bridge.log")
        bridge.start(wait_streaming=False)
        assert bridge.process is not None
        assert bridge.process.wait(30) == 1
    last = bridge.log_text().strip().splitlines()[-1]
    assert last.startswith(f"cdc-bridge: error: cannot serve metrics on 127.0.0.1:{port}")


def test_heartbeat_advances_an_idle_slot_and_is_not_published(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
        # Logical messages in general are published: heartbeats still are not.
        extra={
            "heartbeat": {"interval": 1},
            "messages": {"publish": True},
            "metrics": {"enabled": False},
        },
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        start, _ = slot_state(database, "cdc_bridge")
        wal_at_start = current_wal_lsn(database)
        deadline = time.monotonic() + 15
        confirmed = start
        while confirmed <= wal_at_start and time.monotonic() < deadline:
            time.sleep(0.2)
            confirmed, _ = slot_state(database, "cdc_bridge")
        assert confirmed > wal_at_start, bridge.log_text()
    finally:
        assert bridge.terminate() == 0
    assert read_stream(nats.url, stream_name) == []
    assert "heartbeat failed" not in bridge.log_text()


def test_heartbeat_published_when_asked(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    port = free_port()
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {"subject": "rows.{table}"}},
        extra={
            "heartbeat": {"interval": 0.5, "publish": True},
            "metrics": {"host": "127.0.0.1", "port": port},
        },
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        wait_for_messages(nats.url, stream_name, 2, timeout=20)
        found = scrape(port)
        assert metric(found, "cdc_bridge_heartbeats_total") >= 2
        assert metric(found, "cdc_bridge_heartbeat_failures_total") == 0
    finally:
        assert bridge.terminate() == 0
    messages = read_stream(nats.url, stream_name)
    assert len(messages) >= 2
    for message in messages:
        assert message.subject == "cdc.heartbeat"
        assert message.body["op"] == "message"
        assert message.body["prefix"] == "cdc_bridge.heartbeat"
        assert message.body["transactional"] is False
        content = orjson.loads(message.body["content"])
        assert content["slot"] == "cdc_bridge"
        assert content["ts"].endswith("Z")
        assert message.headers["Nats-Msg-Id"].endswith(":m")
    # Acked heartbeats move the slot too.
    confirmed, _ = slot_state(database, "cdc_bridge")
    assert confirmed >= parse_lsn(messages[-1].body["source"]["lsn"])
