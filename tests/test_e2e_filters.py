"""End to end: filters and masking (tables.*.columns, exclude_columns, mask, where, ops)
and the publication following tables:.

Real PostgreSQL, real nats-server, the bridge as a real process. Row filters need
PostgreSQL 15 (the embedded server is 18; CI also runs this on 15).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_bridge.lsn import parse_lsn
from tests.fixtures.bridge import (
    BridgeProcess,
    read_stream,
    slot_state,
    wait_for_messages,
    write_config,
)
from tests.test_e2e_admin import cli
from tests.test_e2e_idle_and_errors import assert_one_line_error, run_cli

pytestmark = pytest.mark.servers

SALT = "e2e-salt-6b1f0c7d9a2e4f58"


def _hash(value: str) -> str:
    return hmac.new(SALT.encode(), value.encode(), hashlib.sha256).hexdigest()


def _execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _server_version(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.info.server_version


def _published(dsn: str, publication: str = "cdc_bridge") -> dict[str, str | None]:
    with psycopg.connect(dsn) as conn:
        rowfilter = "rowfilter" if conn.info.server_version >= 150000 else "NULL"
        rows = conn.execute(
            f"SELECT schemaname || '.' || tablename, {rowfilter} FROM pg_publication_tables "
            "WHERE pubname = %s",
            (publication,),
        ).fetchall()
    return {str(name): None if rf is None else str(rf) for name, rf in rows}


def _current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def test_several_tables_with_columns_masks_and_ops(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    _execute(
        database,
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text, password text, "
        "notes text, role text)",
        "ALTER TABLE users REPLICA IDENTITY FULL",
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int, total numeric, card text)",
        "CREATE TABLE audit (id int PRIMARY KEY, what text)",
    )
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={
            "public.users": {
                "subject": "users.{email}.{op}",
                "exclude_columns": ["password"],
                "mask": {
                    "email": {"hash": {"salt_env": "CDC_MASK_SALT"}},
                    "name": "redact",
                    "notes": {"truncate": 3},
                },
                "ops": ["insert", "update"],
            },
            "public.orders": {"columns": ["id", "user_id", "total"]},
            "public.audit": {"ops": ["delete", "truncate"]},
        },
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log", env={"CDC_MASK_SALT": SALT})
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO users VALUES (1, 'ann@example.com', 'Ann', 'pw1', "
                    "'likes tea', 'admin')"
                )
                conn.execute("INSERT INTO orders VALUES (10, 1, 9.50, '4111-1111')")
                conn.execute("INSERT INTO audit VALUES (100, 'login')")  # not published
            conn.execute("UPDATE users SET name = NULL, password = 'pw2' WHERE id = 1")
            conn.execute("UPDATE orders SET card = 'x', total = 10 WHERE id = 10")
            conn.execute("DELETE FROM users WHERE id = 1")  # not published
            conn.execute("DELETE FROM audit WHERE id = 100")
            conn.execute("TRUNCATE users, audit")  # only audit's is published
            # A transaction of dropped changes only: it must still be confirmed.
            conn.execute("INSERT INTO audit VALUES (101, 'logout')")
        end_of_workload = _current_lsn(database)
        wait_for_messages(nats.url, stream_name, 6)
        deadline = time.monotonic() + 20
        while slot_state(database, "cdc_bridge")[0] < end_of_workload:
            assert time.monotonic() < deadline, "the slot was not confirmed past the workload"
            time.sleep(0.1)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    messages = read_stream(nats.url, stream_name)
    email = _hash("ann@example.com")
    got = [
        (m.subject, m.body["op"], m.body["key"], m.body["after"], m.body["before"])
        for m in messages
    ]
    ann = {"id": 1, "email": email, "name": "***", "notes": "lik", "role": "admin"}
    assert got == [
        (f"users.{email}.insert", "insert", {"id": 1}, ann, None),
        (
            "cdc.public.orders.insert",
            "insert",
            {"id": 10},
            {"id": 10, "user_id": 1, "total": "9.50"},
            None,
        ),
        (f"users.{email}.update", "update", {"id": 1}, ann, ann),
        (
            "cdc.public.orders.update",
            "update",
            {"id": 10},
            {"id": 10, "user_id": 1, "total": "10"},
            None,
        ),
        ("cdc.public.audit.delete", "delete", {"id": 100}, None, {"id": 100}),
        ("cdc.public.audit.truncate", "truncate", None, None, None),
    ]
    raw = b"".join(str(m.body).encode() for m in messages)
    for secret in (b"pw1", b"pw2", b"ann@example.com", b"Ann", b"likes tea", b"4111-1111"):
        assert secret not in raw


def test_start_errors_name_the_table_and_column(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    _execute(database, "CREATE TABLE users (id int PRIMARY KEY, email text)")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"columns": ["id", "emial"]}, "tables.public.users.columns names column 'emial', which"),
        ({"exclude_columns": ["nope"]}, "tables.public.users.exclude_columns names column 'nope'"),
        ({"mask": {"mail": "redact"}}, "tables.public.users.mask.mail names column 'mail'"),
        ({"exclude_columns": ["id"]}, "exclude_columns leaves out key column 'id'"),
        ({"columns": ["email"]}, "tables.public.users.columns leaves out key column 'id'"),
        ({"mask": {"id": "redact"}}, "'id' is a key column, which may only be masked with hash"),
    ]
    for table, needle in cases:
        config = write_config(
            tmp_path / "config.yaml",
            dsn=database,
            nats_url=nats.url,
            stream=stream_name,
            tables={"public.users": table},
        )
        assert_one_line_error(run_cli(config), 1, needle)
    assert _published(database) == {}  # nothing was created


def test_row_filter_is_applied_changed_and_removed(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    if _server_version(database) < 150000:
        pytest.skip("row filters need PostgreSQL 15")
    _execute(
        database,
        "CREATE TABLE messages (id int PRIMARY KEY, role text, content text)",
        "ALTER TABLE messages REPLICA IDENTITY FULL",
    )

    def run(where: str | None, rows: list[tuple[int, str]], total: int, then: str = "") -> None:
        table: dict[str, Any] = {} if where is None else {"where": where}
        config = write_config(
            tmp_path / "config.yaml",
            dsn=database,
            nats_url=nats.url,
            stream=stream_name,
            tables={"public.messages": table},
        )
        bridge = BridgeProcess(config, tmp_path / "bridge.log")
        bridge.start()
        try:
            first = rows[0][0]
            with psycopg.connect(database, autocommit=True) as conn:
                for id_, role in rows:
                    conn.execute("INSERT INTO messages VALUES (%s, %s, 'hi')", (id_, role))
                # UPDATEs work: the filter uses a replica identity column (FULL).
                conn.execute("UPDATE messages SET content = 'edited' WHERE id = %s", (first,))
                if then:
                    conn.execute(then)
                # Passes every filter used here: once it is in the stream, so is the rest.
                conn.execute("INSERT INTO messages VALUES (%s, 'marker', 'end')", (first + 50,))
            wait_for_messages(nats.url, stream_name, total)
            assert bridge.terminate() == 0
        finally:
            bridge.stop_quietly()

    run("role <> 'system'", [(1, "user"), (2, "system")], 3)
    assert _published(database) == {"public.messages": "(role <> 'system'::text)"}
    run(
        "role = 'user' OR role = 'marker'",
        [(3, "assistant"), (4, "user")],
        7,
        # Moves row 3 into the filter (an insert), row 4 out of it (a delete).
        "UPDATE messages SET role = CASE id WHEN 3 THEN 'user' ELSE 'assistant' END "
        "WHERE id IN (3, 4)",
    )
    assert _published(database) == {
        "public.messages": "((role = 'user'::text) OR (role = 'marker'::text))"
    }
    assert "set the row filter of public.messages" in (tmp_path / "bridge.log").read_text()
    run(None, [(5, "system")], 10)
    assert _published(database) == {"public.messages": None}
    seen = [
        (m.body["op"], (m.body["after"] or m.body["before"])["id"])
        for m in read_stream(nats.url, stream_name)
    ]
    assert seen == [
        ("insert", 1),
        ("update", 1),
        ("insert", 51),
        # (3, assistant) and its update: filtered out
        ("insert", 4),
        ("insert", 3),
        ("delete", 4),
        ("insert", 53),
        ("insert", 5),
        ("update", 5),
        ("insert", 55),
    ]


def test_row_filter_outside_the_replica_identity_is_refused(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    if _server_version(database) < 150000:
        pytest.skip("row filters need PostgreSQL 15")
    _execute(database, "CREATE TABLE messages (id int PRIMARY KEY, role text)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.messages": {"where": "role <> 'system'"}},
    )
    assert_one_line_error(
        run_cli(config),
        1,
        "tables.public.messages.where uses 'role', which is not in the table's replica identity",
    )
    # Nothing was committed: the application's UPDATEs still work.
    assert _published(database) == {}
    _execute(database, "INSERT INTO messages VALUES (1, 'a')", "UPDATE messages SET role = 'b'")
    bad = write_config(
        tmp_path / "bad.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.messages": {"where": "rol <> 'system'"}},
    )
    assert_one_line_error(run_cli(bad), 1, "tables.public.messages.where \"rol <> 'system'\":")
    # A filter on the key is fine.
    ok = write_config(
        tmp_path / "ok.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.messages": {"where": "id > 10"}},
    )
    bridge = BridgeProcess(ok, tmp_path / "bridge.log")
    bridge.start()
    try:
        _execute(
            database,
            "INSERT INTO messages VALUES (2, 'x'), (11, 'y')",
            "UPDATE messages SET role = 'z'",
        )
        wait_for_messages(nats.url, stream_name, 2)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    assert [(m.body["op"], m.body["key"]) for m in read_stream(nats.url, stream_name)] == [
        ("insert", {"id": 11}),
        ("update", {"id": 11}),
    ]


def test_publication_follows_tables_only_when_the_bridge_created_it(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    _execute(database, "CREATE TABLE a (id int PRIMARY KEY)", "CREATE TABLE b (id int PRIMARY KEY)")

    def start(tables: list[str], publication: str) -> None:
        config = write_config(
            tmp_path / "config.yaml",
            dsn=database,
            nats_url=nats.url,
            stream=stream_name,
            tables={name: {} for name in tables},
            publication=publication,
            slot=publication,
        )
        bridge = BridgeProcess(config, tmp_path / "bridge.log")
        bridge.start()
        assert bridge.terminate() == 0

    start(["public.a", "public.b"], "cdc_bridge")
    assert sorted(_published(database)) == ["public.a", "public.b"]
    start(["public.a"], "cdc_bridge")  # its own: b is dropped
    assert sorted(_published(database)) == ["public.a"]
    assert "dropped public.b from publication cdc_bridge" in (tmp_path / "bridge.log").read_text()
    # `setup` does the same, and says so.
    start(["public.a", "public.b"], "cdc_bridge")
    config = write_config(
        tmp_path / "setup.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.a": {}},
    )
    setup = cli("setup", "-c", str(config))
    assert setup.returncode == 0, setup.stderr
    assert "publication cdc_bridge: found, dropped public.b\n" in setup.stdout
    assert sorted(_published(database)) == ["public.a"]
    # A publication made by hand (sql/setup.sql) keeps its tables.
    _execute(database, "CREATE PUBLICATION by_hand FOR TABLE a, b")
    start(["public.a"], "by_hand")
    assert sorted(_published(database, "by_hand")) == ["public.a", "public.b"]


def test_without_create_if_missing_a_different_row_filter_is_an_error(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    if _server_version(database) < 150000:
        pytest.skip("row filters need PostgreSQL 15")
    _execute(
        database,
        "CREATE TABLE messages (id int PRIMARY KEY, role text)",
        "ALTER TABLE messages REPLICA IDENTITY FULL",
        "CREATE PUBLICATION cdc_bridge FOR TABLE messages WHERE (role <> 'x')",
    )

    def check(table: dict[str, Any], needle: str) -> None:
        config = write_config(
            tmp_path / "config.yaml",
            dsn=database,
            nats_url=nats.url,
            stream=stream_name,
            tables={"public.messages": table},
            extra={"postgres": {"create_if_missing": False}},
        )
        assert_one_line_error(run_cli(config), 1, needle)

    check(
        {"where": "role <> 'system'"},
        "publication 'cdc_bridge' filters the rows of public.messages with "
        "(role <> 'x'::text), but tables.public.messages.where says role <> 'system'",
    )
    check({}, "but tables.public.messages.where says none")
    # The same filter, written differently: past the publication, on to the missing slot.
    check({"where": "role<>'x'"}, "replication slot 'cdc_bridge' does not exist")
    assert _published(database) == {"public.messages": "(role <> 'x'::text)"}
