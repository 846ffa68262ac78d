"""End to end: each PostgreSQL column type's value as it appears in the published JSON.

One table with one column per row of ``ROWS``; the bridge runs once for the module, one
row is inserted, and each parametrized test checks one column of the single message.
``ROWS`` is the single source of the expected values; ``docs/types.md`` must list every
row with the same JSON (checked by ``test_docs_list_every_row``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.fixtures.bridge import BridgeProcess, read_stream, wait_for_messages, write_config
from tests.fixtures.servers import NatsServer, PostgresServer, fresh_database, run_async
from tests.fixtures.servers import _delete_stream as delete_stream

pytestmark = pytest.mark.servers

DOCS = Path(__file__).resolve().parent.parent / "docs" / "types.md"


@dataclass(frozen=True)
class Row:
    id: str  # test id and the first cell of its docs/types.md row
    sql_type: str  # column type in the test table
    literal: str  # SQL expression inserted
    expected: Any  # the JSON value in the envelope's "after"
    extension: str | None = None  # row only runs where this extension is available


ROWS: list[Row] = [
    Row("bool", "bool", "true", True),
    Row("int2", "int2", "-32768", -32768),
    Row("int4", "int4", "2147483647", 2147483647),
    Row("int8", "int8", "-9223372036854775808", -9223372036854775808),
    Row("float4", "float4", "0.1", 0.1),
    Row("float8", "float8", "1e300", 1e300),
    Row("float8 NaN", "float8", "'NaN'", "NaN"),
    Row("float8 Infinity", "float8", "'Infinity'", "Infinity"),
    Row("float8 -Infinity", "float8", "'-Infinity'", "-Infinity"),
    Row("numeric", "numeric", "123.4500", "123.4500"),
    Row("numeric NaN", "numeric", "'NaN'", "NaN"),
    Row(
        "numeric huge precision",
        "numeric",
        "123456789012345678901234567890.000000000000000000001",
        "123456789012345678901234567890.000000000000000000001",
    ),
    Row("money", "money", "-12.50", "-$12.50"),
    Row("text", "text", "'Hello, \"quoted\" é 日本'", 'Hello, "quoted" é 日本'),
    Row("varchar", "varchar(10)", "'abc'", "abc"),
    Row("char", "char(5)", "'ab'", "ab   "),
    Row("name", "name", "'pg_class'", "pg_class"),
    Row("citext", "citext", "'MiXeD'", "MiXeD", extension="citext"),
    Row(
        "uuid",
        "uuid",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    ),
    Row("json", "json", """'{"b": 1, "a": [1, 2.5, null]}'""", {"b": 1, "a": [1, 2.5, None]}),
    Row("jsonb", "jsonb", """'{"b": 1, "a": [true, "x"]}'""", {"a": [True, "x"], "b": 1}),
    Row(
        "jsonb beyond 64-bit",
        "jsonb",
        """'{"n": 123456789012345678901234567890}'""",
        '{"n": 123456789012345678901234567890}',
    ),
    Row("bytea", "bytea", "'\\x0102ff'::bytea", "AQL/"),
    Row("date", "date", "'2026-11-27'", "2026-11-27"),
    Row("date infinity", "date", "'infinity'", "infinity"),
    Row("date BC", "date", "'0044-03-15 BC'", "0044-03-15 BC"),
    Row("time", "time", "'12:34:56.789'", "12:34:56.789"),
    Row("timetz", "timetz", "'12:34:56+05'", "12:34:56+05:00"),
    Row(
        "timestamp",
        "timestamp",
        "'2026-11-27 09:32:10.437029'",
        "2026-11-27T09:32:10.437029",
    ),
    Row("timestamp -infinity", "timestamp", "'-infinity'", "-infinity"),
    Row("timestamp BC", "timestamp", "'0044-03-15 12:00:00 BC'", "0044-03-15 12:00:00 BC"),
    Row(
        "timestamptz",
        "timestamptz",
        "'2026-11-27 09:32:10.437029+00'",
        "2026-11-27T09:32:10.437029Z",
    ),
    Row("timestamptz infinity", "timestamptz", "'infinity'", "infinity"),
    Row(
        "timestamptz BC",
        "timestamptz",
        "'0044-03-15 12:00:00+00 BC'",
        "0044-03-15 12:00:00+00 BC",
    ),
    Row(
        "interval",
        "interval",
        "'1 year 2 months 3 days 04:05:06'",
        "1 year 2 mons 3 days 04:05:06",
    ),
    Row("inet", "inet", "'192.168.0.1/32'", "192.168.0.1"),
    Row("cidr", "cidr", "'10.0.0.0/8'", "10.0.0.0/8"),
    Row("macaddr", "macaddr", "'08-00-2B-01-02-03'", "08:00:2b:01:02:03"),
    Row("bit", "bit(4)", "B'1010'", "1010"),
    Row("varbit", "varbit", "B'101'", "101"),
    Row("enum", "mood", "'happy'", "happy"),
    Row("domain", "positive_int", "42", 42),
    Row("domain over a domain", "small_positive", "7", 7),
    Row("domain[]", "positive_int[]", "ARRAY[1, 2]::positive_int[]", [1, 2]),
    Row("domain over timestamptz", "stamp", "'2026-11-27 09:32:10+00'", "2026-11-27T09:32:10Z"),
    Row("composite", "pair", "ROW(1, 'a b')", '(1,"a b")'),
    Row("int4range", "int4range", "'[1,10)'", "[1,10)"),
    Row("tstzrange", "tstzrange", "'[2026-01-01,)'", '["2026-01-01 00:00:00+00",)'),
    Row("int4multirange", "int4multirange", "'{[1,3),[5,7)}'", "{[1,3),[5,7)}"),
    Row("int4[][] with NULL", "int4[]", "'{{1,NULL},{3,4}}'", [[1, None], [3, 4]]),
    Row(
        "text[] quoted",
        "text[]",
        """ARRAY['a "b"', NULL, 'NULL', 'x,y']""",
        ['a "b"', None, "NULL", "x,y"],
    ),
    Row(
        "timestamptz[]",
        "timestamptz[]",
        "ARRAY['2026-11-27 09:32:10+00'::timestamptz, NULL]",
        ["2026-11-27T09:32:10Z", None],
    ),
    Row("hstore", "hstore", """'a=>1, b=>NULL'""", '"a"=>"1", "b"=>NULL', extension="hstore"),
    Row("vector", "vector(3)", "'[1,2.5,3]'", "[1,2.5,3]", extension="vector"),
    Row("point", "point", "'(1,2)'", "(1,2)"),
    Row("circle", "circle", "'<(0,0),1.5>'", "<(0,0),1.5>"),
    Row("box", "box", "'((0,0),(1,1))'", "(1,1),(0,0)"),
]

SETUP = [
    "CREATE TYPE mood AS ENUM ('sad', 'happy')",
    "CREATE DOMAIN positive_int AS int4 CHECK (VALUE > 0)",
    "CREATE DOMAIN small_positive AS positive_int CHECK (VALUE < 100)",
    "CREATE DOMAIN stamp AS timestamptz",
    "CREATE TYPE pair AS (n int4, s text)",
]


def _column(row: Row) -> str:
    return f"c{ROWS.index(row)}"


@dataclass
class Streamed:
    after: dict[str, Any]
    available: set[str]


@pytest.fixture(scope="module")
def streamed(
    postgres: PostgresServer, nats: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Streamed:
    tmp = tmp_path_factory.mktemp("types")
    stream = f"CDC_TEST_{uuid.uuid4().hex[:12].upper()}"
    with fresh_database(postgres) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            available = {
                str(r[0])
                for r in conn.execute("SELECT name FROM pg_available_extensions").fetchall()
            }
            for ext in sorted({r.extension for r in ROWS if r.extension} & available):
                conn.execute(sql.SQL("CREATE EXTENSION {}").format(sql.Identifier(ext)))
            for statement in SETUP:
                conn.execute(statement)
            rows = [r for r in ROWS if r.extension is None or r.extension in available]
            columns = ", ".join(f"{_column(r)} {r.sql_type}" for r in rows)
            conn.execute(f"CREATE TABLE types (id int PRIMARY KEY, {columns})")
        config = write_config(
            tmp / "config.yaml",
            dsn=dsn,
            nats_url=nats.url,
            stream=stream,
            tables={"public.types": {"subject": "types.{id}"}},
        )
        bridge = BridgeProcess(config, tmp / "bridge.log")
        bridge.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                names = ", ".join(_column(r) for r in rows)
                values = ", ".join(r.literal for r in rows)
                conn.execute(f"INSERT INTO types (id, {names}) VALUES (1, {values})")
            wait_for_messages(nats.url, stream, 1)
            messages = read_stream(nats.url, stream)
            assert bridge.terminate() == 0
        finally:
            bridge.stop_quietly()
            run_async(delete_stream(nats.url, stream))
    assert len(messages) == 1
    return Streamed(messages[0].body["after"], available)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_type_value_in_envelope(streamed: Streamed, row: Row) -> None:
    if row.extension is not None and row.extension not in streamed.available:
        pytest.skip(f"extension {row.extension} is not available in this server")
    value = streamed.after[_column(row)]
    assert value == row.expected
    assert type(value) is type(row.expected)  # e.g. True is not 1, "42" is not 42


def _doc_cell(value: Any) -> str:
    return "`" + json.dumps(value, ensure_ascii=False).replace("|", "\\|") + "`"


def test_docs_list_every_row() -> None:
    table: dict[str, list[str]] = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith("| ") and not line.startswith("| PostgreSQL type"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            table[cells[0].strip("`")] = cells
    for row in ROWS:
        assert row.id in table, f"docs/types.md has no row for {row.id!r}"
        assert table[row.id][2] == _doc_cell(row.expected), row.id
    assert set(table) == {row.id for row in ROWS}, "docs/types.md has rows the tests lack"
