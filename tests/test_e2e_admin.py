"""Admin commands against real servers: check, setup, status, teardown, tail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats as nats_client
import orjson
import psycopg
import pytest

from cdc_bridge.local_servers import LocalPostgres, start_postgres
from cdc_bridge.lsn import parse_lsn
from tests.fixtures.bridge import (
    BridgeProcess,
    read_stream,
    slot_state,
    wait_for_messages,
    wait_slot_inactive,
    write_config,
)
from tests.fixtures.servers import run_async

pytestmark = pytest.mark.servers

TABLE = "CREATE TABLE conversations (id bigserial PRIMARY KEY, conversation_uuid uuid, body text)"


def cli(
    *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "cdc_bridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=stdin,
    )


def _config(tmp_path: Path, database: str, nats: Any, stream: str, **tables: Any) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream,
        tables=tables or {"public.conversations": {}},
    )


def _insert(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conversations (conversation_uuid, body) "
            "SELECT gen_random_uuid(), 'row ' || g FROM generate_series(1, %s) g",
            (rows,),
        )


def _objects(dsn: str) -> tuple[bool, bool]:
    """(slot exists, publication exists)"""
    with psycopg.connect(dsn, autocommit=True) as conn:
        slot = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'cdc_bridge'")
        has_slot = slot.fetchone() is not None
        pub = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = 'cdc_bridge'")
        return has_slot, pub.fetchone() is not None


async def _stream_exists(url: str, name: str) -> bool:
    from cdc_bridge.admin import jetstream
    from cdc_bridge.config import NatsSettings

    nc = await jetstream.connect(NatsSettings(url=url))
    try:
        return await jetstream.stream_info(nc, name) is not None
    finally:
        await jetstream.close(nc)


def _rows(output: str) -> dict[str, str]:
    """check's table: name → symbol."""
    rows = {}
    for line in output.splitlines():
        if line[:1] in ("✓", "!", "✗"):
            name = line[2:].split("  ", 1)[0].strip()
            rows[name] = line[0]
    return rows


# --------------------------------------------------------------------------- check


