"""Schema changes while streaming, TRUNCATE options and logical messages routed by prefix,
end to end through the real bridge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fixtures.bridge import BridgeProcess, read_stream, wait_for_messages, write_config

pytestmark = pytest.mark.servers

INT4, INT8, TEXT = 23, 20, 25


def test_the_stream_follows_schema_changes_without_a_restart(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, a text, b int)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
        extra={"schema_changes": {"publish": True}, "heartbeat": {"interval": 0}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1, 'x', 1)")
            conn.execute("ALTER TABLE t ADD COLUMN c text DEFAULT 'd'")
            conn.execute("INSERT INTO t (id, a, b) VALUES (2, 'y', 2)")
            conn.execute("ALTER TABLE t RENAME COLUMN a TO title")
            conn.execute("UPDATE t SET title = 'x2' WHERE id = 1")
            conn.execute("ALTER TABLE t ALTER COLUMN b TYPE bigint")
            conn.execute("ALTER TABLE t DROP COLUMN c")
            conn.execute("INSERT INTO t VALUES (3, 'z', 5000000000)")
            conn.execute("ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (id, b)")
            conn.execute("DELETE FROM t WHERE id = 2")
            conn.execute("ALTER TABLE t RENAME TO t2")
            conn.execute("INSERT INTO t2 VALUES (4, 'w', 4)")
        wait_for_messages(nats.url, stream_name, 11)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    messages = read_stream(nats.url, stream_name)
    summary = [(m.subject, m.body["op"]) for m in messages]
    assert summary == [
        ("cdc.public.t.insert", "insert"),
        ("cdc.schema.public.t", "schema"),  # added c
        ("cdc.public.t.insert", "insert"),
        ("cdc.schema.public.t", "schema"),  # renamed a → title
        ("cdc.public.t.update", "update"),
        ("cdc.schema.public.t", "schema"),  # b retyped, c dropped: one new shape
        ("cdc.public.t.insert", "insert"),
        ("cdc.schema.public.t", "schema"),  # new primary key
        ("cdc.public.t.delete", "delete"),
        ("cdc.schema.public.t2", "schema"),  # renamed table
        ("cdc.public.t2.insert", "insert"),
    ], bridge.log_text()
    bodies = [m.body for m in messages]
    assert bodies[0]["after"] == {"id": 1, "a": "x", "b": 1}
    added = bodies[1]
    assert (added["added"], added["dropped"], added["renamed"], added["type_changed"]) == (
        ["c"],
        [],
        {},
        [],
    )
    assert added["columns"] == [
        {"name": "id", "type_oid": INT4, "key": True},
        {"name": "a", "type_oid": TEXT, "key": False},
        {"name": "b", "type_oid": INT4, "key": False},
        {"name": "c", "type_oid": TEXT, "key": False},
    ]
    assert added["previous"]["columns"] == added["columns"][:3]
    assert added["replica_identity"] == "default"
    assert messages[1].headers["Cdc-Op"] == "schema"
    assert messages[1].headers["Nats-Msg-Id"].endswith(f":schema-{added['oid']}-0")
    assert bodies[2]["after"] == {"id": 2, "a": "y", "b": 2, "c": "d"}
    assert bodies[3]["renamed"] == {"a": "title"}
    assert bodies[4]["after"] == {"id": 1, "title": "x2", "b": 1, "c": "d"}
    retyped = bodies[5]
    assert (retyped["dropped"], retyped["type_changed"]) == (["c"], ["b"])
    assert bodies[6]["after"] == {"id": 3, "title": "z", "b": 5000000000}
    assert [c["name"] for c in bodies[7]["columns"] if c["key"]] == ["id", "b"]
    assert bodies[8]["key"] == {"id": 2, "b": 2}
    renamed_table = bodies[9]
    assert (renamed_table["schema"], renamed_table["table"]) == ("public", "t2")
    assert renamed_table["previous"]["table"] == "t"
    assert bodies[10]["after"] == {"id": 4, "title": "w", "b": 4}
    assert messages[10].headers["Cdc-Table"] == "public.t2"
    assert "public.t2 changed shape: renamed from public.t" in bridge.log_text()


def test_truncate_options_and_messages_routed_by_prefix(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE parent (id serial PRIMARY KEY)")
        conn.execute("CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.parent": {}, "public.child": {}},
        extra={
            "messages": {
                "publish": True,
                "subject": "outbox.{prefix}",
                "prefixes": ["orders", "audit.v1"],
            },
            "heartbeat": {"interval": 0},
        },
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("INSERT INTO parent DEFAULT VALUES")
                conn.execute("SELECT pg_logical_emit_message(true, 'orders', '{\"n\": 1}')")
                conn.execute("SELECT pg_logical_emit_message(true, 'ignored', 'x')")
            conn.execute("SELECT pg_logical_emit_message(false, 'audit.v1', 'now')")
            conn.execute("TRUNCATE parent, child RESTART IDENTITY")
            conn.execute("INSERT INTO parent DEFAULT VALUES")
            conn.execute("TRUNCATE parent CASCADE")
        wait_for_messages(nats.url, stream_name, 8)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    messages = read_stream(nats.url, stream_name)
    summary = [(m.subject, m.body["op"], m.body.get("table")) for m in messages]
    assert summary == [
        ("cdc.public.parent.insert", "insert", "parent"),
        ("outbox.orders", "message", None),
        ("outbox.audit_v1", "message", None),  # '.' is not allowed inside a token
        ("cdc.public.parent.truncate", "truncate", "parent"),
        ("cdc.public.child.truncate", "truncate", "child"),
        ("cdc.public.parent.insert", "insert", "parent"),
        ("cdc.public.parent.truncate", "truncate", "parent"),
        ("cdc.public.child.truncate", "truncate", "child"),
    ]
    bodies = [m.body for m in messages]
    assert bodies[1]["content"] == '{"n": 1}'
    assert bodies[1]["transactional"] is True
    assert bodies[2]["transactional"] is False
    assert (
        bodies[3]["truncate"]
        == bodies[4]["truncate"]
        == {
            "cascade": False,
            "restart_identity": True,
        }
    )
    assert bodies[5]["after"] == {"id": 1}  # the sequence was restarted
    assert bodies[6]["truncate"] == {"cascade": True, "restart_identity": False}
    # One transaction: the transactional message shares the insert's commit.
    assert messages[1].headers["Cdc-Commit-Lsn"] == messages[0].headers["Cdc-Commit-Lsn"]
