"""What the bridge refuses to do silently: start a new slot after a dropped one, stream a
database that is not the one the stream came from, or drop a message that is too big."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats as nats_client
import psycopg
import pytest
from nats.js.api import StreamConfig

from cdc_bridge.local_servers import LocalNats, start_nats, start_postgres
from cdc_bridge.lsn import parse_lsn
from tests.fixtures.bridge import (
    BridgeProcess,
    read_stream,
    slot_state,
    wait_for_messages,
    write_config,
)

pytestmark = pytest.mark.servers


def _config(tmp_path: Path, database: str, url: str, stream: str, **extra: Any) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=url,
        stream=stream,
        tables={"public.t": {"subject": "t.{op}"}},
        extra=extra,
    )


def _exit_line(bridge: BridgeProcess) -> str:
    assert bridge.process is not None
    assert bridge.process.wait(30) == 1, bridge.log_text()
    return bridge.log_text().strip().splitlines()[-1]


def test_a_dropped_slot_is_not_silently_recreated(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    config = _config(tmp_path, database, nats.url, stream_name)
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        wait_for_messages(nats.url, stream_name, 1)
        assert bridge.terminate() == 0
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('cdc_bridge')")
            conn.execute("INSERT INTO t VALUES (2)")  # lost to any new slot
        bridge.start(wait_streaming=False)
        last = _exit_line(bridge)
        assert re.fullmatch(
            r"cdc-bridge: error: replication slot 'cdc_bridge' does not exist, but the stream "
            r"already holds its changes up to [0-9A-F]+/[0-9A-F]+#0: the slot was dropped and "
            r"the changes since then are lost to it\. Set postgres\.recreate_slot: true to "
            r"start a new slot anyway \(then backfill the tables\), or restore the slot",
            last,
        ), last
        with psycopg.connect(database, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)

        # The operator accepts the gap: a new slot, streaming from now on.
        config = _config(
            tmp_path, database, nats.url, stream_name, postgres={"recreate_slot": True}
        )
        bridge.start()
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (3)")
        wait_for_messages(nats.url, stream_name, 2)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    changes = [(m.body["op"], m.body["after"]["id"]) for m in read_stream(nats.url, stream_name)]
    # 2 was written while no slot existed; the new slot's initial snapshot (the default
    # snapshot.mode) re-sends the table's rows, which closes that gap.
    assert changes == [("insert", 1), ("read", 1), ("read", 2), ("insert", 3)]


def test_a_stream_ahead_of_the_database_is_refused(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("SELECT pg_create_logical_replication_slot('cdc_bridge', 'pgoutput')")

    async def publish_foreign() -> None:
        # What another database (or this one before a restore) left under the same slot.
        nc = await nats_client.connect(nats.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name=stream_name, subjects=["t.*"])
            await js.publish("t.insert", b"{}", headers={"Nats-Msg-Id": "cdc_bridge:FF/10:0"})
        finally:
            await nc.close()

    asyncio.run(publish_foreign())
    bridge = BridgeProcess(
        _config(tmp_path, database, nats.url, stream_name), tmp_path / "bridge.log"
    )
    bridge.start(wait_streaming=False)
    try:
        last = _exit_line(bridge)
    finally:
        bridge.stop_quietly()
    assert re.fullmatch(
        r"cdc-bridge: error: the stream holds changes of slot 'cdc_bridge' up to FF/10#0, "
        r"beyond this database's WAL \([0-9A-F]+/[0-9A-F]+\): it is another database, or one "
        r"restored from a backup, under the same slot name\. Use another postgres\.slot or "
        r"nats\.stream",
        last,
    ), last


@pytest.fixture(scope="module")
def small_nats() -> Iterator[LocalNats]:
    server = start_nats(max_payload=4096)
    try:
        yield server
    finally:
        server.cleanup()


def test_an_oversized_row_becomes_a_dead_letter_marker_and_streaming_goes_on(
    database: str, small_nats: LocalNats, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    config = _config(
        tmp_path,
        database,
        small_nats.url,
        "deadletter",
        nats={"oversized": "dead-letter", "dead_letter_subject": "cdc.too_big"},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1, 'small')")
            with conn.transaction():
                conn.execute("INSERT INTO t VALUES (2, repeat('x', 10000))")
                conn.execute("INSERT INTO t VALUES (3, 'after')")
            end = parse_lsn(
                str(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
            )
        wait_for_messages(small_nats.url, "deadletter", 3)
        assert bridge.process is not None
        assert bridge.process.poll() is None  # still streaming
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    messages = read_stream(small_nats.url, "deadletter")
    assert [m.subject for m in messages] == ["t.insert", "cdc.too_big", "t.insert"]
    marker = messages[1]
    commit_lsn = marker.headers["Cdc-Commit-Lsn"]
    assert marker.headers["Cdc-Dead-Letter"] == "oversized"
    assert marker.headers["Nats-Msg-Id"] == f"cdc_bridge:{commit_lsn}:0"
    assert marker.body == {
        "reason": "oversized",
        "subject": "t.insert",
        "size": marker.body["size"],
        "max_payload": 4096,
        "table": "public.t",
        "op": "insert",
        "key": {"id": 2},
        "commit_lsn": commit_lsn,
        "index": "0",
        "msg_id": f"cdc_bridge:{commit_lsn}:0",
    }
    assert 10_000 < marker.body["size"] < 11_000
    assert messages[2].body["after"] == {"id": 3, "body": "after"}
    assert "over max_payload 4096: publishing a marker to cdc.too_big" in bridge.log_text()
    assert slot_state(database, "cdc_bridge")[0] >= end  # confirmed past the marker


def test_oversized_snapshot_and_backfill_rows_become_dead_letter_markers(
    database: str, small_nats: LocalNats, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO t VALUES (1, 'small'), (2, repeat('x', 10000)), (3, 'after')")
    # Subjects of its own: the module's other stream on this server has t.* and cdc.*.
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=small_nats.url,
        stream="deadletter_reads",
        tables={"public.t": {"subject": "reads.{op}"}},
        extra={"nats": {"oversized": "dead-letter", "dead_letter_subject": "reads.too_big"}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        backfill = subprocess.run(
            [sys.executable, "-m", "cdc_bridge", "backfill", "-c", str(config), "public.t"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert backfill.returncode == 0, backfill.stderr
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    messages = read_stream(small_nats.url, "deadletter_reads")
    assert [m.subject for m in messages] == ["reads.read", "reads.too_big", "reads.read"] * 2
    snapshot_marker, backfill_marker = messages[1], messages[4]
    for marker in (snapshot_marker, backfill_marker):
        assert marker.headers["Cdc-Dead-Letter"] == "oversized"
        assert marker.headers["Cdc-Op"] == "read"
        assert marker.body["key"] == {"id": 2}
        assert marker.body["op"] == "read"
    assert ":snapshot:" in snapshot_marker.headers["Nats-Msg-Id"]
    assert "Cdc-Backfill" in backfill_marker.headers
    assert bridge.log_text().count("over max_payload 4096: publishing a marker") == 2


def test_a_message_refused_by_the_stream_is_resent_after_the_fix_not_skipped(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    """JetStream refuses one message (the stream's max_msg_size) and stores the ones after
    it: the read-back must not take the later ones as proof that it is stored."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")

    async def create_stream(max_msg_size: int, update: bool = False) -> None:
        nc = await nats_client.connect(nats.url)
        try:
            js = nc.jetstream()
            config = StreamConfig(name=stream_name, subjects=["t.*"], max_msg_size=max_msg_size)
            await (js.update_stream(config) if update else js.add_stream(config))
        finally:
            await nc.close()

    asyncio.run(create_stream(2000))
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE PUBLICATION cdc_bridge FOR TABLE t")
        conn.execute("SELECT pg_create_logical_replication_slot('cdc_bridge', 'pgoutput')")
        conn.execute("INSERT INTO t VALUES (1, 'small')")
        conn.execute("INSERT INTO t VALUES (2, repeat('x', 3000))")  # over max_msg_size
        for row in range(3, 11):
            conn.execute("INSERT INTO t VALUES (%s, 'small')", (row,))
    bridge = BridgeProcess(
        _config(tmp_path, database, nats.url, stream_name), tmp_path / "bridge.log"
    )
    bridge.start(wait_streaming=False)
    try:
        last = _exit_line(bridge)
        assert "JetStream refused t.insert: message size exceeds maximum allowed" in last, last
        before = [m.body["after"]["id"] for m in read_stream(nats.url, stream_name)]
        assert before[0] == 1
        assert 2 not in before
        asyncio.run(create_stream(1 << 20, update=True))  # the operator's fix
        bridge.start()
        wait_for_messages(nats.url, stream_name, 10)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    ids = [m.body["after"]["id"] for m in read_stream(nats.url, stream_name)]
    assert sorted(ids) == list(range(1, 11))  # all, each once
    if len(before) > 1:  # later rows were stored before the refusal stopped the bridge
        assert ids == [*before, 2, *range(len(before) + 2, 11)]
        assert "re-sending 0/" in bridge.log_text()


