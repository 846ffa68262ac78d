"""The native envelope: the JSON body of every published message (a documented contract).

Change::

    {"op": "insert|update|delete|truncate|read", "schema": "public", "table": "conversations",
     "key": {...} | null, "after": {...} | null, "before": {...} | null,
     "unchanged_toast": [...],
     "source": {"slot", "lsn", "commit_lsn", "xid", "commit_ts", "index"}}

A TRUNCATE also carries ``"truncate": {"cascade": bool, "restart_identity": bool}``.

Schema change (a table's shape changed while streaming)::

    {"op": "schema", "schema", "table", "oid", "columns": [{"name", "type_oid", "key"}],
     "replica_identity": "default|full|index|nothing",
     "previous": {"schema", "table", "columns": [...], "replica_identity"},
     "added": [...], "dropped": [...], "renamed": {"old": "new"}, "type_changed": [...],
     "source": {...no index...}}

Logical decoding message::

    {"op": "message", "prefix": "...", "content": "...", "content_encoding": "utf-8|base64",
     "transactional": true|false, "source": {...same keys...}}

LSNs are strings in PostgreSQL's ``X/X`` form, ``commit_ts`` is ISO-8601 UTC. Serialized
with orjson, the fastest JSON encoder for Python.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from typing import Any

import orjson

from cdc_bridge.changes import Change, MessageEvent, SchemaChange, TableInfo
from cdc_bridge.lsn import format_lsn
from cdc_bridge.pgoutput import pg_timestamp_to_iso

__all__ = ["encode_change", "encode_message", "encode_schema_change", "transaction_strings"]


@lru_cache(maxsize=64)
def transaction_strings(commit_lsn: int, commit_ts: int | None) -> tuple[str, str | None]:
    """Text forms of a transaction's commit LSN and time.

    Every change of a transaction shares them: formatting them once per transaction
    rather than once per change is a measurable saving on the hot path.
    """
    return format_lsn(commit_lsn), None if commit_ts is None else pg_timestamp_to_iso(commit_ts)


def _source(
    slot: str, lsn: int, commit_lsn: int, xid: int | None, ts: int | None, index: int
) -> dict[str, Any]:
    commit_lsn_text, commit_ts_text = transaction_strings(commit_lsn, ts)
    return {
        "slot": slot,
        "lsn": format_lsn(lsn),
        "commit_lsn": commit_lsn_text,
        "xid": xid,
        "commit_ts": commit_ts_text,
        "index": index,
    }


def encode_change(change: Change, slot: str) -> bytes:
    """The native envelope of a row change, as JSON bytes."""
    table = change.table
    body: dict[str, Any] = {
        "op": change.op,
        "schema": table.schema,
        "table": table.table,
        "key": change.key,
        "after": change.after,
        "before": change.before,
        "unchanged_toast": change.unchanged_toast,
        "source": _source(
            slot, change.lsn, change.commit_lsn, change.xid, change.commit_ts, change.index
        ),
    }
    if change.op == "read":
        # A snapshot row: no transaction of its own; lsn and commit_lsn are the slot's
        # consistent point, index its number in its table's snapshot.
        source = body["source"]
        source["xid"] = None
        source["snapshot"] = True
    if change.truncate_options is not None:
        cascade, restart_identity = change.truncate_options
        body["truncate"] = {"cascade": cascade, "restart_identity": restart_identity}
    return orjson.dumps(body)


_REPLICA_IDENTITY = {"d": "default", "f": "full", "i": "index", "n": "nothing"}


def _shape(table: TableInfo) -> dict[str, Any]:
    return {
        "schema": table.schema,
        "table": table.table,
        "columns": [
            {"name": name, "type_oid": type_oid, "key": name in table.key_names}
            for name, type_oid in zip(table.column_names, table.type_oids, strict=True)
        ],
        "replica_identity": _REPLICA_IDENTITY.get(table.replica_identity, table.replica_identity),
    }


def encode_schema_change(event: SchemaChange, slot: str) -> bytes:
    """The native envelope of a schema change, as JSON bytes."""
    after = _shape(event.after)
    source = _source(slot, event.lsn, event.commit_lsn, event.xid, event.commit_ts, 0)
    del source["index"]
    return orjson.dumps(
        {
            "op": "schema",
            "schema": after.pop("schema"),
            "table": after.pop("table"),
            "oid": event.after.oid,
            **after,
            "previous": _shape(event.before),
            "added": event.added,
            "dropped": event.dropped,
            "renamed": event.renamed,
            "type_changed": event.type_changed,
            "source": source,
        }
    )


def encode_message(message: MessageEvent, slot: str) -> bytes:
    """The native envelope of a logical decoding message, as JSON bytes."""
    try:
        content, encoding = message.content.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        content, encoding = base64.b64encode(message.content).decode("ascii"), "base64"
    return orjson.dumps(
        {
            "op": "message",
            "prefix": message.prefix,
            "content": content,
            "content_encoding": encoding,
            "transactional": message.transactional,
            "source": _source(
                slot,
                message.lsn,
                message.commit_lsn,
                message.xid,
                message.commit_ts,
                message.index,
            ),
        }
    )
