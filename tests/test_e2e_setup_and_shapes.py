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
