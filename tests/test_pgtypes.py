"""Type names: :func:`cdc_bridge.pgtypes.format_type` against the server's ``format_type``."""

from __future__ import annotations

import psycopg
import pytest

from cdc_bridge.pgtypes import format_type
from tests.fixtures.servers import PostgresServer

# Column types whose OID and modifier the server resolves; each is checked with its
# modifier and without (format_type(oid, NULL)), and as an array.
TYPES = [
    "bool", "bytea", '"char"', "name", "int8", "int2", "int4", "text", "oid", "json", "xml",
    "point", "lseg", "path", "box", "polygon", "line", "cidr", "float4", "float8", "circle",
    "macaddr8", "money", "macaddr", "inet", "bpchar", "char(5)", "varchar", "varchar(20)",
    "date", "time", "time(3)", "timetz", "timetz(0)", "timestamp", "timestamp(3)",
    "timestamptz", "timestamptz(6)", "interval", "interval(2)", "interval year",
    "interval year to month", "interval day to second", "interval day to second(3)",
    "interval minute to second(1)", "interval hour", "bit", "bit(3)", "varbit",
    "varbit(7)", "numeric", "numeric(10,2)", "numeric(5)", "numeric(3,-2)", "uuid",
    "jsonb", "int4range", "numrange", "tsrange", "tstzrange", "daterange", "int8range",
    "int4multirange", "datemultirange", "pg_lsn", "tsvector", "tsquery", "jsonpath",
    "regclass", "regtype", "xid8", "txid_snapshot", "pg_snapshot",
]  # fmt: skip


@pytest.mark.servers
def test_names_match_the_server(postgres: PostgresServer) -> None:
    columns = ", ".join(f"c{i} {t}, a{i} {t}[]" for i, t in enumerate(TYPES))
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("BEGIN")
        try:
            conn.execute(f"CREATE TEMP TABLE pgtypes ({columns})")
            rows = conn.execute(
                "SELECT attname, atttypid::int, atttypmod, format_type(atttypid, atttypmod),"
                " format_type(atttypid, NULL) FROM pg_attribute"
                " WHERE attrelid = 'pgtypes'::regclass AND attnum > 0 ORDER BY attnum"
            ).fetchall()
        finally:
            conn.execute("ROLLBACK")
    assert len(rows) == 2 * len(TYPES)
    for name, oid, typmod, with_modifier, without in rows:
        assert format_type(oid, typmod) == with_modifier, name
        assert format_type(oid) == without, name


def test_unknown_oids_have_no_name() -> None:
    assert format_type(16385) is None
    assert format_type(16385, 10) is None


def test_bpchar_without_length() -> None:
    assert format_type(1042) == "character"
    assert format_type(1042, -1) == "bpchar"
    assert format_type(1014, -1) == "bpchar[]"
