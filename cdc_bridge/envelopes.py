"""The wal2json- and Debezium-compatible envelopes (``envelope.format``), besides native.

An encoder turns a :class:`~cdc_bridge.changes.Change` into the JSON body of its message,
like :func:`cdc_bridge.envelope.encode_change` does for the native envelope. The router
calls it once per routed change; :func:`encoder_for` builds the configured one.

wal2json (format-version 2, one object per change)::

    {"action": "I|U|D|T", ["xid", "timestamp", "lsn",] "schema", "table",
     "columns": [{"name", "type", ["typeoid",] "value"}],   (not for D and T)
     "identity": [{"name", "type", ["typeoid",] "value"}]}  (U and D)

Values are printed as wal2json prints them: PostgreSQL's text form of the value as a JSON
string, except numbers (int2/4/8, oid, float4/8, numeric: JSON numbers, non-finite ones
null) and booleans. The bridge converts every value when it decodes it
(:mod:`cdc_bridge.values`), so this module renders the converted value back into the
text form (exact except where README's "wal2json envelope" section says otherwise).

Debezium (PostgreSQL connector, JSON converter with ``schemas.enable=false``)::

    {"before", "after", "source": {"version", "connector": "postgresql", "name", "ts_ms",
     "snapshot", "db", "sequence", "ts_us", "ts_ns", "schema", "table", "txId", "lsn",
     "xmin", "origin", "origin_lsn"}, "transaction", "op": "c|u|d|t", "ts_ms", "ts_us",
     "ts_ns"}

Pure: the processing time of a Debezium event (``ts_ms``) is the only outside input.
"""

from __future__ import annotations

import base64
import math
import os
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson

from cdc_bridge import __version__
from cdc_bridge.changes import Change, TableInfo
from cdc_bridge.envelope import encode_change
from cdc_bridge.lsn import format_lsn
from cdc_bridge.pgoutput import PG_EPOCH_UNIX_MICROS
from cdc_bridge.pgtypes import format_type
from cdc_bridge.values import JsonValue, array_element_oid

if TYPE_CHECKING:
    from cdc_bridge.config import Settings

__all__ = [
    "DEBEZIUM_UNAVAILABLE",
    "ChangeEncoder",
    "DebeziumEncoder",
    "EnvelopeFormat",
    "Wal2JsonEncoder",
    "database_of",
    "encoder_for",
    "encoder_from_settings",
    "jsonb_text",
    "pg_text",
    "wal2json_begin",
    "wal2json_commit",
]

EnvelopeFormat = Literal["native", "wal2json", "debezium"]

#: Encodes one change (and the slot it came from) as a message body.
ChangeEncoder = Callable[[Change, str], bytes]

#: Debezium's default ``unavailable.value.placeholder``: an unchanged TOAST column.
DEBEZIUM_UNAVAILABLE: Final = "__debezium_unavailable_value"

# wal2json has no snapshot: a snapshot row ("read") is the insert that would recreate it.
_ACTIONS: Final = {"insert": "I", "update": "U", "delete": "D", "truncate": "T", "read": "I"}
_DEBEZIUM_OPS: Final = {"insert": "c", "update": "u", "delete": "d", "truncate": "t", "read": "r"}

# Type OIDs whose values need more than "the converted value is the text".
_INTS: Final = frozenset({20, 21, 23, 26})
_FLOAT4, _FLOAT8, _NUMERIC, _BOOL, _BYTEA = 700, 701, 1700, 16, 17
_JSON, _JSONB = 114, 3802
_TIMESTAMP, _TIMESTAMPTZ, _TIMETZ = 1114, 1184, 1266
_NON_FINITE: Final = frozenset({"nan", "infinity", "-infinity", "+infinity", "inf", "-inf"})


# --------------------------------------------------------------------------- text forms


