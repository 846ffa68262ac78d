"""Online backfills (cdc-bridge backfill), end to end against real servers.

The promise: while the stream goes on, a backfill re-sends the table's rows (op "read")
so that the stream folded per key equals the table, exactly, with every message id
once; a WHERE clause limits it; a SIGKILL mid-backfill resumes after the last
acknowledged chunk; a cancel stops it.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats as nats_client
import orjson
import psycopg
import pytest

from tests.fixtures.bridge import BridgeProcess, read_stream, write_config
from tests.fixtures.tables import (
    Mutator,
    assert_converges,
    assert_no_duplicate_ids,
    fill_rows,
)
from tests.fixtures.workload import create_workload_table

pytestmark = pytest.mark.servers

SLOT = "cdc_bridge"
BUCKET = "cdc-bridge-backfills"


def _config(tmp_path: Path, database: str, nats_url: str, stream: str, **snapshot: Any) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats_url,
        stream=stream,
        tables={"public.items": {"subject": "items.{op}"}},
        slot=SLOT,
        extra={
            "reconnect": {"initial_delay": 0.2, "max_delay": 1},
            "snapshot": {"mode": "never", **snapshot},
        },
    )


def _cli(config: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_bridge", "backfill", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def _records_async(url: str, stream: str) -> list[dict[str, Any]]:
    nc = await nats_client.connect(url)
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        records = []
        for key in await kv.keys():
            if not key.startswith(f"{stream}.{SLOT}."):
                continue  # another test's
            entry = await kv.get(key)
            assert entry.value is not None
            records.append(orjson.loads(entry.value))
        return sorted(records, key=lambda r: r["id"])
    finally:
        await nc.close()


def _records(url: str, stream: str) -> list[dict[str, Any]]:
    return asyncio.run(_records_async(url, stream))


def _wait_record(url: str, stream: str, check: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = _records(url, stream)
        except Exception:
            records = []
        if records and check(records[-1]):
            return records[-1]
        assert time.monotonic() < deadline, f"backfill record never matched: {records}"
        time.sleep(0.1)


def _reads(url: str, stream: str) -> list[Any]:
    return [m for m in read_stream(url, stream) if m.body["op"] == "read"]


def test_backfill_where_resends_only_those_rows_in_key_order(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    create_workload_table(database, "items")
    fill_rows(database, "items", 100)
    config = _config(tmp_path, database, nats.url, stream_name, chunk_size=4)
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    cleanup.append(bridge)
    bridge.start()

    done = _cli(config, "public.items", "--where", "id % 10 = 0")
    assert done.returncode == 0, done.stderr
    requested, summary = done.stdout.strip().splitlines()
    backfill_id = re.search(r"backfill (\S+) of public.items where id % 10 = 0", requested)
    assert backfill_id, requested
    assert "requested (about" in requested
    assert summary.startswith(f"backfill {backfill_id[1]} of public.items where id % 10 = 0: done")
    assert "10 rows published in 3 chunks" in summary  # 4 + 4 + 2

    reads = _reads(nats.url, stream_name)
    assert [m.body["after"]["id"] for m in reads] == list(range(10, 101, 10))
    assert [m.body["after"]["body"] for m in reads] == [f"row {i}" for i in range(10, 101, 10)]
    assert {m.subject for m in reads} == {"items.read"}
    for message in reads:
        assert message.headers["Cdc-Backfill"] == backfill_id[1]
        assert message.headers["Cdc-Op"] == "read"
        # A WAL position: the high watermark's commit LSN, and an index after the
        # watermark message's own (0).
        assert re.fullmatch(rf"{SLOT}:[0-9A-F]+/[0-9A-F]+:[1-4]", message.headers["Nats-Msg-Id"])
        assert message.headers["Cdc-Commit-Lsn"] == message.body["source"]["commit_lsn"]
    assert_no_duplicate_ids(reads)

    [record] = _records(nats.url, stream_name)
    assert record["status"] == "done"
    assert (record["rows"], record["chunks"], record["dropped"]) == (10, 3, 0)
    assert record["last_key"] == ["100"]
    listed = _cli(config, "--list")
    assert listed.returncode == 0
    assert f"backfill {backfill_id[1]} of public.items where id % 10 = 0: done" in listed.stdout
    status = subprocess.run(
        [sys.executable, "-m", "cdc_bridge", "status", "-c", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "backfills            none running (1 ended; cdc-bridge backfill --list)" in (
        status.stdout
    )
    assert bridge.terminate() == 0
    assert "done: 10 rows published" in bridge.log_text()


def test_backfill_bad_requests_exit_non_zero_with_the_fix(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    create_workload_table(database, "items")
    config = _config(tmp_path, database, nats.url, stream_name)
    bad_where = _cli(config, "public.items", "--where", "no_such_column > 1")
    assert bad_where.returncode == 2
    assert bad_where.stderr.strip().splitlines()[-1] == (
        "cdc-bridge: error: --where is not a valid condition on public.items: column "
        '"no_such_column" does not exist'
    )
    unknown = _cli(config, "public.nope")
    assert unknown.returncode == 2
    assert "table public.nope is not in the config's tables: (configured: public.items)" in (
        unknown.stderr
    )
    both = _cli(config, "public.items", "--list")
    assert both.returncode == 2
    assert "give one of: TABLE, --watch ID, --cancel ID, --list" in both.stderr
    missing = _cli(config, "--cancel", "20990101T000000-abcd")
    assert missing.returncode == 1
    assert "no backfill 20990101T000000-abcd" in missing.stderr


def test_backfill_under_concurrent_writes_equals_the_table(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    """40 chunks of 250 rows while two writers update, delete and insert rows of the same
    key range: rows a concurrent change overtook must be left out, not published stale."""
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed {seed}")
    rows = 10_000
    create_workload_table(database, "items")
    fill_rows(database, "items", rows)
    config = _config(tmp_path, database, nats.url, stream_name, chunk_size=250)
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    cleanup.append(bridge)
    bridge.start()
    mutators = [
        Mutator(database, "items", rows, seed + n, new_ids_from=rows + 1 + n * 1_000_000)
        for n in range(2)
    ]
    cleanup.extend(mutators)
    started = time.monotonic()
    done = _cli(config, "public.items")
    elapsed = time.monotonic() - started
    for mutator in mutators:
        mutator.stop()
    assert done.returncode == 0, done.stderr
    messages = assert_converges(database, nats.url, stream_name, "items")
    assert_no_duplicate_ids(messages)
    [record] = _records(nats.url, stream_name)
    assert record["status"] == "done"
    writes = sum(m.count for m in mutators)
    # Every row that existed at the end of its chunk was read: published or left out.
    assert rows - writes <= record["rows"] + record["dropped"] <= rows + writes
    assert len([m for m in messages if m.body["op"] == "read"]) == record["rows"]
    assert bridge.terminate() == 0
    print(
        f"backfill of {rows} rows under {writes} concurrent writes: {record['rows']} "
        f"published, {record['dropped']} left out, {record['reread_chunks']} chunks read "
        f"again, {elapsed:.1f}s end to end ({rows / elapsed:.0f} rows/s)"
    )


def test_backfill_of_a_table_whose_deletes_carry_another_unique_index(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    """REPLICA IDENTITY USING INDEX (uid): a delete names its row by uid only, so the
    chunks go in uid order and a delete overtaking a chunk is still recognised."""
    rows = 3_000
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, version int NOT NULL, body text, "
            "uid bigserial NOT NULL)"
        )
        conn.execute("CREATE UNIQUE INDEX items_uid ON items (uid)")
        conn.execute("ALTER TABLE items REPLICA IDENTITY USING INDEX items_uid")
    fill_rows(database, "items", rows)
    config = _config(tmp_path, database, nats.url, stream_name, chunk_size=100)
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    cleanup.append(bridge)
    bridge.start()
    mutator = Mutator(database, "items", rows, seed=11)
    cleanup.append(mutator)
    done = _cli(config, "public.items")
    mutator.stop()
    assert done.returncode == 0, done.stderr

    def table() -> dict[int, dict[str, Any]]:
        with psycopg.connect(database, autocommit=True) as conn:
            found = conn.execute("SELECT uid, id, version, body FROM items").fetchall()
        return {r[0]: {"uid": r[0], "id": r[1], "version": r[2], "body": r[3]} for r in found}

    deadline = time.monotonic() + 60
    while True:
        messages = read_stream(nats.url, stream_name)
        folded: dict[int, dict[str, Any]] = {}
        for message in messages:
            body = message.body
            if body["op"] == "delete":
                folded.pop(body["before"]["uid"], None)
            else:
                folded[body["after"]["uid"]] = body["after"]
        if folded == table() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert folded == table()
    assert_no_duplicate_ids(messages)
    [record] = _records(nats.url, stream_name)
    assert record["key_columns"] == ["uid"]
    assert record["status"] == "done"
    assert bridge.terminate() == 0


@pytest.mark.faults
def test_backfill_resumes_after_sigkill_and_can_be_cancelled(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    rows = 12_000
    create_workload_table(database, "items")
    fill_rows(database, "items", rows)
    # Paced, so that the kill lands mid-backfill: 500-row chunks at 4,000 rows/s.
    config = _config(
        tmp_path, database, nats.url, stream_name, chunk_size=500, max_rows_per_second=4000
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    cleanup.append(bridge)
    bridge.start()
    mutator = Mutator(database, "items", rows, seed=7)
    cleanup.append(mutator)
    requested = _cli(config, "public.items", "--detach")
    assert requested.returncode == 0, requested.stderr
    assert "follow it with: cdc-bridge backfill --watch" in requested.stdout
    before = _wait_record(nats.url, stream_name, lambda r: r["chunks"] >= 6)
    # Paced: each chunk took at least its rows / max_rows_per_second.
    assert before["rows"] / before["active_seconds"] <= 4000
    bridge.kill()
    stored = _records(nats.url, stream_name)[-1]
    assert stored["status"] == "running"
    status = subprocess.run(
        [sys.executable, "-m", "cdc_bridge", "status", "-c", str(config), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    [unfinished] = orjson.loads(status.stdout)["backfills"]["unfinished"]
    assert (unfinished["id"], unfinished["status"]) == (stored["id"], "running")
    seq_at_kill = max(m.seq for m in read_stream(nats.url, stream_name))
    bridge.start()
    backfill_id = stored["id"]
    watched = _cli(config, "--watch", backfill_id)
    mutator.stop()
    assert watched.returncode == 0, watched.stderr
    assert f"backfill {backfill_id} of public.items: done" in watched.stdout
    assert f"resuming backfill {backfill_id}" in bridge.log_text()
    messages = assert_converges(database, nats.url, stream_name, "items")
    assert_no_duplicate_ids(messages)
    record = _records(nats.url, stream_name)[-1]
    reads = [m for m in messages if m.body["op"] == "read"]
    # At most the chunk in flight at the kill was published twice.
    assert record["rows"] <= len(reads) <= record["rows"] + 500
    assert record["chunks"] >= before["chunks"]
    # The resumed run went on after the last stored key, not from the start.
    resumed = [m.body["after"]["id"] for m in reads if m.seq > seq_at_kill]
    assert resumed
    assert min(resumed) > int(stored["last_key"][0])

    # A cancel stops the next one after its chunk in flight.
    slow = _cli(config, "public.items", "--detach")
    assert slow.returncode == 0
    cancel_id = re.search(r"backfill (\S+) of", slow.stdout)
    assert cancel_id
    _wait_record(nats.url, stream_name, lambda r: r["id"] == cancel_id[1] and r["chunks"] >= 1)
    cancelled = _cli(config, "--cancel", cancel_id[1])
    assert cancelled.returncode == 0
    assert "cancel requested" in cancelled.stdout or "cancelled" in cancelled.stdout
    watched = _cli(config, "--watch", cancel_id[1])
    assert watched.returncode == 1
    assert f"backfill {cancel_id[1]} of public.items: cancelled" in watched.stdout
    final = _records(nats.url, stream_name)[-1]
    assert final["status"] == "cancelled"
    assert final["rows"] < rows
    assert bridge.terminate() == 0