def test_an_invalidated_slot_stops_the_bridge_with_what_to_do(
    nats: Any, stream_name: str, tmp_path: Path
) -> None:
    server = start_postgres(settings={"max_slot_wal_keep_size": "1MB"})
    try:
        dsn = server.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
            conn.execute("SELECT pg_create_logical_replication_slot('cdc_bridge', 'pgoutput')")
            # More WAL than the slot may keep, then a checkpoint: PostgreSQL gives it up.
            for _ in range(4):
                conn.execute(
                    "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g"
                )
                conn.execute("DELETE FROM t")
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            status = conn.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'cdc_bridge'"
            ).fetchone()
            assert status == ("lost",)
        bridge = BridgeProcess(_config(tmp_path, dsn, nats.url, stream_name), tmp_path / "b.log")
        bridge.start(wait_streaming=False)
        try:
            last = _exit_line(bridge)
        finally:
            bridge.stop_quietly()
        assert last == (
            "cdc-bridge: error: replication slot 'cdc_bridge' is invalidated (wal_status = lost): "
            "the WAL it needed was removed and changes were lost. Drop it (SELECT "
            "pg_drop_replication_slot('cdc_bridge')), start once with postgres.recreate_slot: "
            "true, and backfill the tables; raise max_slot_wal_keep_size so it does not happen "
            "again"
        )
    finally:
        server.cleanup()