def _float_text(value: float, digits: int) -> str:
    """PostgreSQL's float4/float8 output (shortest exact digits; ``1e+15``, ``1e-05``).

    Scientific notation when the decimal exponent is below -4 or at least ``digits``
    (15 for float8, 6 for float4: ``DBL_DIG``/``FLT_DIG``), as ``float8out`` does.
    """
    sign, digit_tuple, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digit_tuple))
    point = len(text) + exponent  # digits before the decimal point
    minus = "-" if sign else ""
    if text == "0":
        return f"{minus}0"
    scientific = point - 1
    if scientific < -4 or scientific >= digits:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{minus}{mantissa}e{'-' if scientific < 0 else '+'}{abs(scientific):02d}"
    if point <= 0:
        return f"{minus}0.{'0' * -point}{text}"
    if point >= len(text):
        return f"{minus}{text}{'0' * (point - len(text))}"
    return f"{minus}{text[:point]}.{text[point:]}"


def _json_string(text: str) -> str:
    """PostgreSQL's ``escape_json``: orjson's escaping is the same (``\\uXXXX`` lower case)."""
    return orjson.dumps(text).decode()


def jsonb_text(value: JsonValue) -> str:
    """The text ``jsonb_out`` prints for a parsed document: ``{"a": 1, "b": [1, 2]}``.

    Keys keep their order (the bridge parsed them from jsonb's own output, which orders
    them). Numbers: jsonb prints ``numeric`` text, never an exponent.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_text(item) for item in value) + "]"
    return "{" + ", ".join(f"{_json_string(k)}: {jsonb_text(v)}" for k, v in value.items()) + "}"


def _json_document_text(value: JsonValue) -> str:
    if isinstance(value, str):
        # A document with numbers a double cannot hold stays its original text (see
        # cdc_bridge.values); a JSON string document is a str too: tell them apart.
        try:
            orjson.loads(value)
        except orjson.JSONDecodeError:
            return _json_string(value)
        return value
    return jsonb_text(value)


def _strip_zero_minutes(text: str) -> str:
    """``+05:00`` -> ``+05`` at the end (the bridge adds ``:00`` to whole-hour offsets)."""
    if len(text) > 6 and text[-3:] == ":00" and text[-6] in "+-" and text[-5:-3].isdigit():
        return text[:-3]
    return text


def _timestamp_text(value: str, zoned: bool) -> str:
    if len(value) < 11 or value[-1:] == "C":  # infinity, BC (passed through unchanged)
        return value
    position = value.find("T", 10)
    if position > 0:
        value = value[:position] + " " + value[position + 1 :]
    if zoned:
        if value.endswith("Z"):
            return value[:-1] + "+00"
        return _strip_zero_minutes(value)
    return value


def _bytea_hex(value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).hex()
    except ValueError:
        return value


def pg_text(type_oid: int, value: JsonValue) -> str:
    """PostgreSQL's text output for a value the bridge converted (``value`` not None)."""
    if isinstance(value, list):
        element = array_element_oid(type_oid)
        return _array_text(element if element is not None else 25, value)
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, float):
        return _float_text(value, 6 if type_oid == _FLOAT4 else 15)
    if isinstance(value, int):
        return str(value)
    if type_oid in (_JSON, _JSONB):
        return _json_document_text(value)
    if isinstance(value, dict):  # a json value of a type not known as json
        return jsonb_text(value)
    assert isinstance(value, str)
    if type_oid == _TIMESTAMPTZ:
        return _timestamp_text(value, zoned=True)
    if type_oid == _TIMESTAMP:
        return _timestamp_text(value, zoned=False)
    if type_oid == _TIMETZ:
        return _strip_zero_minutes(value)
    if type_oid == _BYTEA:
        return "\\x" + _bytea_hex(value)
    return value


_ARRAY_SPECIAL: Final = frozenset('{},"\\ \t\n\r\v\f')


