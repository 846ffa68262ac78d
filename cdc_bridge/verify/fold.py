"""Folding the stream into the latest state per key, and comparing it with the table. Pure.

A stream message of a table is decoded (whatever ``envelope.format`` wrote it) into a
:class:`RowEvent`: an op, the row's key (canonical JSON text of the key values, in key
order) and the column values the message states. :class:`TableFold` applies the events
in stream order:

- ``insert`` and ``read`` (snapshot, backfill and repair rows) set the key's row;
- ``update`` sets the columns it states and keeps the others (an unchanged TOAST value is
  not stated: it keeps the previous value if the stream knew it, else stays unknown); an
  update that changed the key clears the old key;
- ``delete`` clears the key, ``truncate`` clears the whole table.

Only columns the stream knows are compared (:func:`differing_columns`). A key without
any message is absent from the stream when the stream holds the table's whole history
(``baseline_known``), and unknown otherwise (retention dropped early messages).

Values are compared in their published form: the table's rows go through the same
filters, masks and envelope encoder as the bridge's messages, then through the same
decoder as the stream's messages (see :mod:`cdc_bridge.verify.table`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from cdc_bridge.envelopes import DEBEZIUM_UNAVAILABLE

__all__ = [
    "ROW_OPS",
    "RowEvent",
    "SnapshotVisibility",
    "TableFold",
    "decode_row",
    "differing_columns",
    "key_text",
    "sample_predicate",
]

#: The ops a table's row messages carry.
ROW_OPS: Final = frozenset({"insert", "update", "delete", "truncate", "read"})

_DEBEZIUM_OPS: Final = {"c": "insert", "u": "update", "d": "delete", "t": "truncate", "r": "read"}
_WAL2JSON_OPS: Final = {"I": "insert", "U": "update", "D": "delete", "T": "truncate"}

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RowEvent:
    """One decoded row message: what it says about which key."""

    op: str  # insert | update | delete | truncate | read
    key: str | None  # canonical key text; None for truncate (or a row without its key)
    row: Row | None  # the columns the message states (None: delete, truncate)
    old_key: str | None = None  # an update that moved the row from another key
    xid: int | None = None  # the transaction, where the envelope tells


def key_text(key_names: Sequence[str], row: Mapping[str, Any] | None) -> str | None:
    """The canonical text of ``row``'s key: ``[v1, v2]`` as JSON; None if a part is missing."""
    if row is None or not key_names:
        return None
    try:
        return orjson.dumps([row[name] for name in key_names]).decode()
    except KeyError:
        return None


def _wal2json_row(items: object) -> Row | None:
    if not isinstance(items, list):
        return None
    return {str(c["name"]): c.get("value") for c in items if isinstance(c, dict) and "name" in c}


def _debezium_row(row: object) -> Row | None:
    if not isinstance(row, dict):
        return None
    # An unchanged TOAST column carries Debezium's placeholder: its value is not stated.
    return {k: v for k, v in row.items() if v != DEBEZIUM_UNAVAILABLE}


def decode_row(
    envelope: str, op: str, body: Mapping[str, Any], key_names: Sequence[str]
) -> RowEvent:
    """The :class:`RowEvent` of one message body (``op`` from its ``Cdc-Op`` header).

    ``envelope`` is ``envelope.format``: native, wal2json or debezium.
    """
    after: Row | None
    before: Row | None
    xid: object = None
    if envelope == "wal2json":
        after = _wal2json_row(body.get("columns"))
        before = _wal2json_row(body.get("identity"))
        xid = body.get("xid")
    elif envelope == "debezium":
        after = _debezium_row(body.get("after"))
        before = _debezium_row(body.get("before"))
        source = body.get("source")
        xid = source.get("txId") if isinstance(source, dict) else None
    else:
        raw_after = body.get("after")
        raw_before = body.get("before")
        after = dict(raw_after) if isinstance(raw_after, dict) else None
        before = dict(raw_before) if isinstance(raw_before, dict) else None
        toast = body.get("unchanged_toast") or ()
        if after is not None:
            for column in toast:
                after.pop(column, None)
        source = body.get("source")
        xid = source.get("xid") if isinstance(source, dict) else None
    xid_value = xid if isinstance(xid, int) and not isinstance(xid, bool) and xid > 0 else None
    if op == "truncate":
        return RowEvent("truncate", None, None, xid=xid_value)
    if op == "delete":
        return RowEvent("delete", key_text(key_names, before), None, xid=xid_value)
    key = key_text(key_names, after)
    old_key = None
    if op == "update" and before is not None:
        old = key_text(key_names, before)
        if old is not None and old != key:
            old_key = old
    return RowEvent(op, key, after, old_key, xid_value)


