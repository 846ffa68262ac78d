"""``cdc-bridge verify`` against a real bridge, PostgreSQL and nats-server.

Each test streams a small table, then breaks the stream or the table on purpose (a
message deleted by hand, a forged message, a change made while the slot was gone, a
stream whose limits dropped its first messages, a bridge that hangs behind) and checks
exactly what verify reports, its exit code, and that ``--repair`` makes the next verify
pass.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats as nats_client
import orjson
import psycopg
import pytest
from click.testing import CliRunner, Result

from cdc_bridge.cli import main
from cdc_bridge.lsn import parse_lsn
from cdc_bridge.verify.fold import key_text, sample_predicate
from tests.fixtures.bridge import (
    BridgeProcess,
    read_stream,
    wait_for_messages,
    wait_slot_inactive,
    write_config,
)

pytestmark = pytest.mark.servers

SLOT = "cdc_bridge"


def _verify(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["verify", "-c", str(config), "--wait", "20", *args])


def _json(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = _verify(config, "--json", *args)
    assert result.exit_code in (0, 1), result.output + result.stderr
    return result.exit_code, orjson.loads(result.stdout)


def _counts(report: dict[str, Any], table: str = "public.items") -> dict[str, int]:
    (found,) = [t for t in report["tables"] if t["table"] == table]
    return {
        "checked": found["checked"],
        "only_in_table": found["only_in_table"]["count"],
        "only_in_stream": found["only_in_stream"]["count"],
        "differing": found["differing"]["count"],
        "unverifiable": found["unverifiable"],
    }


def _equal(checked: int, unverifiable: int = 0) -> dict[str, int]:
    return {
        "checked": checked,
        "only_in_table": 0,
        "only_in_stream": 0,
        "differing": 0,
        "unverifiable": unverifiable,
    }


async def _js(url: str, action: Any) -> Any:
    nc = await nats_client.connect(url)
    try:
        return await action(nc.jetstream())
    finally:
        await nc.close()


def _delete_msg(url: str, stream: str, seq: int) -> None:
    asyncio.run(_js(url, lambda js: js.delete_msg(stream, seq)))


def _publish(url: str, subject: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    asyncio.run(_js(url, lambda js: js.publish(subject, orjson.dumps(body), headers=headers)))


@pytest.fixture
def bridge_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[BridgeProcess] = []

    def start(config: Path) -> BridgeProcess:
        bridge = BridgeProcess(config, tmp_path / f"bridge{len(started)}.log")
        bridge.start()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop_quietly()


ITEMS = (
    "CREATE TABLE items (id int PRIMARY KEY, version int NOT NULL, body text, "
    "doc jsonb, at timestamptz, price numeric, tags text[]);"
    "ALTER TABLE items ALTER body SET STORAGE EXTERNAL"  # a long body is stored out of line
)


def _mixed_workload(dsn: str) -> None:
    """Inserts, updates (an unchanged TOAST value, a key change), deletes, a truncate."""
    big = "".join(f"{i:05d}" for i in range(4000))  # 20 kB of digits: stored out of line
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (100, 1, 'gone', NULL, NULL, NULL, NULL)")
        conn.execute("TRUNCATE items")
        with conn.transaction():
            for i in range(1, 21):
                conn.execute(
                    "INSERT INTO items VALUES (%s, 1, %s, %s, '2026-11-27 10:00:00+02', "
                    "%s, ARRAY['a', %s])",
                    (
                        i,
                        big if i == 3 else f"row {i}",
                        orjson.dumps({"n": i}).decode(),
                        f"{i}.50",
                        f"t{i}",
                    ),
                )
        conn.execute("UPDATE items SET version = 2 WHERE id = 3")  # body: unchanged TOAST
        conn.execute("UPDATE items SET version = version + 1, body = 'edited' WHERE id < 6")
        conn.execute("UPDATE items SET id = 50 WHERE id = 7")  # the key changes
        conn.execute("DELETE FROM items WHERE id IN (8, 9)")
        conn.execute("INSERT INTO items VALUES (9, 1, 'again', NULL, NULL, NULL, NULL)")


def _items_config(tmp_path: Path, dsn: str, url: str, stream: str, **extra: Any) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        dsn=dsn,
        nats_url=url,
        stream=stream,
        tables={"public.items": {"subject": "items.{op}"}},
        extra=extra,
    )


def test_equal_after_a_mixed_workload_then_breaks_are_found_and_repaired(
    database: str, nats: Any, stream_name: str, tmp_path: Path, bridge_factory: Any
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(ITEMS)
        conn.execute("INSERT INTO items VALUES (1000, 1, 'before the slot', NULL, NULL, 1, NULL)")
    config = _items_config(tmp_path, database, nats.url, stream_name)
    bridge_factory(config)
    _mixed_workload(database)
    # read 1000, insert 100, truncate, 20 inserts, 1 + 5 + 1 updates, 2 deletes, 1 insert
    wait_for_messages(nats.url, stream_name, 33)

    code, report = _json(config)
    assert code == 0
    assert _counts(report) == _equal(19)  # 20 - 2 deleted + 1 re-inserted; 1000 truncated
    assert report["ok"] is True
    assert report["history"] == {"complete": True, "note": None}
    assert report["mode"] == "full"
    assert report["envelope"] == "native"

    # Break the stream: drop row 12's only message, forge a row and a wrong value.
    messages = read_stream(nats.url, stream_name)
    (insert_12,) = [m for m in messages if m.body["op"] == "insert" and m.body["after"]["id"] == 12]
    _delete_msg(nats.url, stream_name, insert_12.seq)
    lsn = insert_12.headers["Cdc-Commit-Lsn"]
    forged = {"op": "insert", "after": {"id": 77, "version": 1}, "unchanged_toast": []}
    _publish(
        nats.url,
        "items.insert",
        forged,
        {
            "Nats-Msg-Id": f"{SLOT}:{lsn}:9001",
            "Cdc-Op": "insert",
            "Cdc-Table": "public.items",
            "Cdc-Commit-Lsn": lsn,
        },
    )
    wrong = {"op": "update", "after": {"id": 15, "version": 9, "price": "0"}}
    _publish(
        nats.url,
        "items.update",
        wrong,
        {
            "Nats-Msg-Id": f"{SLOT}:{lsn}:9002",
            "Cdc-Op": "update",
            "Cdc-Table": "public.items",
            "Cdc-Commit-Lsn": lsn,
        },
    )

    result = _verify(config, "--examples", "3")
    assert result.exit_code == 1, result.output
    text = result.stdout
    assert 'only in table      1 (5.00%)  e.g. {"id":12}' in text
    assert 'only in stream     1 (5.00%)  e.g. {"id":77}' in text
    assert "differing          1 (5.00%)" in text
    assert 'e.g.             {"id":15}: version, price' in text
    assert re.search(r"result: MISMATCH \(15\.000% at most, above --max-mismatch 0%\)", text)

    # Within a generous threshold the exit code is 0; the report is the same.
    code, report = _json(config, "--max-mismatch", "20")
    assert code == 0
    assert _counts(report) == {
        "checked": 20,
        "only_in_table": 1,
        "only_in_stream": 1,
        "differing": 1,
        "unverifiable": 0,
    }
    (table,) = report["tables"]
    assert table["only_in_table"]["examples"] == [{"id": 12}]
    assert table["only_in_stream"]["examples"] == [{"id": 77}]
    assert table["differing"]["examples"] == [{"key": {"id": 15}, "columns": ["version", "price"]}]
    assert table["differing"]["columns"] == {"version": 1, "price": 1}
    assert table["mismatch_percent"] == 15.0

    metrics = _verify(config, "--metrics")
    assert metrics.exit_code == 1
    labels = f'outcome="only_in_table",stream="{stream_name}",table="public.items"'
    assert f"cdc_bridge_verify_rows{{{labels}}} 1.0" in metrics.stdout
    assert f'cdc_bridge_verify_ok{{stream="{stream_name}"}} 0.0' in metrics.stdout

    repaired = _verify(config, "--repair", "--json")
    assert repaired.exit_code == 1
    assert orjson.loads(repaired.stdout)["tables"][0]["repaired"] == 3
    after = read_stream(nats.url, stream_name)[-3:]
    assert [(m.subject, m.body["op"]) for m in after] == [
        ("items.read", "read"),
        ("items.read", "read"),
        ("items.delete", "delete"),
    ]
    ids = [m.headers["Nats-Msg-Id"] for m in after]
    assert all(re.fullmatch(rf"{SLOT}:verify:[0-9A-F]+/[0-9A-F]+:public\.items:\d", i) for i in ids)
    repair_lsn = after[0].headers["Cdc-Repair"]
    assert [m.headers["Cdc-Repair"] for m in after] == [repair_lsn] * 3
    assert all(i.startswith(f"{SLOT}:verify:{repair_lsn}:") for i in ids)

    code, report = _json(config)
    assert code == 0, report
    assert _counts(report) == _equal(19)

    status = CliRunner().invoke(main, ["status", "-c", str(config), "--json"])
    assert status.exit_code == 0, status.output
    last = orjson.loads(status.stdout)["last_verify"]
    assert last["ok"] is True
    assert last["lsn"] == report["lsn"]
    assert last["tables"]["public.items"]["checked"] == 19


def test_a_change_lost_with_a_dropped_slot_is_reported(
    database: str, nats: Any, stream_name: str, tmp_path: Path, bridge_factory: Any
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(ITEMS)
    config = _items_config(tmp_path, database, nats.url, stream_name)
    bridge = bridge_factory(config)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO items (id, version, body) SELECT g, 1, 'x' FROM generate_series(1, 5) g"
        )
    wait_for_messages(nats.url, stream_name, 5)
    assert bridge.terminate() == 0
    wait_slot_inactive(database, SLOT)

    # The bridge is stopped and the WAL moves on: verify cannot prove anything.
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE other (id int)")
    stopped = CliRunner().invoke(main, ["verify", "-c", str(config), "--wait", "1"])
    assert stopped.exit_code == 2
    assert re.fullmatch(
        r"cdc-bridge: error: slot 'cdc_bridge' is not active: no bridge is running \(it "
        r"confirmed [0-9A-F]+/[0-9A-F]+, verify needs [0-9A-F]+/[0-9A-F]+\); start the "
        r"bridge, then run verify again\n",
        stopped.stderr,
    ), stopped.stderr

    # The lost-data scenario: the slot dropped, rows changed, a new slot without snapshot.
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot('cdc_bridge')")
        conn.execute("UPDATE items SET version = 2, body = 'lost' WHERE id = 2")
        conn.execute("INSERT INTO items (id, version, body) VALUES (6, 1, 'lost')")
        conn.execute("DELETE FROM items WHERE id = 4")
    config = _items_config(
        tmp_path,
        database,
        nats.url,
        stream_name,
        postgres={"recreate_slot": True},
        snapshot={"mode": "never"},
    )
    bridge_factory(config)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO items (id, version, body) VALUES (7, 1, 'streamed')")

    code, report = _json(config)
    assert code == 1
    assert _counts(report) == {
        "checked": 7,
        "only_in_table": 1,
        "only_in_stream": 1,
        "differing": 1,
        "unverifiable": 0,
    }
    (table,) = report["tables"]
    assert table["only_in_table"]["examples"] == [{"id": 6}]
    assert table["only_in_stream"]["examples"] == [{"id": 4}]
    assert table["differing"]["examples"] == [{"key": {"id": 2}, "columns": ["version", "body"]}]

    # Unknown table names and combined options are errors (exit 2).
    unknown = _verify(config, "public.nope")
    assert unknown.exit_code == 2
    assert unknown.stderr == (
        "cdc-bridge: error: table public.nope is not in the config's tables: "
        "(configured: public.items)\n"
    )
    assert _verify(config, "--sample", "3", "--full").exit_code == 2


def test_a_bridge_behind_is_an_error_not_a_mismatch(
    database: str, nats: Any, stream_name: str, tmp_path: Path, bridge_factory: Any
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(ITEMS)
    config = _items_config(tmp_path, database, nats.url, stream_name)
    bridge = bridge_factory(config)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO items (id, version, body) SELECT g, 1, 'x' FROM generate_series(1, 3) g"
        )
    wait_for_messages(nats.url, stream_name, 3)

    # The bridge hangs (SIGSTOP): its slot stays active, its confirmed_flush_lsn stays
    # below every change made from now on. Verify must not compare a stream that lacks
    # them (row 4 would look only in the table): it gives up after --wait, exit 2.
    os.kill(bridge.process.pid, signal.SIGSTOP)
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO items (id, version, body) VALUES (4, 1, 'x')")
        started = time.monotonic()
        behind = CliRunner().invoke(main, ["verify", "-c", str(config), "--wait", "1"])
        elapsed = time.monotonic() - started
        with psycopg.connect(database, autocommit=True) as conn:
            row = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)
            ).fetchone()
        assert row == (True,)  # still the "behind" case, not the "stopped" one
    finally:
        os.kill(bridge.process.pid, signal.SIGCONT)
    assert behind.exit_code == 2, behind.output
    found = re.fullmatch(
        r"cdc-bridge: error: the bridge is (\d+) bytes of WAL behind after 1s \(slot "
        r"'cdc_bridge' confirmed ([0-9A-F]+/[0-9A-F]+), verify needs ([0-9A-F]+/[0-9A-F]+)\): "
        r"let it catch up, or give it longer with --wait SECONDS\n",
        behind.stderr,
    )
    assert found is not None, behind.stderr
    assert behind.stdout == ""
    confirmed, needed = parse_lsn(found[2]), parse_lsn(found[3])
    assert int(found[1]) == needed - confirmed > 0
    assert elapsed < 15  # --wait 1, not the default 60 s

    # Resumed, the bridge catches up and the same verify passes: nothing was lost.
    code, report = _json(config)
    assert code == 0, report
    assert _counts(report) == _equal(4)


def test_retention_dropped_messages_are_not_false_mismatches(
    database: str, nats: Any, stream_name: str, tmp_path: Path, bridge_factory: Any
) -> None:
    async def create(js: Any) -> None:
        await js.add_stream(name=stream_name, subjects=["items.*"], max_msgs=6)

    asyncio.run(_js(nats.url, create))
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(ITEMS)
    config = _items_config(tmp_path, database, nats.url, stream_name)
    bridge_factory(config)
    with psycopg.connect(database, autocommit=True) as conn:
        for i in range(1, 11):
            conn.execute("INSERT INTO items (id, version, body) VALUES (%s, 1, 'x')", (i,))
        conn.execute("UPDATE items SET version = 2 WHERE id = 1")  # its insert is gone
        conn.execute("DELETE FROM items WHERE id = 2")
    # 12 messages, the stream keeps the last 6: inserts 7-10, the update, the delete.
    code, report = _json(config)
    assert code == 0, report
    assert _counts(report) == _equal(5, unverifiable=4)  # 1, 7-10 checked; 3-6 not
    assert report["history"]["complete"] is False
    assert report["history"]["note"] == (
        f"stream {stream_name} no longer holds its first 6 messages (max_msgs 6; first "
        "sequence 7): only keys whose state the stream still fully knows are compared; "
        "table rows without a message in it are counted as not comparable"
    )
    text = _verify(config).stdout
    assert "not comparable     4 table rows" in text

    # A gap inside a stream with limits reads as retention too: no false mismatch.
    messages = read_stream(nats.url, stream_name)
    (insert_9,) = [m for m in messages if m.body["op"] == "insert" and m.body["after"]["id"] == 9]
    _delete_msg(nats.url, stream_name, insert_9.seq)
    code, report = _json(config)
    assert code == 0  # an interior gap in a stream with limits: 9 is not comparable now
    assert _counts(report) == _equal(4, unverifiable=5)


def test_a_big_table_with_sample(
    database: str, nats: Any, stream_name: str, tmp_path: Path, bridge_factory: Any
) -> None:
    rows = 4000
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(ITEMS)
        conn.execute(
            "INSERT INTO items SELECT g, 1, md5(g::text), jsonb_build_object('g', g), "
            "'2026-01-01'::timestamptz + g * interval '1 minute', g / 7.0, ARRAY[g::text] "
            "FROM generate_series(1, %s) g",
            (rows,),
        )
    config = _items_config(tmp_path, database, nats.url, stream_name)
    bridge_factory(config)  # the initial snapshot publishes the rows as op read
    wait_for_messages(nats.url, stream_name, rows)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE items SET price = 0 WHERE id % 100 = 0")  # streamed: equal

    seed = "fixed-seed"
    keep = sample_predicate(400 / rows, seed)
    assert keep is not None
    expected = sum(1 for i in range(1, rows + 1) if keep(key_text(["id"], {"id": i}) or ""))
    code, report = _json(config, "--sample", "400", "--seed", seed)
    assert code == 0, report
    assert report["mode"] == "sample"
    assert report["sample"] == 400
    assert _counts(report) == _equal(expected)
    assert 300 < expected < 500

    code, report = _json(config, "--full")
    assert code == 0
    assert _counts(report) == _equal(rows)
    (table,) = report["tables"]
    assert table["messages"] == rows + 40
    print(f"full verify of {rows} rows: {report['duration_seconds']}s")


def _id(body: dict[str, Any]) -> object:
    """The id a row message states, in any envelope."""
    if "columns" in body:  # wal2json
        return next((c["value"] for c in body["columns"] if c["name"] == "id"), None)
    return (body.get("after") or {}).get("id")


@pytest.mark.parametrize("envelope", ["wal2json", "debezium"])
def test_other_envelopes_fold_too(
    envelope: str,
    database: str,
    nats: Any,
    stream_name: str,
    tmp_path: Path,
    bridge_factory: Any,
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(ITEMS)
        conn.execute("INSERT INTO items VALUES (1000, 1, 'snapshot', '[1]', NULL, 1, '{}')")
    config = _items_config(
        tmp_path,
        database,
        nats.url,
        stream_name,
        envelope={"format": envelope},
        tables={
            "public.items": {
                "subject": "items.{op}",
                "exclude_columns": ["tags"],
                "mask": {"body": {"truncate": 3}},
            }
        },
    )
    bridge_factory(config)
    _mixed_workload(database)
    code, report = _json(config)
    assert code == 0, report
    assert report["envelope"] == envelope
    assert _counts(report) == _equal(19)

    messages = read_stream(nats.url, stream_name)
    # The insert of 12 (its only message): wal2json and Debezium state it differently.
    (insert_12,) = [m for m in messages if m.headers["Cdc-Op"] == "insert" and _id(m.body) == 12]
    _delete_msg(nats.url, stream_name, insert_12.seq)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE items SET version = 5 WHERE id = 3")  # body: unchanged TOAST
    code, report = _json(config, "--repair")
    assert code == 1
    assert _counts(report) == {
        "checked": 19,
        "only_in_table": 1,
        "only_in_stream": 0,
        "differing": 0,
        "unverifiable": 0,
    }
    assert report["tables"][0]["repaired"] == 1
    code, report = _json(config)
    assert code == 0
    assert _counts(report) == _equal(19)