def _array_element(type_oid: int, value: JsonValue) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list):
        return "{" + ",".join(_array_element(type_oid, item) for item in value) + "}"
    text = pg_text(type_oid, value)
    if text == "" or text.upper() == "NULL" or not _ARRAY_SPECIAL.isdisjoint(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _array_text(element_oid: int, value: list[JsonValue]) -> str:
    """``array_out`` text: ``{{1,NULL},{3,4}}``, ``{"a b","NULL",NULL}``."""
    return "{" + ",".join(_array_element(element_oid, item) for item in value) + "}"


def _wal2json_value(type_oid: int, value: JsonValue) -> Any:
    """A value as wal2json prints it: numbers and booleans bare, the rest text."""
    if value is None:
        return None
    if type_oid in _INTS or type_oid == _BOOL:
        return value if not isinstance(value, str) else None
    if type_oid in (_FLOAT8, _FLOAT4):
        if isinstance(value, float) and math.isfinite(value):
            return orjson.Fragment(_float_text(value, 6 if type_oid == _FLOAT4 else 15))
        return value if isinstance(value, int) else None  # NaN, ±Infinity: null
    if type_oid == _NUMERIC:
        if isinstance(value, str) and value.lower() not in _NON_FINITE:
            return orjson.Fragment(value)
        return None if isinstance(value, str) else value
    if type_oid == _BYTEA and isinstance(value, str):
        return _bytea_hex(value)  # wal2json drops the \x
    return pg_text(type_oid, value)


# --------------------------------------------------------------------------- wal2json


def _pg_timestamp_text(pg_micros: int) -> str:
    """A commit time as wal2json prints it: ``2026-11-27 09:32:10.437557+00``."""
    unix = pg_micros + PG_EPOCH_UNIX_MICROS
    seconds, micros = divmod(unix, 1_000_000)
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    if micros:
        text += f".{micros:06d}".rstrip("0")
    return text + "+00"


@lru_cache(maxsize=64)
def _transaction_fields(
    xid: int, commit_ts: int, include_xids: bool, include_timestamp: bool
) -> tuple[tuple[str, Any], ...]:
    fields: list[tuple[str, Any]] = []
    if include_xids:
        fields.append(("xid", xid))
    if include_timestamp:
        fields.append(("timestamp", _pg_timestamp_text(commit_ts)))
    return tuple(fields)


class Wal2JsonEncoder:
    """wal2json format-version 2 objects, one per change.

    The options mirror wal2json's of the same names (all off by default here, as the
    row's place is in the message headers anyway): ``include_xids``,
    ``include_timestamp``, ``include_lsn``, ``include_type_oids``.
    """

    def __init__(
        self,
        *,
        include_xids: bool = False,
        include_timestamp: bool = False,
        include_lsn: bool = False,
        include_type_oids: bool = False,
    ) -> None:
        self.include_xids = include_xids
        self.include_timestamp = include_timestamp
        self.include_lsn = include_lsn
        self.include_type_oids = include_type_oids
        # Per relation (TableInfo is rebuilt on every Relation message): column metadata.
        self._tables: dict[int, tuple[TableInfo, tuple[tuple[str, str, int], ...]]] = {}

    def _columns(self, table: TableInfo) -> tuple[tuple[str, str, int], ...]:
        cached = self._tables.get(table.oid)
        if cached is not None and cached[0] is table:
            return cached[1]
        # Without type modifiers (a TableInfo built by hand) the names are those of
        # format_type(oid, NULL).
        typmods: tuple[int, ...] | None = table.type_modifiers
        if not typmods or len(typmods) != len(table.type_oids):
            typmods = None
        columns = tuple(
            (name, _type_name(oid, None if typmods is None else typmods[i]), oid)
            for i, (name, oid) in enumerate(zip(table.column_names, table.type_oids, strict=True))
        )
        self._tables[table.oid] = (table, columns)
        return columns

    def _tuple(
        self, columns: tuple[tuple[str, str, int], ...], row: Mapping[str, JsonValue]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with_oids = self.include_type_oids
        for name, type_name, oid in columns:
            if name not in row:
                continue  # unchanged TOAST, or not part of the old key: wal2json skips it
            value = _wal2json_value(oid, row[name])
            if with_oids:
                out.append({"name": name, "type": type_name, "typeoid": oid, "value": value})
            else:
                out.append({"name": name, "type": type_name, "value": value})
        return out

    def __call__(self, change: Change, slot: str) -> bytes:
        table = change.table
        body: dict[str, Any] = {"action": _ACTIONS[change.op]}
        if self.include_xids or self.include_timestamp:
            body.update(
                _transaction_fields(
                    change.xid, change.commit_ts, self.include_xids, self.include_timestamp
                )
            )
        if self.include_lsn:
            body["lsn"] = format_lsn(change.lsn)
        body["schema"] = table.schema
        body["table"] = table.table
        if change.op == "truncate":
            return orjson.dumps(body)
        columns = self._columns(table)
        if change.after is not None:
            body["columns"] = self._tuple(columns, change.after)
        identity = change.before
        if identity is None and change.op == "update" and change.after is not None:
            # No old tuple logged: the key did not change, wal2json takes it from the new row.
            after = change.after
            identity = {n: after[n] for n in table.column_names if n in table.identity_names}
        if identity:
            body["identity"] = self._tuple(columns, identity)
        return orjson.dumps(body)


def _type_name(type_oid: int, typmod: int | None) -> str:
    # A type that is not built in (enum, domain, extension type) has no fixed OID, and the
    # data path does not know its name: its OID stands in (see README).
    return format_type(type_oid, typmod) or str(type_oid)


def wal2json_begin(
    xid: int,
    commit_ts: int,
    commit_lsn: int,
    *,
    include_xids: bool,
    include_timestamp: bool,
    include_lsn: bool,
) -> bytes:
    """The ``{"action":"B"}`` transaction marker (``envelope.transaction_markers``)."""
    body: dict[str, Any] = {"action": "B"}
    body.update(_transaction_fields(xid, commit_ts, include_xids, include_timestamp))
    if include_lsn:
        body["lsn"] = format_lsn(commit_lsn)
    return orjson.dumps(body)


def wal2json_commit(
    xid: int,
    commit_ts: int,
    commit_lsn: int,
    end_lsn: int,
    *,
    include_xids: bool,
    include_timestamp: bool,
    include_lsn: bool,
) -> bytes:
    """The ``{"action":"C"}`` transaction marker."""
    body: dict[str, Any] = {"action": "C"}
    body.update(_transaction_fields(xid, commit_ts, include_xids, include_timestamp))
    if include_lsn:
        body["lsn"] = format_lsn(commit_lsn)
        body["nextlsn"] = format_lsn(end_lsn)
    return orjson.dumps(body)


# --------------------------------------------------------------------------- Debezium


def _zoned_timestamp(value: JsonValue) -> JsonValue:
    """Debezium's ZonedTimestamp: six fraction digits (``...:20.894500Z``)."""
    if not isinstance(value, str) or not value.endswith("Z") or len(value) < 20:
        return value
    dot = value.rfind(".")
    if dot < 0:
        return value[:-1] + ".000000Z"
    fraction = value[dot + 1 : -1]
    return value[:dot] + "." + fraction.ljust(6, "0") + "Z" if fraction.isdigit() else value


class DebeziumEncoder:
    """Debezium PostgreSQL connector events (the value of the record, without schema).

    Values are the bridge's (README "Debezium envelope" lists where Debezium's differ);
    json/jsonb are the document's text, timestamptz has six fraction digits and an
    unchanged TOAST column is Debezium's placeholder, as with Debezium.
    """

    def __init__(
        self,
        *,
        name: str,
        database: str,
        transaction_block: bool = False,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.name = name
        self.database = database
        self.version = f"cdc-bridge-{__version__}"
        self.transaction_block = transaction_block
        self.clock = clock
        self._text_columns: dict[int, tuple[TableInfo, tuple[tuple[str, str], ...]]] = {}
        # data_collection_order: changes per table within the current transaction.
        self._order_commit = -1
        self._order: dict[int, int] = {}

    def _special(self, table: TableInfo) -> tuple[tuple[str, str], ...]:
        """(column, kind) for columns whose values Debezium writes differently."""
        cached = self._text_columns.get(table.oid)
        if cached is not None and cached[0] is table:
            return cached[1]
        special = tuple(
            (name, "json" if oid in (_JSON, _JSONB) else "tstz")
            for name, oid in zip(table.column_names, table.type_oids, strict=True)
            if oid in (_JSON, _JSONB, _TIMESTAMPTZ)
        )
        self._text_columns[table.oid] = (table, special)
        return special

    def _row(
        self, table: TableInfo, row: Mapping[str, JsonValue] | None, toast: list[str]
    ) -> dict[str, JsonValue] | None:
        if row is None:
            return None
        # Every column, in table order: Debezium's struct has them all (null if unknown).
        out: dict[str, JsonValue] = {name: row.get(name) for name in table.column_names}
        for name, kind in self._special(table):
            value = out[name]
            if value is None:
                continue
            out[name] = _json_document_text(value) if kind == "json" else _zoned_timestamp(value)
        for name in toast:
            out[name] = DEBEZIUM_UNAVAILABLE
        return out

    def _transaction(self, change: Change) -> dict[str, Any] | None:
        if not self.transaction_block:
            return None
        if change.commit_lsn != self._order_commit:
            self._order_commit = change.commit_lsn
            self._order = {}
        count = self._order.get(change.table.oid, 0) + 1
        self._order[change.table.oid] = count
        return {
            "id": f"{change.xid}:{change.commit_lsn}",
            "total_order": change.index + 1,
            "data_collection_order": count,
        }

    def __call__(self, change: Change, slot: str) -> bytes:
        table = change.table
        commit_us = change.commit_ts + PG_EPOCH_UNIX_MICROS
        now_ns = self.clock()
        source = {
            "version": self.version,
            "connector": "postgresql",
            "name": self.name,
            "ts_ms": commit_us // 1000,
            "snapshot": "true" if change.op == "read" else "false",
            "db": self.database,
            "sequence": _sequence(change.commit_lsn, change.lsn),
            "ts_us": commit_us,
            "ts_ns": commit_us * 1000,
            "schema": table.schema,
            "table": table.table,
            "txId": None if change.op == "read" else change.xid,
            "lsn": change.lsn,
            "xmin": None,
            "origin": None,
            "origin_lsn": None,
        }
        return orjson.dumps(
            {
                "before": self._row(table, change.before, []),
                "after": self._row(table, change.after, change.unchanged_toast),
                "source": source,
                "transaction": self._transaction(change),
                "op": _DEBEZIUM_OPS[change.op],
                "ts_ms": now_ns // 1_000_000,
                "ts_us": now_ns // 1000,
                "ts_ns": now_ns,
            }
        )


@lru_cache(maxsize=64)
def _sequence_prefix(commit_lsn: int) -> str:
    return f'["{commit_lsn}","'


def _sequence(commit_lsn: int, lsn: int) -> str:
    """Debezium's ``source.sequence``: ``["<commit LSN>","<change LSN>"]`` as a string."""
    return f'{_sequence_prefix(commit_lsn)}{lsn}"]'


# --------------------------------------------------------------------------- selection


def encoder_for(
    format: EnvelopeFormat,
    *,
    include_xids: bool = False,
    include_timestamp: bool = False,
    include_lsn: bool = False,
    include_type_oids: bool = False,
    name: str = "cdc_bridge",
    database: str = "postgres",
    transaction_block: bool = False,
) -> ChangeEncoder:
    """The encoder of ``format``, with the options that apply to it."""
    if format == "wal2json":
        return Wal2JsonEncoder(
            include_xids=include_xids,
            include_timestamp=include_timestamp,
            include_lsn=include_lsn,
            include_type_oids=include_type_oids,
        )
    if format == "debezium":
        return DebeziumEncoder(name=name, database=database, transaction_block=transaction_block)
    return encode_change


def database_of(dsn: str) -> str:
    """The database a DSN connects to (libpq's default: the user name), for Debezium's ``db``."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "postgres"
    for value in (
        params.get("dbname"),
        os.environ.get("PGDATABASE"),
        params.get("user"),
        os.environ.get("PGUSER"),
    ):
        if value:
            return str(value)
    return "postgres"


def encoder_from_settings(settings: Settings) -> ChangeEncoder:
    """The encoder the ``envelope`` section of the configuration asks for."""
    envelope = settings.envelope
    return encoder_for(
        envelope.format,
        include_xids=envelope.include_xids,
        include_timestamp=envelope.include_timestamp,
        include_lsn=envelope.include_lsn,
        include_type_oids=envelope.include_type_oids,
        name=envelope.name or settings.postgres.slot,
        database=database_of(settings.postgres.dsn.get_secret_value()),
        transaction_block=envelope.transaction_block,
    )
