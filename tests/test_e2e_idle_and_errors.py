"""An idle slot keeps moving; bad input gets one clear line and a non-zero exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_bridge.local_servers import LocalNats, LocalPostgres, free_port, start_nats, start_postgres
from cdc_bridge.lsn import parse_lsn
from tests.fixtures.bridge import BridgeProcess, slot_state, write_config

pytestmark = pytest.mark.servers


def test_idle_slot_confirms_wal_written_elsewhere(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE published (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE unpublished (id serial PRIMARY KEY, payload text)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.published": {}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            for round_ in range(3):
                start, _ = slot_state(database, "cdc_bridge")
                conn.execute(
                    "INSERT INTO unpublished (payload) SELECT repeat('x', 100) "
                    "FROM generate_series(1, 200)"
                )
                row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
                assert row is not None
                written = parse_lsn(str(row[0]))
                assert written > start
                deadline = time.monotonic() + 15
                confirmed = start
                while confirmed < written and time.monotonic() < deadline:
                    time.sleep(0.1)
                    confirmed, _ = slot_state(database, "cdc_bridge")
                assert confirmed >= written, (
                    f"round {round_}: slot stuck at {confirmed:X}, WAL at {written:X}\n"
                    + bridge.log_text()
                )
    finally:
        bridge.stop_quietly()


def run_cli(config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "cdc_bridge", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cdc-bridge: error: "), result.stderr
    assert needle in last, last
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [last], result.stderr


def test_unknown_key_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "postgres:\n  dsn: postgresql://x@127.0.0.1/db\n  slott: typo\n"
        "tables:\n  public.conversations: {}\n"
    )
    assert_one_line_error(run_cli(config), 2, "postgres.slott: unknown key")


def test_unknown_nested_table_key_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "postgres:\n  dsn: postgresql://x@127.0.0.1/db\n"
        "tables:\n  public.conversations:\n    subjct: a.b\n"
    )
    assert_one_line_error(run_cli(config), 2, "tables.public.conversations.subjct: unknown key")


def test_bad_dsn(tmp_path: Path, nats: Any, stream_name: str) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        dsn="host=127.0.0.1 port=notaport ===",
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
    )
    assert_one_line_error(run_cli(config), 1, "postgres.dsn is not a valid connection string")


def test_unreachable_nats(database: str, tmp_path: Path, stream_name: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    url = f"nats://127.0.0.1:{free_port()}"
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=url,
        stream=stream_name,
        tables={"public.t": {}},
        extra={"nats": {"connect_timeout": 1}},
    )
    assert_one_line_error(run_cli(config), 1, f"cannot connect to NATS at {url}")


def test_missing_table_and_unroutable_placeholder(
    database: str, nats: Any, tmp_path: Path, stream_name: str
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE conversations (id int PRIMARY KEY, conversation_uuid uuid)")
    config = write_config(
        tmp_path / "missing.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.nope": {}},
    )
    assert_one_line_error(run_cli(config), 1, "table public.nope does not exist")
    config = write_config(
        tmp_path / "column.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.conversations": {"subject": "messages.{conversation_id}"}},
    )
    assert_one_line_error(
        run_cli(config), 1, "uses {conversation_id} but public.conversations has no such column"
    )
    config = write_config(
        tmp_path / "identity.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.conversations": {"subject": "messages.{conversation_uuid}"}},
    )
    assert_one_line_error(run_cli(config), 1, "REPLICA IDENTITY FULL")


@pytest.fixture(scope="module")
def replica_level_postgres() -> Iterator[LocalPostgres]:
    server = start_postgres(settings={"wal_level": "replica"})
    try:
        yield server
    finally:
        server.cleanup()


def test_wal_level_not_logical(
    replica_level_postgres: LocalPostgres, nats: Any, tmp_path: Path, stream_name: str
) -> None:
    dsn = replica_level_postgres.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=dsn,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
    )
    assert_one_line_error(run_cli(config), 1, "wal_level is 'replica' but must be 'logical'")


@pytest.fixture(scope="module")
def small_payload_nats() -> Iterator[LocalNats]:
    server = start_nats(max_payload=4096)
    try:
        yield server
    finally:
        server.cleanup()


def test_row_over_max_payload_stops_with_a_clear_error_and_keeps_the_slot(
    database: str, small_payload_nats: LocalNats, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=small_payload_nats.url,
        stream="oversized",
        tables={"public.t": {}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1, 'small')")
            conn.execute("INSERT INTO t VALUES (2, repeat('x', 10000))")
        assert bridge.process is not None
        assert bridge.process.wait(30) == 1
    finally:
        bridge.stop_quietly()
    last = bridge.log_text().strip().splitlines()[-1]
    assert re.fullmatch(
        r'cdc-bridge: error: the insert of public\.t key \{"id":2\} at commit [0-9A-F]+/[0-9A-F]+ '
        r"is 105\d\d bytes, over the NATS server's max_payload of 4096: raise max_payload "
        r"in nats-server, or set nats.oversized: dead-letter",
        last,
    ), last
    # The oversized change is still in the slot: fixing max_payload loses nothing.
    with psycopg.connect(database, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('cdc_bridge', NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'cdc_bridge') WHERE get_byte(data, 0) = 73"
        ).fetchone()
    assert rows == (1,), bridge.log_text()  # one Insert ('I' = 73) left: row 2