def decode_op(envelope: str, body: Mapping[str, Any]) -> str | None:
    """The op a body states (for messages without a ``Cdc-Op`` header)."""
    if envelope == "wal2json":
        return _WAL2JSON_OPS.get(str(body.get("action")))
    if envelope == "debezium":
        return _DEBEZIUM_OPS.get(str(body.get("op")))
    op = body.get("op")
    return op if isinstance(op, str) and op in ROW_OPS else None


def sample_predicate(fraction: float, seed: str) -> Callable[[str], bool] | None:
    """Whether a key (its canonical text) is in the sample: by a salted hash, so the table
    side and the stream side pick the same keys. None when every key is in it."""
    if fraction >= 1.0:
        return None
    threshold = int(max(0.0, fraction) * 2**64)
    salt = seed.encode()

    def keep(key: str) -> bool:
        digest = hashlib.blake2b(key.encode(), digest_size=8, key=salt[:64]).digest()
        return int.from_bytes(digest, "big") < threshold

    return keep


@dataclass(slots=True)
class TableFold:
    """The latest state per key of one table, as the stream tells it.

    ``states[key]`` is the row's known columns, or None when the stream says the row is
    gone. A key without an entry has had no message (since the last truncate).
    """

    baseline_known: bool = True  # keys without a message are known to be absent
    keep: Callable[[str], bool] | None = None  # the sample, if any
    states: dict[str, Row | None] = field(default_factory=dict)
    messages: int = 0  # events applied
    truncates: int = 0

    def _kept(self, key: str | None) -> bool:
        return key is not None and (self.keep is None or self.keep(key))

    def apply(self, event: RowEvent) -> None:
        self.messages += 1
        op = event.op
        if op == "truncate":
            self.states.clear()
            self.baseline_known = True  # nothing before the truncate matters any more
            self.truncates += 1
            return
        key = event.key
        if op == "delete":
            if key is not None and self._kept(key):
                self.states[key] = None
            return
        if key is None or event.row is None:
            return
        previous: Row | None = None
        if op == "update":
            if event.old_key is not None:
                previous = self.states.get(event.old_key)
                if self._kept(event.old_key):
                    self.states[event.old_key] = None
            else:
                previous = self.states.get(key)
        if not self._kept(key):
            return
        if op == "update" and previous is not None:
            self.states[key] = {**previous, **event.row}
        else:
            self.states[key] = dict(event.row)


def differing_columns(table_row: Mapping[str, Any], stream_row: Mapping[str, Any]) -> list[str]:
    """Columns the stream knows whose value differs from the table's, in table order.

    A column the stream does not state (unchanged TOAST it never saw, a column added
    after the row's last message) is not compared; nor is one the table no longer has.
    """
    return [
        name
        for name, value in table_row.items()
        if name in stream_row and stream_row[name] != value
    ]


class SnapshotVisibility:
    """Which transactions a ``REPEATABLE READ`` snapshot sees (``pg_current_snapshot()``).

    A transaction that commits while the snapshot is taken can get a commit LSN below
    ``pg_current_wal_lsn()`` read in it and still be invisible; where a message names its
    transaction (native and Debezium envelopes, wal2json with ``include_xids``) such a
    message is left out of the fold like the table leaves its change out.
    """

    __slots__ = ("xip", "xmax", "xmin")

    def __init__(self, text: str) -> None:
        xmin, xmax, xip = text.split(":", 2)
        self.xmin = int(xmin)
        self.xmax = int(xmax)
        self.xip = frozenset(int(x) for x in xip.split(",") if x)

    def full_xid(self, xid: int) -> int:
        """A 32-bit xid as the 64-bit one nearest below ``xmax`` + 2^31."""
        candidate = (self.xmax & ~0xFFFFFFFF) | (xid & 0xFFFFFFFF)
        if candidate >= self.xmax + 2**31:
            candidate -= 2**32
        elif candidate < self.xmax - 2**31:
            candidate += 2**32
        return candidate

    def visible(self, xid: int) -> bool:
        full = self.full_xid(xid)
        if full < self.xmin:
            return True
        return full < self.xmax and full not in self.xip