def test_check_good_setup_passes(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(TABLE)
    config = _config(tmp_path, database, nats, stream_name)
    before = cli("check", "-c", str(config))
    # Nothing created yet: warnings (run would create them), no failure.
    assert before.returncode == 0, before.stdout + before.stderr
    rows = _rows(before.stdout)
    assert rows["slot cdc_bridge"] == "!"
    assert rows["publication cdc_bridge"] == "!"
    assert rows[f"stream {stream_name}"] == "!"
    assert "✗" not in before.stdout
    assert _objects(database) == (False, False)  # check is read-only
    assert not run_async(_stream_exists(nats.url, stream_name))

    assert cli("setup", "-c", str(config)).returncode == 0
    result = cli("check", "-c", str(config))
    assert result.returncode == 0, result.stdout
    rows = _rows(result.stdout)
    assert set(rows.values()) == {"✓"}, result.stdout
    for name in (
        "postgres.connect",
        "postgres.version",
        "postgres.wal_level",
        "postgres.max_replication_slots",
        "postgres.max_wal_senders",
        "postgres.role",
        "table public.conversations",
        "publication cdc_bridge",
        "slot cdc_bridge",
        "nats.connect",
        "nats.jetstream",
        f"stream {stream_name}",
        "nats.max_payload",
        "nats.atomic_batches",
    ):
        assert name in rows, result.stdout
    assert "all checks passed" in result.stdout
    # setup created the stream as run does: allowing atomic batches.
    assert "each transaction is stored as a whole" in result.stdout

    as_json = cli("check", "-c", str(config), "--json")
    assert as_json.returncode == 0
    report = orjson.loads(as_json.stdout)
    assert report["ok"] is True
    assert {c["status"] for c in report["checks"]} == {"ok"}


def test_check_reports_each_problem_with_its_fix(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(TABLE)
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={
            "public.nope": {},
            "public.conversations": {"subject": "messages.{conversation_uuid}"},
        },
        extra={"postgres": {"create_if_missing": False}},
    )
    result = cli("check", "-c", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    rows = _rows(result.stdout)
    assert rows["table public.nope"] == "✗"
    assert "fix: create public.nope (names are case-sensitive), or remove tables.public.nope" in (
        result.stdout
    )
    assert rows["table public.conversations"] == "✗"
    assert "ALTER TABLE public.conversations REPLICA IDENTITY FULL" in result.stdout
    # create_if_missing false: a missing slot and publication are failures, with the SQL.
    assert rows["slot cdc_bridge"] == "✗"
    assert "fix: SELECT pg_create_logical_replication_slot('cdc_bridge', 'pgoutput');" in (
        result.stdout
    )
    assert rows["publication cdc_bridge"] == "✗"
    assert "CREATE PUBLICATION cdc_bridge FOR TABLE" in result.stdout
    assert "publish_via_partition_root = true" in result.stdout
    assert rows["postgres.wal_level"] == "✓"  # the rest is still checked
    assert "4 problems" in result.stdout
    report = orjson.loads(cli("check", "-c", str(config), "--json").stdout)
    assert report["ok"] is False
    failed = {c["name"]: c for c in report["checks"] if c["status"] == "fail"}
    assert set(failed) == {
        "table public.nope",
        "table public.conversations",
        "publication cdc_bridge",
        "slot cdc_bridge",
    }


def test_check_stream_that_misses_subjects(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(TABLE)
    config = _config(tmp_path, database, nats, stream_name)
    assert cli("setup", "-c", str(config)).returncode == 0
    other = _config(
        tmp_path, database, nats, stream_name, **{"public.conversations": {"subject": "x.{id}"}}
    )
    result = cli("check", "-c", str(other))
    assert result.returncode == 1
    assert _rows(result.stdout)[f"stream {stream_name}"] == "✗"
    assert "but not x.*" in result.stdout


def test_check_warns_about_a_stream_without_atomic_batches(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(TABLE)
    config = _config(tmp_path, database, nats, stream_name)

    async def create_plain_stream() -> None:
        nc = await nats_client.connect(nats.url)
        try:
            await nc.jetstream().add_stream(name=stream_name, subjects=["cdc.>"])
        finally:
            await nc.close()

    run_async(create_plain_stream())
    result = cli("check", "-c", str(config))
    assert result.returncode == 0, result.stdout  # a warning, not a failure
    assert _rows(result.stdout)["nats.atomic_batches"] == "!"
    assert (
        f"stream {stream_name} does not allow them: transactions are stored message by message"
        in result.stdout
    )
    assert f"fix: set allow_atomic: true in the configuration of stream {stream_name}" in (
        result.stdout
    )


@pytest.fixture(scope="module")
def replica_level_postgres() -> Iterator[LocalPostgres]:
    server = start_postgres(settings={"wal_level": "replica"})
    try:
        yield server
    finally:
        server.cleanup()


def test_check_wal_level_replica(
    replica_level_postgres: LocalPostgres, nats: Any, stream_name: str, tmp_path: Path
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
    result = cli("check", "-c", str(config))
    assert result.returncode == 1
    rows = _rows(result.stdout)
    assert rows["postgres.wal_level"] == "✗"
    assert "wal_level is 'replica', must be 'logical'" in result.stdout
    assert "fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL" in result.stdout
    assert "rds.logical_replication = 1" in result.stdout
    assert rows["table public.t"] == "✓"


def test_check_unreachable_servers(tmp_path: Path) -> None:
    from cdc_bridge.local_servers import free_port

    config = write_config(
        tmp_path / "config.yaml",
        dsn=f"postgresql://cdc:pw-never-shown@127.0.0.1:{free_port()}/db",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        stream="s",
        tables={"public.t": {}},
        extra={"nats": {"connect_timeout": 1}, "postgres": {"connect_timeout": 1}},
    )
    result = cli("check", "-c", str(config))
    assert result.returncode == 1
    rows = _rows(result.stdout)
    assert rows == {"postgres.connect": "✗", "nats.connect": "✗"}
    assert "pw-never-shown" not in result.stdout + result.stderr


# --------------------------------------------------------------------- setup, status


def test_setup_run_status(database: str, nats: Any, stream_name: str, tmp_path: Path) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(TABLE)
    config = _config(tmp_path, database, nats, stream_name)
    first = cli("setup", "-c", str(config))
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == f"stream {stream_name}: created (subjects cdc.*.*.*)"
    assert lines[1] == "publication cdc_bridge: created for public.conversations"
    assert lines[2].startswith("slot cdc_bridge: created (confirmed_flush_lsn ")
    again = cli("setup", "-c", str(config))
    assert again.returncode == 0, again.stderr
    assert [line.split(":")[1].split()[0] for line in again.stdout.splitlines()] == [
        "found",
        "found",
        "found",
    ]
    assert _objects(database) == (True, True)

    idle = orjson.loads(cli("status", "-c", str(config), "--json").stdout)
    assert idle["slot"]["active"] is False
    assert idle["slot"]["active_pid"] is None
    assert idle["stream"]["messages"] == 0
    assert idle["stream"]["last_message"] is None

    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        _insert(database, 3)
        _insert(database, 2)
        wait_for_messages(nats.url, stream_name, 5)
        messages = read_stream(nats.url, stream_name)
        last = messages[-1]
        commit = parse_lsn(last.headers["Cdc-Commit-Lsn"])
        deadline = time.monotonic() + 15
        while slot_state(database, "cdc_bridge")[0] < commit and time.monotonic() < deadline:
            time.sleep(0.1)
        result = cli("status", "-c", str(config), "--json")
        assert result.returncode == 0, result.stderr
        status = orjson.loads(result.stdout)
        assert status["slot"]["active"] is True
        assert isinstance(status["slot"]["active_pid"], int)
        assert parse_lsn(status["slot"]["confirmed_flush_lsn"]) >= commit
        assert parse_lsn(status["current_wal_lsn"]) >= parse_lsn(
            status["slot"]["confirmed_flush_lsn"]
        )
        assert status["lag_bytes"] == parse_lsn(status["current_wal_lsn"]) - parse_lsn(
            status["slot"]["confirmed_flush_lsn"]
        )
        assert status["slot"]["wal_status"] == "reserved"
        published = status["stream"]["last_message"]
        assert published["commit_lsn"] == last.headers["Cdc-Commit-Lsn"]
        assert published["seq"] == last.seq == 5
        assert published["subject"] == last.subject
        assert published["op"] == "insert"
        assert published["table"] == "public.conversations"
        assert status["stream"]["messages"] == 5
        assert 0 <= status["last_commit_age_seconds"] < 60

        text = cli("status", "-c", str(config))
        assert text.returncode == 0
        assert "bridge running     yes: active, held by PID" in text.stdout
        assert f"Cdc-Commit-Lsn     {last.headers['Cdc-Commit-Lsn']}" in text.stdout
    finally:
        bridge.stop_quietly()


def test_status_without_slot_is_an_error(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    config = _config(tmp_path, database, nats, stream_name)
    result = cli("status", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "cdc-bridge: error: replication slot 'cdc_bridge' does not exist "
        "(run cdc-bridge setup, or start the bridge)"
    )


# ------------------------------------------------------------------------- teardown


def test_teardown(database: str, nats: Any, stream_name: str, tmp_path: Path) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(TABLE)
    config = _config(tmp_path, database, nats, stream_name)
    assert cli("setup", "-c", str(config)).returncode == 0

    declined = cli("teardown", "-c", str(config), stdin="n\n")
    assert declined.returncode == 1
    assert "Dropping the slot loses its position" in declined.stderr
    assert "WAL it retains" in declined.stderr
    assert declined.stderr.strip().endswith(
        "cdc-bridge: error: teardown cancelled: nothing was dropped"
    )
    no_input = cli("teardown", "-c", str(config), stdin="")  # no terminal: never confirmed
    assert no_input.returncode == 1
    assert no_input.stderr.strip().endswith("teardown cancelled: nothing was dropped")
    assert _objects(database) == (True, True)

    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        refused = cli("teardown", "-c", str(config), "--yes")
        assert refused.returncode == 1
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith(
            "cdc-bridge: error: replication slot 'cdc_bridge' is active, held by PID "
        )
        assert "stop the bridge first" in last
        assert _objects(database) == (True, True)
        assert run_async(_stream_exists(nats.url, stream_name))
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    wait_slot_inactive(database, "cdc_bridge")

    kept = cli("teardown", "-c", str(config), "--yes", "--keep-stream")
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.splitlines() == [
        "slot cdc_bridge: dropped",
        "publication cdc_bridge: dropped",
        f"stream {stream_name}: kept",
    ]
    assert _objects(database) == (False, False)
    assert run_async(_stream_exists(nats.url, stream_name))

    gone = cli("teardown", "-c", str(config), "-y")
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.splitlines() == [
        "slot cdc_bridge: not found",
        "publication cdc_bridge: not found",
        f"stream {stream_name}: deleted",
    ]
    assert not run_async(_stream_exists(nats.url, stream_name))


# ----------------------------------------------------------------------------- tail


def test_tail(database: str, nats: Any, stream_name: str, tmp_path: Path) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(TABLE)
    config = _config(tmp_path, database, nats, stream_name)
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        _insert(database, 5)
        wait_for_messages(nats.url, stream_name, 5)
        stored = read_stream(nats.url, stream_name)

        first = cli("tail", "-c", str(config), "--from-start", "--count", "3", "--json")
        assert first.returncode == 0, first.stderr
        lines = [orjson.loads(line) for line in first.stdout.splitlines()]
        assert len(lines) == 3
        for line, message in zip(lines, stored[:3], strict=True):
            assert line["seq"] == message.seq
            assert line["subject"] == message.subject
            assert line["headers"] == message.headers
            assert line["body"] == message.body

        last = cli("tail", "-c", str(config), "--last", "2", "--count", "2", "--json")
        assert [orjson.loads(line)["seq"] for line in last.stdout.splitlines()] == [4, 5]

        text = cli(
            "tail",
            "-c",
            str(config),
            "cdc.public.conversations.insert",
            "--last",
            "1",
            "--count",
            "1",
        )
        assert text.returncode == 0, text.stderr
        (line,) = text.stdout.splitlines()
        assert line.split()[:4] == [
            "5",
            "cdc.public.conversations.insert",
            "insert",
            "public.conversations",
        ]
        assert f"commit_lsn={stored[-1].headers['Cdc-Commit-Lsn']}" in line
        assert 'key={"id":5}' in line

        verbose = cli("tail", "-c", str(config), "--last", "1", "--count", "1", "-v")
        assert "    Nats-Msg-Id: cdc_bridge:" in verbose.stdout
        assert '"op": "insert"' in verbose.stdout

        # Default: only new messages; --count exits after them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_BRIDGE_")}
        follower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cdc_bridge",
                "tail",
                "-c",
                str(config),
                "--count",
                "1",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            deadline = time.monotonic() + 20
            while follower.poll() is None and time.monotonic() < deadline:
                _insert(database, 1)
                time.sleep(0.3)
            out, err = follower.communicate(timeout=10)
        finally:
            if follower.poll() is None:
                follower.kill()
        assert follower.returncode == 0, err
        (line,) = out.splitlines()
        assert orjson.loads(line)["seq"] > 5

        # Ctrl-C exits 0.
        interrupted = subprocess.Popen(
            [sys.executable, "-m", "cdc_bridge", "tail", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        time.sleep(2)
        interrupted.send_signal(signal.SIGINT)
        _, err = interrupted.communicate(timeout=15)
        assert interrupted.returncode == 0, err
    finally:
        bridge.stop_quietly()


def test_tail_missing_stream(database: str, nats: Any, stream_name: str, tmp_path: Path) -> None:
    config = _config(tmp_path, database, nats, stream_name)
    result = cli("tail", "-c", str(config), "--count", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"cdc-bridge: error: stream {stream_name!r} does not exist "
        "(run cdc-bridge setup, or start the bridge)"
    )
