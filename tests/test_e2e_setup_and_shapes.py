"""End to end: what `run` creates or checks at start, and changes beyond plain rows.

Stream provisioning (created with the configured limits, or an existing one checked),
`create_if_missing: false`, several tables at once, a column added while streaming,
TRUNCATE, and logical decoding messages.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats as nats_client
import psycopg
import pytest
from nats.js.api import StorageType, StreamConfig

from tests.fixtures.bridge import BridgeProcess, read_stream, wait_for_messages, write_config
from tests.test_e2e_idle_and_errors import assert_one_line_error, run_cli

pytestmark = pytest.mark.servers


async def _stream_config(url: str, name: str) -> StreamConfig:
    nc = await nats_client.connect(url)
    try:
        return (await nc.jetstream().stream_info(name)).config
    finally:
        await nc.close()


async def _add_stream(url: str, name: str, subjects: list[str]) -> None:
    nc = await nats_client.connect(url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=name, subjects=subjects))
    finally:
        await nc.close()


def test_stream_is_created_with_the_configured_limits(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE b (id int PRIMARY KEY, tenant text)")
        conn.execute("ALTER TABLE b REPLICA IDENTITY FULL")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.a": {}, "public.b": {"subject": "tenants.{tenant}.b.{op}"}},
        extra={
            "nats": {
                "max_age": 3600,
                "max_bytes": 10_000_000,
                "duplicate_window": 30,
                "storage": "memory",
            }
        },
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO a VALUES (1)")
            conn.execute("INSERT INTO b VALUES (1, 'acme.corp')")
        wait_for_messages(nats.url, stream_name, 2)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    created = asyncio.run(_stream_config(nats.url, stream_name))
    assert sorted(created.subjects or []) == ["cdc.*.*.*", "tenants.*.b.*"]
    assert created.max_age == 3600
    assert created.max_bytes == 10_000_000
    assert created.duplicate_window == 30
    assert created.storage == StorageType.MEMORY
    subjects = [m.subject for m in read_stream(nats.url, stream_name)]
    assert subjects == ["cdc.public.a.insert", "tenants.acme_corp.b.insert"]


def test_existing_stream_that_misses_our_subjects_is_an_error(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    asyncio.run(_add_stream(nats.url, stream_name, [f"{stream_name}.other.>"]))
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.a": {}},
    )
    assert_one_line_error(
        run_cli(config), 1, f"stream {stream_name!r} captures ['{stream_name}.other.>'] but not"
    )
    with psycopg.connect(database, autocommit=True) as conn:
        slots = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()
    assert slots == (0,), "a failed start must not leave a slot pinning WAL"


def test_without_create_if_missing_a_missing_publication_is_an_error(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.a": {}},
        extra={"postgres": {"create_if_missing": False}},
    )
    assert_one_line_error(
        run_cli(config), 1, "publication 'cdc_bridge' does not exist and postgres.create_if_missing"
    )
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE PUBLICATION cdc_bridge FOR TABLE a")
    assert_one_line_error(
        run_cli(config), 1, "replication slot 'cdc_bridge' does not exist and postgres.create_if"
    )


def test_schema_change_truncate_and_logical_messages_while_streaming(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.notes": {"subject": "notes.{op}"}},
        extra={"messages": {"publish": True, "subject": "outbox.{prefix}"}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO notes VALUES (1, 'before the change')")
            conn.execute("ALTER TABLE notes ADD COLUMN tags text[]")
            conn.execute("INSERT INTO notes VALUES (2, 'after', ARRAY['a', NULL, 'b c'])")
            conn.execute("ALTER TABLE notes DROP COLUMN body")
            conn.execute("UPDATE notes SET tags = '{}' WHERE id = 1")
            with conn.transaction():
                conn.execute("SELECT pg_logical_emit_message(true, 'orders', '{\"id\": 7}')")
                conn.execute("INSERT INTO notes VALUES (3, NULL)")
            conn.execute("SELECT pg_logical_emit_message(false, 'audit.log', 'plain text')")
            conn.execute("TRUNCATE notes")
        wait_for_messages(nats.url, stream_name, 7)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    messages = read_stream(nats.url, stream_name)
    shown = [
        (
            m.subject,
            m.body["op"],
            m.body.get("after"),
            m.body.get("prefix"),
            m.body.get("content"),
            m.body.get("transactional"),
        )
        for m in messages
    ]
    assert shown == [
        ("notes.insert", "insert", {"id": 1, "body": "before the change"}, None, None, None),
        (
            "notes.insert",
            "insert",
            {"id": 2, "body": "after", "tags": ["a", None, "b c"]},
            None,
            None,
            None,
        ),
        ("notes.update", "update", {"id": 1, "tags": []}, None, None, None),
        ("outbox.orders", "message", None, "orders", '{"id": 7}', True),
        ("notes.insert", "insert", {"id": 3, "tags": None}, None, None, None),
        ("outbox.audit_log", "message", None, "audit.log", "plain text", False),
        ("notes.truncate", "truncate", None, None, None, None),
    ]
    transactional = messages[3].headers
    assert transactional["Nats-Msg-Id"].endswith(":0")  # first change of its transaction
    assert messages[4].headers["Nats-Msg-Id"].endswith(":1")


def test_published_but_unconfigured_table_is_skipped_with_a_warning(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE wanted (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE extra (id int PRIMARY KEY)")
        conn.execute("CREATE PUBLICATION cdc_bridge FOR TABLE wanted, extra")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.wanted": {}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO extra VALUES (1)")
            conn.execute("INSERT INTO extra VALUES (2)")
            conn.execute("INSERT INTO wanted VALUES (1)")
        wait_for_messages(nats.url, stream_name, 1)
        bridge.wait_for_log("skipping changes of public.extra", 10)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    assert [m.subject for m in read_stream(nats.url, stream_name)] == ["cdc.public.wanted.insert"]
    assert bridge.log_text().count("skipping changes of public.extra") == 1


def test_non_transactional_message_inside_a_transaction_does_not_hide_its_first_change(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    """The message's LSN equals the transaction's commit LSN: their ids must differ."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.notes": {"subject": "notes.{op}"}},
        extra={"messages": {"publish": True, "subject": "outbox.{prefix}"}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn, conn.transaction():
            conn.execute("INSERT INTO notes VALUES (1)")
            conn.execute("SELECT pg_logical_emit_message(false, 'p', 'x')")
        wait_for_messages(nats.url, stream_name, 2)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    messages = read_stream(nats.url, stream_name)
    assert sorted(m.body["op"] for m in messages) == ["insert", "message"]
    ids = [m.headers["Nats-Msg-Id"] for m in messages]
    assert len(set(ids)) == 2, ids


def test_partitioned_table_is_published_under_its_own_name(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE events (id int, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)"
        )
        conn.execute(
            "CREATE TABLE events_2026 PARTITION OF events "
            "FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"
        )
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.events": {}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    for _ in range(2):  # the second start finds the publication it created
        bridge.start()
        try:
            with psycopg.connect(database, autocommit=True) as conn:
                conn.execute("INSERT INTO events VALUES (1, '2026-11-27') ON CONFLICT DO NOTHING")
            wait_for_messages(nats.url, stream_name, 1)
            assert bridge.terminate() == 0
        finally:
            bridge.stop_quietly()
    messages = read_stream(nats.url, stream_name)
    assert [(m.subject, m.body["after"]) for m in messages] == [
        ("cdc.public.events.insert", {"id": 1, "day": "2026-11-27"})
    ]


def test_latin1_database_text_arrives_intact(
    postgres: Any, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    name = f"cdc_latin1_{stream_name.lower()}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 "
            "LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    dsn = postgres.dsn(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
        config = write_config(
            tmp_path / "config.yaml",
            dsn=dsn,
            nats_url=nats.url,
            stream=stream_name,
            tables={"public.t": {}},
            slot=name,
        )
        bridge = BridgeProcess(config, tmp_path / "bridge.log")
        bridge.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO t VALUES (1, 'café crème, ½ ß')")
            wait_for_messages(nats.url, stream_name, 1)
            assert bridge.terminate() == 0
        finally:
            bridge.stop_quietly()
        [message] = read_stream(nats.url, stream_name)
        assert message.body["after"] == {"id": 1, "body": "café crème, ½ ß"}
    finally:
        with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_replica_identity_using_index_keys_deletes_by_that_index(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE)")
        conn.execute("ALTER TABLE users REPLICA IDENTITY USING INDEX users_email_key")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.users": {}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO users VALUES (1, 'a@example.com')")
            conn.execute("DELETE FROM users WHERE id = 1")
        wait_for_messages(nats.url, stream_name, 2)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    shown = [
        (m.body["op"], m.body["key"], m.body["before"]) for m in read_stream(nats.url, stream_name)
    ]
    assert shown == [
        ("insert", {"email": "a@example.com"}, None),
        ("delete", {"email": "a@example.com"}, {"email": "a@example.com"}),
    ]


def test_subject_too_long_for_nats_is_a_clear_error(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, tag text)")
        conn.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {"subject": "tags.{tag}"}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1, repeat('x', 5000))")
        assert bridge.process is not None
        assert bridge.process.wait(30) == 1
    finally:
        bridge.stop_quietly()
    last = bridge.log_text().strip().splitlines()[-1]
    assert last.startswith("cdc-bridge: error: the subject tags.xxx")
    assert "is 5005 bytes, over the 3800 bytes a NATS subject may have here" in last


def test_replica_identity_nothing_names_the_right_fix(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("ALTER TABLE t REPLICA IDENTITY NOTHING")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
    )
    assert_one_line_error(
        run_cli(config),
        1,
        "table public.t has REPLICA IDENTITY NOTHING: once published, its UPDATEs and "
        "DELETEs would fail; ALTER TABLE public.t REPLICA IDENTITY DEFAULT (or FULL)",
    )
