"""Tests for cdc_bridge.local_servers and the server fixtures built on it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import nats as nats_client
import psycopg
import pytest
from nats.js.errors import ServiceUnavailableError

from cdc_bridge.local_servers import (
    LocalNats,
    LocalPostgres,
    free_port,
    start_nats,
    start_postgres,
)
from tests.fixtures.servers import ExternalPostgres, NatsServer, PostgresServer, fresh_database

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def local_pg() -> Iterator[LocalPostgres]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def local_nats() -> Iterator[LocalNats]:
    server = start_nats()
    try:
        yield server
    finally:
        server.cleanup()


def _scalar(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_postgres_is_logical_and_reachable(local_pg: LocalPostgres) -> None:
    assert local_pg.host == "127.0.0.1"
    assert local_pg.dsn() == f"postgresql://postgres@127.0.0.1:{local_pg.port}/postgres"
    assert local_pg.dsn("x", application_name="t").endswith("/x?application_name=t")
    assert _scalar(local_pg.dsn(), "SHOW wal_level") == "logical"
    assert _scalar(local_pg.dsn(), "SHOW server_version_num") == str(local_pg.server_version_num)
    assert _scalar(local_pg.dsn(), "SHOW max_replication_slots") == "20"
    assert _scalar(local_pg.dsn(), "SHOW fsync") == "off"
    assert _scalar(local_pg.dsn(), "SELECT current_user") == "postgres"
    assert local_pg.server_version_num >= 150000


def test_postgres_logical_slot_works(local_pg: LocalPostgres) -> None:
    dsn = local_pg.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('t_local', 'pgoutput', true)")
        row = conn.execute(
            "SELECT slot_type, temporary FROM pg_replication_slots WHERE slot_name = 't_local'"
        ).fetchone()
    assert row == ("logical", True)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_stop_start_keeps_data(local_pg: LocalPostgres, mode: str) -> None:
    table = f"keep_{mode}"
    with psycopg.connect(local_pg.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (x int)")
        conn.execute(f"INSERT INTO {table} VALUES (1), (2)")
    port = local_pg.port
    local_pg.stop(mode)
    assert not local_pg.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(local_pg.dsn(), connect_timeout=2).close()
    local_pg.stop(mode)  # already stopped: no-op
    local_pg.start()
    assert local_pg.port == port
    assert _scalar(local_pg.dsn(), f"SELECT sum(x) FROM {table}") == 3


def test_postgres_survives_kill(local_pg: LocalPostgres) -> None:
    with psycopg.connect(local_pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE crash (x int)")
        conn.execute("INSERT INTO crash VALUES (42)")
    local_pg.kill()
    assert not local_pg.is_running()
    local_pg.start()
    assert _scalar(local_pg.dsn(), "SELECT x FROM crash") == 42


def test_postgres_settings_and_cleanup() -> None:
    server = start_postgres(settings={"max_replication_slots": "7", "work_mem": "8MB"})
    try:
        assert _scalar(server.dsn(), "SHOW max_replication_slots") == "7"
        assert _scalar(server.dsn(), "SHOW work_mem") == "8MB"
        assert server.log_file.exists()
        assert server.is_running()
    finally:
        server.cleanup()
    assert not server.base_dir.exists()
    assert not server.is_running()
    assert server.process is not None
    assert server.process.returncode is not None  # exited and reaped
    server.cleanup()  # idempotent


def test_postgres_files_are_private_to_the_server_user() -> None:
    hba = b"local all all trust\nhost all all 127.0.0.1/32 trust\n# replaced by the test\n"
    server = start_postgres(files={"pg_hba.conf": hba, "extra.txt": b"secret"})
    try:
        owner = os.stat(server.data_dir / "postgresql.conf").st_uid  # the server's OS user
        for name, content in (("pg_hba.conf", hba), ("extra.txt", b"secret")):
            path = server.data_dir / name
            assert path.read_bytes() == content
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert path.stat().st_uid == owner
        rows = _scalar(server.dsn(), "SELECT count(*)::text FROM pg_hba_file_rules")
        assert rows == "2"  # the server reads our pg_hba.conf
    finally:
        server.cleanup()
    with pytest.raises(ValueError, match="plain file name"):
        start_postgres(files={"../escape": b""})


def test_postgres_startup_failure_reports_log() -> None:
    with pytest.raises(RuntimeError, match="no_such_setting"):
        start_postgres(settings={"no_such_setting": "1"})


async def test_nats_jetstream_publish_and_restart(local_nats: LocalNats) -> None:
    assert local_nats.url == f"nats://127.0.0.1:{local_nats.port}"
    nc = await nats_client.connect(local_nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        ack = await js.publish("keep.a", b"one")
        assert (ack.stream, ack.seq) == ("KEEP", 1)
        ack = await js.publish("keep.b", b"two")
        assert ack.seq == 2
    finally:
        await nc.close()

    port = local_nats.port
    local_nats.stop()
    assert not local_nats.is_running()
    local_nats.start()
    assert local_nats.port == port

    nc = await nats_client.connect(local_nats.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("KEEP")
        assert info.state.messages == 2
        msg = await js.get_msg("KEEP", 2)
        assert msg.data == b"two"
    finally:
        await nc.close()


async def test_nats_max_payload_and_cleanup() -> None:
    server = start_nats(max_payload=2048)
    try:
        nc = await nats_client.connect(server.url)
        try:
            assert nc.max_payload == 2048
        finally:
            await nc.close()
    finally:
        server.cleanup()
    assert not server.base_dir.exists()
    assert server.process.poll() is not None
    server.cleanup()  # idempotent


async def test_nats_without_jetstream() -> None:
    server = start_nats(jetstream=False)
    try:
        nc = await nats_client.connect(server.url)
        try:
            with pytest.raises(ServiceUnavailableError):
                await nc.jetstream().account_info()
        finally:
            await nc.close()
    finally:
        server.cleanup()


# ------------------------------------------------------------------ fixtures


def test_database_fixture_is_empty_logical_and_dropped_with_its_slots(
    postgres: PostgresServer,
) -> None:
    with fresh_database(postgres) as database, psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        name: str = row[0]
        assert name.startswith("cdc_test_")
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public'"
        ).fetchone()
        assert row == (0,)
        # Leave slots behind, one of them in use: the teardown must drop them and the DB.
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [name])
        holder = psycopg.connect(database, autocommit=True)
        holder.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', true)", [name + "_active"]
        )
        active = conn.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", [name + "_active"]
        ).fetchone()
        assert active == (True,)
    try:
        with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
            slots = admin.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s",
                [name + "%"],
            ).fetchall()
            dbs = admin.execute(
                "SELECT datname FROM pg_database WHERE datname = %s", [name]
            ).fetchall()
        assert slots == []
        assert dbs == []
    finally:
        holder.close()


async def test_stream_name_fixture(nats: NatsServer, stream_name: str) -> None:
    nc = await nats_client.connect(nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream_name, subjects=[f"{stream_name.lower()}.>"])
        ack = await js.publish(f"{stream_name.lower()}.x", b"{}")
        assert ack.stream == stream_name
    finally:
        await nc.close()


def test_external_postgres_dsn_rewrites_database() -> None:
    url = ExternalPostgres("postgresql://u:p@h:5/base?sslmode=disable")
    assert url.dsn() == "postgresql://u:p@h:5/base?sslmode=disable"
    assert url.dsn("other", application_name="a") == (
        "postgresql://u:p@h:5/other?sslmode=disable&application_name=a"
    )
    kv = ExternalPostgres("host=h port=5 dbname=base user=u")
    assert "dbname=other" in kv.dsn("other")
    assert "dbname=base" in kv.dsn()
