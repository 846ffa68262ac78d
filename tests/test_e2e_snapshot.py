"""The initial snapshot (snapshot.mode), end to end against real servers.

Rows that exist before the bridge creates its slot arrive as op "read", converted like
streamed values; modes never and initial_only; an empty table; a composite key. The
heavy tests (100k rows under concurrent writes, a SIGKILL mid-snapshot) are also marked
``faults``: the stream folded per key must equal the table exactly.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats as nats_client
import orjson
import psycopg
import pytest

from tests.fixtures.bridge import (
    BridgeProcess,
    read_stream,
    wait_for_messages,
    wait_slot_inactive,
    write_config,
)
from tests.fixtures.tables import (
    Mutator,
    assert_converges,
    assert_no_duplicate_ids,
    fill_rows,
)
from tests.fixtures.workload import Workload, create_workload_table

pytestmark = pytest.mark.servers

SLOT = "cdc_bridge"


def _config(
    path: Path,
    database: str,
    nats_url: str,
    stream: str,
    tables: Mapping[str, Mapping[str, Any]],
    **extra: Mapping[str, Any],
) -> Path:
    sections: dict[str, Any] = {"reconnect": {"initial_delay": 0.2, "max_delay": 1}}
    sections.update(extra)
    return write_config(
        path,
        dsn=database,
        nats_url=nats_url,
        stream=stream,
        tables=tables,
        slot=SLOT,
        extra=sections,
    )


def _slot_exists(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)
        ).fetchone()
    return bool(row and row[0])


def _snapshot_rate(log_text: str) -> tuple[int, float]:
    found = re.findall(
        r"snapshot complete: (\d+) rows published in [\d.]+s \((\d+) rows/s\)", log_text
    )
    assert found, log_text[-3000:]
    rows, rate = found[-1]
    return int(rows), float(rate)


async def _progress_async(url: str, stream: str) -> dict[str, Any] | None:
    nc = await nats_client.connect(url)
    try:
        kv = await nc.jetstream().key_value("cdc-bridge-snapshots")
        entry = await kv.get(f"{stream}.{SLOT}")
        return orjson.loads(entry.value) if entry.value else None
    finally:
        await nc.close()


def _progress(url: str, stream: str) -> dict[str, Any] | None:
    return asyncio.run(_progress_async(url, stream))


# --------------------------------------------------------------------------- shapes


TYPES_TABLE = """
CREATE TABLE shapes (
    tenant text NOT NULL,
    n int NOT NULL,
    flag bool, amount numeric(12,3), ratio float8, doc jsonb, at timestamptz,
    raw bytea, tags text[], addr inet, code char(5), span interval, day date,
    uid uuid, doubled int GENERATED ALWAYS AS (n * 2) STORED,
    PRIMARY KEY (tenant, n)
)
"""

TYPES_ROW = (
    "true, 12.5, 'NaN', '{\"a\": [1, null]}', '2026-11-27 09:32:10.437+02', '\\x00ff', "
    "'{\"x y\",NULL}', '10.0.0.1', 'ab', '1 day 02:00:00', '2026-11-27', "
    "'9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b'"
)


def test_initial_snapshot_reads_existing_rows_like_streamed_ones(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(TYPES_TABLE)
        conn.execute("CREATE TABLE empty (id int PRIMARY KEY)")
        # Keys out of insertion order, a composite key: read back in key order.
        for tenant, n in (("b", 2), ("a", 10), ("a", 9), ("b", 1)):
            conn.execute(
                f"INSERT INTO shapes (tenant, n, flag, amount, ratio, doc, at, raw, tags, "
                f"addr, code, span, day, uid) VALUES (%s, %s, {TYPES_ROW})",
                (tenant, n),
            )
    bridge = BridgeProcess(
        _config(
            tmp_path / "config.yaml",
            database,
            nats.url,
            stream_name,
            {
                "public.shapes": {"subject": "t.shapes.{op}"},
                "public.empty": {"subject": "t.empty.{op}"},
            },
            snapshot={"chunk_size": 3},  # two chunks
        ),
        tmp_path / "bridge.log",
    )
    cleanup.append(bridge)
    bridge.start()
    # The same values, streamed.
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO shapes (tenant, n, flag, amount, ratio, doc, at, raw, tags, "
            f"addr, code, span, day, uid) VALUES ('c', 1, {TYPES_ROW})"
        )
    wait_for_messages(nats.url, stream_name, 5)
    messages = read_stream(nats.url, stream_name)
    assert bridge.terminate() == 0
    reads = [m for m in messages if m.body["op"] == "read"]
    assert [(m.body["key"]["tenant"], m.body["key"]["n"]) for m in reads] == [
        ("a", 9),
        ("a", 10),
        ("b", 1),
        ("b", 2),
    ]
    assert all(m.subject == "t.shapes.read" for m in reads)
    first = reads[0]
    assert first.headers["Cdc-Op"] == "read"
    assert first.headers["Cdc-Snapshot"] == "public.shapes"
    assert re.fullmatch(rf"{SLOT}:snapshot:1:public\.shapes:0:0", first.headers["Nats-Msg-Id"])
    assert reads[3].headers["Nats-Msg-Id"].endswith(":public.shapes:1:0")
    assert first.body["before"] is None
    assert first.body["source"]["snapshot"] is True
    assert first.body["source"]["xid"] is None
    insert = next(m for m in messages if m.body["op"] == "insert")
    streamed = {k: v for k, v in insert.body["after"].items() if k not in ("tenant", "n")}
    snapshotted = {k: v for k, v in first.body["after"].items() if k not in ("tenant", "n")}
    assert snapshotted == streamed
    assert "doubled" not in snapshotted  # generated columns are not sent by pgoutput either
    assert not [m for m in messages if m.headers.get("Cdc-Table") == "public.empty"]
    assert "snapshot of public.empty done" in bridge.log_text()
    # Started again on its own slot: no second snapshot.
    bridge.start()
    assert bridge.terminate() == 0
    assert len(read_stream(nats.url, stream_name)) == len(messages)


@pytest.mark.parametrize("envelope", ["debezium", "wal2json"])
def test_snapshot_rows_in_other_envelopes(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any], envelope: str
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
    bridge = BridgeProcess(
        _config(
            tmp_path / "config.yaml",
            database,
            nats.url,
            stream_name,
            {"public.t": {"subject": "t.{op}"}},
            envelope={"format": envelope},
        ),
        tmp_path / "bridge.log",
    )
    cleanup.append(bridge)
    bridge.start()
    assert bridge.terminate() == 0
    [message] = read_stream(nats.url, stream_name)
    if envelope == "debezium":
        assert message.body["op"] == "r"
        assert message.body["source"]["snapshot"] == "true"
        assert message.body["before"] is None
        assert message.body["after"] == {"id": 1, "v": "a"}
    else:
        assert message.body["action"] == "I"
        assert [c["value"] for c in message.body["columns"]] == [1, "a"]


def test_snapshot_modes_never_and_initial_only(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 25) g")
    tables = {"public.t": {"subject": "t.{op}"}}
    only = BridgeProcess(
        _config(
            tmp_path / "only.yaml",
            database,
            nats.url,
            stream_name,
            tables,
            # Paced: 10-row chunks at 40 rows/s, so at least 0.25 s after each full one.
            snapshot={"mode": "initial_only", "chunk_size": 10, "max_rows_per_second": 40},
        ),
        tmp_path / "only.log",
    )
    cleanup.append(only)
    only.start(wait_streaming=False)
    assert only.process is not None
    assert only.process.wait(60) == 0, only.log_text()
    assert not _slot_exists(database)
    [took] = re.findall(r"snapshot complete: 25 rows published in ([\d.]+)s", only.log_text())
    assert float(took) >= 0.5
    messages = read_stream(nats.url, stream_name)
    assert [m.body["after"]["id"] for m in messages] == list(range(1, 26))
    assert {m.body["op"] for m in messages} == {"read"}

    never = BridgeProcess(
        _config(
            tmp_path / "never.yaml",
            database,
            nats.url,
            stream_name,
            tables,
            snapshot={"mode": "never"},
        ),
        tmp_path / "never.log",
    )
    cleanup.append(never)
    never.start()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE t SET v = 'changed' WHERE id = 3")
    wait_for_messages(nats.url, stream_name, 26)
    assert never.terminate() == 0
    after = read_stream(nats.url, stream_name)
    assert len(after) == 26  # no snapshot: only the update
    assert after[-1].body["op"] == "update"
    assert "snapshot" not in never.log_text()


# --------------------------------------------------------------------------- heavy


@pytest.mark.faults
def test_snapshot_of_100k_rows_under_concurrent_writes_equals_the_table(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed {seed}")
    create_workload_table(database, "items")
    fill_rows(database, "items", 100_000)
    # The workload writes its own id ranges; the mutator the pre-filled rows.
    workload = Workload(database, "items", workers=2, rate=20.0, large_ops=(50, 200), seed=seed)
    cleanup.append(workload)
    workload.start_background()
    mutator = Mutator(database, "items", 100_000, seed)
    cleanup.append(mutator)
    bridge = BridgeProcess(
        _config(
            tmp_path / "config.yaml",
            database,
            nats.url,
            stream_name,
            {"public.items": {"subject": "items.{op}"}},
        ),
        tmp_path / "bridge.log",
    )
    cleanup.append(bridge)
    bridge.start(timeout=180)
    time.sleep(2)  # streaming under load
    mutator.stop()
    workload.stop_background()
    messages = assert_converges(database, nats.url, stream_name, "items")
    assert_no_duplicate_ids(messages)
    rows, rate = _snapshot_rate(bridge.log_text())
    assert rows >= 100_000 - mutator.count  # deleted ones may be gone at the snapshot
    assert bridge.terminate() == 0
    print(
        f"snapshot: {rows} rows at {rate:.0f} rows/s; {mutator.count} concurrent row writes, "
        f"{workload.committed} workload transactions; {len(messages)} messages"
    )


@pytest.mark.faults
def test_bridge_killed_mid_snapshot_resumes_after_the_last_acked_chunk(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed {seed}")
    create_workload_table(database, "items")
    fill_rows(database, "items", 60_000)
    mutator = Mutator(database, "items", 60_000, seed)
    cleanup.append(mutator)
    bridge = BridgeProcess(
        _config(
            tmp_path / "config.yaml",
            database,
            nats.url,
            stream_name,
            {"public.items": {"subject": "items.{op}"}},
            snapshot={"chunk_size": 2000},
        ),
        tmp_path / "bridge.log",
    )
    cleanup.append(bridge)
    bridge.start(wait_streaming=False)
    wait_for_messages(nats.url, stream_name, 8000, timeout=60)
    bridge.kill()
    progress = _progress(nats.url, stream_name)
    assert progress is not None
    assert not progress["done"], "killed too late: the snapshot had finished"
    acked = progress["tables"]["public.items"]
    assert acked["chunks"] >= 1
    last_key = int(acked["last_key"][0])
    wait_slot_inactive(database, SLOT, timeout=15)
    bridge.start(timeout=120)
    text = bridge.log_text()
    resumed = [line for line in text.splitlines() if "resuming snapshot of public.items" in line]
    assert len(resumed) == 1, text
    assert f'after key {{\\"id\\":\\"{last_key}\\"}}' in resumed[0], resumed[0]
    assert "relying on the duplicate window alone" not in text  # the read-back stops early
    mutator.stop()
    messages = assert_converges(database, nats.url, stream_name, "items")
    assert_no_duplicate_ids(messages)
    assert bridge.terminate() == 0
    reads = Counter(m.body["key"]["id"] for m in messages if m.body["op"] == "read")
    # Rows of the acknowledged chunks were not read again.
    again = [key for key, n in reads.items() if key <= last_key and n > 1]
    assert not again, f"rows of acknowledged chunks read twice: {again[:5]}"
    chunk_ids = {m.headers["Nats-Msg-Id"].split(":")[2] for m in messages if m.body["op"] == "read"}
    assert chunk_ids == {"1", "2"}  # the first run, and the resumed one
    print(f"killed after {acked['chunks']} acknowledged chunks (key {last_key})")
