"""Tests for cdc_bridge.envelopes: the wal2json and Debezium bodies, the text forms.

The wal2json output is compared with real wal2json byte for byte in
tests/test_e2e_envelope_wal2json.py; here: the rules, the reference samples in
docs (Debezium: the shape of a real Debezium 3.6 run), properties by hypothesis, and
PostgreSQL's own float text for random doubles.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_bridge.changes import Change, Op, TableInfo
from cdc_bridge.config import EnvelopeSettings, load_settings
from cdc_bridge.envelope import encode_change
from cdc_bridge.envelopes import (
    DEBEZIUM_UNAVAILABLE,
    DebeziumEncoder,
    Wal2JsonEncoder,
    database_of,
    encoder_for,
    jsonb_text,
    pg_text,
    wal2json_begin,
    wal2json_commit,
)
from cdc_bridge.errors import ConfigError
from cdc_bridge.router import Router
from cdc_bridge.values import JsonValue, convert_value, converter_for
from tests.fixtures.servers import PostgresServer

SLOT = "cdc_bridge"
# 2026-11-27 09:32:10.437557 UTC in microseconds since 2000-01-01.
COMMIT_TS = 849_087_130_437_557
COLUMNS = (
    ("id", 20),
    ("conversation_uuid", 2950),
    ("role", 25),
    ("content", 25),
    ("metadata", 3802),
    ("created_at", 1184),
)
TABLE = TableInfo(
    oid=16385,
    schema="public",
    table="w2j_demo",
    column_names=tuple(name for name, _ in COLUMNS),
    converters=tuple(converter_for(oid) for _, oid in COLUMNS),
    type_oids=tuple(oid for _, oid in COLUMNS),
    key_names=("id",),
    identity_names=frozenset({"id"}),
    replica_identity="d",
)
ROW: dict[str, JsonValue] = {
    "id": 1,
    "conversation_uuid": "9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b",
    "role": "user",
    "content": 'Hello, "quoted" text with unicode: é ü 日本',
    "metadata": {"tags": ["a", "b"], "model": "gpt-x", "nested": {"k": None}, "tokens": 42},
    "created_at": "2026-11-27T09:32:10.437029Z",
}


def change(
    op: Op,
    *,
    after: dict[str, JsonValue] | None = None,
    before: dict[str, JsonValue] | None = None,
    toast: list[str] | None = None,
    index: int = 0,
    table: TableInfo = TABLE,
) -> Change:
    return Change(
        op=op,
        table=table,
        key={"id": 1},
        after=after,
        before=before,
        unchanged_toast=toast or [],
        lsn=0x1528830,
        commit_lsn=0x15289C8,
        xid=725,
        commit_ts=COMMIT_TS,
        index=index,
    )


# --------------------------------------------------------------------------- wal2json


def test_wal2json_matches_the_reference_sample() -> None:
    # /work/shared/reference/wal2json-samples.txt, format-version 2, defaults, A1.
    expected = (
        b'{"action":"I","schema":"public","table":"w2j_demo","columns":['
        b'{"name":"id","type":"bigint","value":1},'
        b'{"name":"conversation_uuid","type":"uuid","value":"9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b"},'
        b'{"name":"role","type":"text","value":"user"},'
        b'{"name":"content","type":"text","value":"Hello, \\"quoted\\" text with unicode: '
        + "é ü 日本".encode()
        + b'"},{"name":"metadata","type":"jsonb","value":"{\\"tags\\": [\\"a\\", \\"b\\"], '
        b'\\"model\\": \\"gpt-x\\", \\"nested\\": {\\"k\\": null}, \\"tokens\\": 42}"},'
        b'{"name":"created_at","type":"timestamp with time zone",'
        b'"value":"2026-11-27 09:32:10.437029+00"}]}'
    )
    assert Wal2JsonEncoder()(change("insert", after=ROW), SLOT) == expected


def test_wal2json_options_add_fields_in_wal2json_order() -> None:
    encoder = Wal2JsonEncoder(
        include_xids=True, include_timestamp=True, include_lsn=True, include_type_oids=True
    )
    body = orjson.loads(encoder(change("delete", before={"id": 1}), SLOT))
    assert body == {
        "action": "D",
        "xid": 725,
        "timestamp": "2026-11-27 09:32:10.437557+00",
        "lsn": "0/1528830",
        "schema": "public",
        "table": "w2j_demo",
        "identity": [{"name": "id", "type": "bigint", "typeoid": 20, "value": 1}],
    }
    assert list(body) == ["action", "xid", "timestamp", "lsn", "schema", "table", "identity"]


def test_wal2json_update_without_old_tuple_takes_identity_from_new_row() -> None:
    body = orjson.loads(Wal2JsonEncoder()(change("update", after=ROW), SLOT))
    assert body["identity"] == [{"name": "id", "type": "bigint", "value": 1}]


def test_wal2json_leaves_out_unchanged_toast_and_truncate_has_no_columns() -> None:
    after = {k: v for k, v in ROW.items() if k != "content"}
    body = orjson.loads(Wal2JsonEncoder()(change("update", after=after, toast=["content"]), SLOT))
    assert [c["name"] for c in body["columns"]] == [
        "id",
        "conversation_uuid",
        "role",
        "metadata",
        "created_at",
    ]
    truncate = Wal2JsonEncoder()(change("truncate"), SLOT)
    assert truncate == b'{"action":"T","schema":"public","table":"w2j_demo"}'


def test_wal2json_replica_identity_nothing_has_no_identity() -> None:
    table = TableInfo(
        oid=1,
        schema="s",
        table="t",
        column_names=("a",),
        converters=(converter_for(23),),
        type_oids=(23,),
        key_names=(),
        identity_names=frozenset(),
        replica_identity="n",
    )
    body = orjson.loads(Wal2JsonEncoder()(change("update", after={"a": 1}, table=table), SLOT))
    assert "identity" not in body


def test_wal2json_unknown_type_is_named_by_its_oid() -> None:
    table = TableInfo(
        oid=1,
        schema="s",
        table="t",
        column_names=("mood",),
        converters=(converter_for(16500),),
        type_oids=(16500,),
        key_names=(),
        identity_names=frozenset(),
        replica_identity="f",
    )
    body = orjson.loads(
        Wal2JsonEncoder()(change("insert", after={"mood": "happy"}, table=table), SLOT)
    )
    assert body["columns"] == [{"name": "mood", "type": "16500", "value": "happy"}]


def test_wal2json_transaction_markers() -> None:
    # The sample's B/C with include-xids, include-timestamp, include-lsn (B has no
    # nextlsn here: pgoutput's Begin does not carry the end of the commit record).
    options = {"include_xids": True, "include_timestamp": True, "include_lsn": True}
    assert wal2json_begin(725, COMMIT_TS, 0x15289C8, **options) == (
        b'{"action":"B","xid":725,"timestamp":"2026-11-27 09:32:10.437557+00","lsn":"0/15289C8"}'
    )
    assert wal2json_commit(725, COMMIT_TS, 0x15289C8, 0x15289F8, **options) == (
        b'{"action":"C","xid":725,"timestamp":"2026-11-27 09:32:10.437557+00",'
        b'"lsn":"0/15289C8","nextlsn":"0/15289F8"}'
    )
    off = {"include_xids": False, "include_timestamp": False, "include_lsn": False}
    assert wal2json_begin(1, 0, 0, **off) == b'{"action":"B"}'
    assert wal2json_commit(1, 0, 0, 0, **off) == b'{"action":"C"}'


@pytest.mark.parametrize(
    ("type_oid", "value", "printed"),
    [
        (701, float("nan"), None),
        (701, "NaN", None),
        (700, "-Infinity", None),
        (1700, "NaN", None),
        (1700, "Infinity", None),
        (1700, "123.4500", "123.4500"),
        (701, 1e15, "1e+15"),
        (700, 1e6, "1e+06"),
        (700, 1e-5, "1e-05"),
        (701, 123456789012345.6, "123456789012345.6"),
        (701, -0.0, "-0"),
        (16, True, "true"),
        (17, "AQL/", '"0102ff"'),
        (
            1009,
            ["a b", None, "NULL", 'x"y', ""],
            '"{\\"a b\\",NULL,\\"NULL\\",\\"x\\\\\\"y\\",\\"\\"}"',
        ),
        (1007, [[1, None], [3, 4]], '"{{1,NULL},{3,4}}"'),
    ],
)
def test_wal2json_values(type_oid: int, value: JsonValue, printed: str | None) -> None:
    table = TableInfo(
        oid=1,
        schema="s",
        table="t",
        column_names=("v",),
        converters=(converter_for(type_oid),),
        type_oids=(type_oid,),
        key_names=(),
        identity_names=frozenset(),
        replica_identity="f",
    )
    body = Wal2JsonEncoder()(change("insert", after={"v": value}, table=table), SLOT)
    tail = body.rsplit(b'"value":', 1)[1][:-3].decode()
    assert tail == ("null" if printed is None else printed)


# --------------------------------------------------------------------------- text forms


@pytest.mark.parametrize(
    ("type_oid", "text"),
    [
        (1184, "2026-11-27 09:32:10.437029+00"),
        (1184, "2026-11-27 09:32:10-05"),
        (1184, "2026-11-27 09:32:10+05:30"),
        (1184, "2026-11-27 09:32:10+05:53:28"),
        (1184, "infinity"),
        (1184, "0044-03-15 12:00:00+00 BC"),
        (1184, "12345-01-01 00:00:00+00"),
        (1114, "2026-01-01 00:00:00.5"),
        (1266, "12:34:56+05"),
        (1266, "12:34:56+05:30"),
        (17, "\\x0102ff"),
        (17, "\\x"),
        (16, "t"),
        (3802, '{"a": [100, "x\\ny"], "b": 1.5, "c": 0.00001, "d": {"e": null}}'),
        (3802, '"just a string"'),
        (3802, '{"n": 123456789012345678901234567890}'),
        (1016, "{{1,NULL},{3,4}}"),
        (1009, '{"a b",NULL,"NULL","x\\"y","back\\\\slash",""}'),
        (1185, '{"2026-11-27 09:32:10+00",NULL}'),
        (1001, '{"\\\\x01ff"}'),
        (1022, "{0.1,1e+300,NaN,-Infinity}"),
    ],
)
def test_pg_text_gives_back_postgresql_text(type_oid: int, text: str) -> None:
    assert pg_text(type_oid, convert_value(type_oid, text)) == text


def _doubles(count: int) -> list[float]:
    values = [struct.unpack("<d", struct.pack("<Q", (i * 0x9E3779B97F4A7C15) % 2**64))[0]
              for i in range(1, count)]  # fmt: skip
    values += [10.0**e for e in range(-20, 21)] + [1.5, 0.1, 100.0, 123456.0]
    return [v for v in values if math.isfinite(v)]


@pytest.mark.servers
def test_float_text_is_postgresql_float_output(postgres: PostgresServer) -> None:
    values = _doubles(3000)
    singles = [v for v in values if v == 0 or 1e-37 < abs(v) < 1e38]
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        doubles = conn.execute("SELECT x::text FROM unnest(%s::float8[]) AS x", [values])
        for value, (text,) in zip(values, doubles.fetchall(), strict=True):
            ours = pg_text(701, value)
            if ours != text:
                # PostgreSQL's Ryu prints one digit more than the shortest for a few
                # integers beyond 2**53 (4 in 20,000 random doubles): the same double.
                assert float(ours) == float(text) == value, text
                assert value.is_integer(), text
                assert abs(value) >= 2**53
        floats = conn.execute("SELECT x::float4::text FROM unnest(%s::float8[]) AS x", [singles])
        for (text,) in floats.fetchall():
            assert pg_text(700, convert_value(700, text)) == text


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_text_round_trips(value: float) -> None:
    assert float(pg_text(701, value)) == value


@given(st.lists(st.one_of(st.none(), st.text(alphabet=st.characters(exclude_categories=["Cs"])))))
def test_text_array_round_trips(value: list[JsonValue]) -> None:
    assert convert_value(1009, pg_text(1009, value)) == value


@given(
    st.lists(
        st.lists(st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)), min_size=2, max_size=2),
        min_size=1,
    )
)
def test_int_array_round_trips(value: list[JsonValue]) -> None:
    assert convert_value(1007, pg_text(1007, value)) == value


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(_json)
def test_jsonb_text_round_trips(value: JsonValue) -> None:
    assert orjson.loads(jsonb_text(value)) == value


# --------------------------------------------------------------------------- Debezium

REFERENCE = Path("/work/shared/reference/debezium-envelope-samples.txt")
# The first VALUE of that file (a real Debezium 3.6.3 run), kept here so the test does not
# depend on the file being present.
DEBEZIUM_SAMPLE: dict[str, Any] = orjson.loads(
    b'{"before":null,"after":{"id":1,"conversation_uuid":"11111111-2222-3333-4444-555555555555",'
    b'"role":"user","content":"hello \\"world\\"","metadata":"{\\"n\\": 1, \\"tags\\": [\\"a\\", '
    b'\\"b\\"], \\"model\\": \\"gpt-x\\"}","created_at":"2026-11-27T09:23:20.894589Z"},'
    b'"source":{"version":"3.6.3.Final","connector":"postgresql","name":"peers",'
    b'"ts_ms":1795771400895,"snapshot":"false","db":"postgres","sequence":"[null,\\"1436177344\\"]",'
    b'"ts_us":1795771400895800,"ts_ns":1795771400895800000,"schema":"public",'
    b'"table":"conversations","txId":4139,"lsn":1436177344,"xmin":null,"origin":null,'
    b'"origin_lsn":null},"transaction":null,"op":"c","ts_ms":1795771405199,'
    b'"ts_us":1795771405199271,"ts_ns":1795771405199271190}'
)


def _shape(value: Any) -> Any:
    """Keys in order and JSON kinds of the values (not the values)."""
    if isinstance(value, dict):
        return [(k, _shape(v)) for k, v in value.items()]
    return type(value).__name__


def _debezium(c: Change, **options: Any) -> dict[str, Any]:
    encoder = DebeziumEncoder(
        name="peers", database="postgres", clock=lambda: 1795771405199271190, **options
    )
    body: dict[str, Any] = orjson.loads(encoder(c, SLOT))
    return body


def test_debezium_has_the_shape_of_the_reference() -> None:
    table = TableInfo(
        oid=7,
        schema="public",
        table="conversations",
        column_names=("id", "conversation_uuid", "role", "content", "metadata", "created_at"),
        converters=TABLE.converters,
        type_oids=TABLE.type_oids,
        key_names=("id",),
        identity_names=frozenset({"id"}),
        replica_identity="d",
    )
    after: dict[str, JsonValue] = {
        "id": 1,
        "conversation_uuid": "11111111-2222-3333-4444-555555555555",
        "role": "user",
        "content": 'hello "world"',
        "metadata": {"n": 1, "tags": ["a", "b"], "model": "gpt-x"},
        "created_at": "2026-11-27T09:23:20.894589Z",
    }
    body = _debezium(change("insert", after=after, table=table))
    sample = dict(DEBEZIUM_SAMPLE)
    # The sequence of the very first event has no earlier commit (null); ours always has
    # the commit LSN: same key, a string either way.
    assert _shape(body) == _shape(sample)
    assert body["after"] == sample["after"]  # values written the way Debezium writes them
    assert body["op"] == "c"
    assert body["transaction"] is None
    source = body["source"]
    assert source["connector"] == "postgresql"
    assert source["name"] == "peers"
    assert source["snapshot"] == "false"
    assert source["db"] == "postgres"
    assert source["txId"] == 725
    assert source["lsn"] == 0x1528830
    assert orjson.loads(source["sequence"]) == [str(0x15289C8), str(0x1528830)]
    assert source["ts_us"] == 1795771930437557  # the commit time
    assert source["ts_ms"] == source["ts_us"] // 1000
    assert source["ts_ns"] == source["ts_us"] * 1000
    assert body["ts_ms"] == 1795771405199
    assert body["ts_ns"] == 1795771405199271190


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"{REFERENCE} not present")
def test_embedded_sample_is_the_reference_file() -> None:
    values = [
        line[len("VALUE ") :]
        for line in REFERENCE.read_text().splitlines()
        if line.startswith('VALUE {"before"')
    ]
    assert orjson.loads(values[0]) == DEBEZIUM_SAMPLE


def test_debezium_ops_before_and_toast() -> None:
    update = _debezium(change("update", after={**ROW, "content": None}, toast=[]))
    assert update["op"] == "u"
    assert update["before"] is None
    delete = _debezium(change("delete", before={"id": 2}))
    # Every column, like Debezium's struct: the ones not logged are null.
    assert delete["op"] == "d"
    assert delete["after"] is None
    assert delete["before"] == {name: (2 if name == "id" else None) for name in TABLE.column_names}
    toast = _debezium(
        change("update", after={k: v for k, v in ROW.items() if k != "content"}, toast=["content"])
    )
    assert toast["after"]["content"] == DEBEZIUM_UNAVAILABLE
    truncate = _debezium(change("truncate"))
    assert truncate["op"] == "t"
    assert truncate["before"] is None
    assert truncate["after"] is None


def test_debezium_timestamps_have_six_fraction_digits_and_json_is_text() -> None:
    row: dict[str, JsonValue] = {
        **ROW,
        "created_at": "2026-11-27T09:32:10.5Z",
        "metadata": {"a": [1, 2.5]},
    }
    after = _debezium(change("insert", after=row))["after"]
    assert after["created_at"] == "2026-11-27T09:32:10.500000Z"
    assert after["metadata"] == '{"a": [1, 2.5]}'
    row = {**ROW, "created_at": "2026-11-27T09:32:10Z"}
    assert _debezium(change("insert", after=row))["after"]["created_at"] == (
        "2026-11-27T09:32:10.000000Z"
    )


def test_debezium_transaction_block_counts_per_transaction_and_table() -> None:
    encoder = DebeziumEncoder(name="n", database="d", transaction_block=True)
    blocks = [orjson.loads(encoder(change("insert", after=ROW, index=i), SLOT))["transaction"]
              for i in range(3)]  # fmt: skip
    assert blocks == [
        {"id": f"725:{0x15289C8}", "total_order": i + 1, "data_collection_order": i + 1}
        for i in range(3)
    ]


# --------------------------------------------------------------------------- selection


def test_encoder_for_and_router() -> None:
    assert encoder_for("native") is encode_change
    assert isinstance(encoder_for("wal2json"), Wal2JsonEncoder)
    assert isinstance(encoder_for("debezium"), DebeziumEncoder)
    router = Router(
        slot=SLOT,
        table_subjects={"public.w2j_demo": "cdc.{table}"},
        message_subject=None,
        encoder=Wal2JsonEncoder(),
    )
    outgoing = router.route_change(change("insert", after=ROW))
    assert outgoing is not None
    assert orjson.loads(outgoing.body)["action"] == "I"
    assert outgoing.headers["Nats-Msg-Id"] == f"{SLOT}:0/15289C8:0"


def test_database_of(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGDATABASE", raising=False)
    monkeypatch.delenv("PGUSER", raising=False)
    assert database_of("postgresql://u@h/app") == "app"
    assert database_of("host=h user=alice") == "alice"
    assert database_of("host=h") == "postgres"
    monkeypatch.setenv("PGDATABASE", "fromenv")
    assert database_of("host=h user=alice") == "fromenv"


def test_envelope_options_of_another_format_are_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "postgres: {dsn: 'postgresql://u@h/db'}\n"
        "tables: {public.t: {}}\n"
        "envelope: {format: debezium, include_lsn: true}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    message = str(error.value)
    assert "\n" not in message
    assert "envelope" in message
    assert "include_lsn is an option of format wal2json" in message
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "postgres: {dsn: 'postgresql://u@h/db'}\ntables: {public.t: {}}\nenvelope: {format: avro}\n"
    )
    with pytest.raises(ConfigError, match=r"envelope\.format"):
        load_settings(bad)
    assert EnvelopeSettings().format == "native"
