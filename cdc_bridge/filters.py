"""Per-table filters and masking: which changes leave the bridge, with which columns. Pure.

Applied to every :class:`~cdc_bridge.changes.Change` before it is routed, so that the
subject, the key and the body all see the same, already masked, values:

- ``ops``: a change of another kind is dropped (it still counts for its transaction:
  the transaction's checkpoint moves on, nothing waits for a message that never comes);
- ``columns`` / ``exclude_columns``: other columns are removed from ``after``,
  ``before`` and ``unchanged_toast`` (key columns are always published: config and
  start-up checks refuse to leave one out);
- ``mask``: ``hash`` (hex HMAC-SHA256 under a secret salt, NULL stays NULL), ``redact``
  (always :data:`REDACTED`, so not even NULL-ness leaks) or ``truncate`` (the first N
  characters; a value that is not a string is truncated in its JSON text form).

Row filters (``where``) are not here: PostgreSQL applies them before the change is
even decoded (see ``provisioning.py``).

Tables without any of these settings get no filter at all, so they cost nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final, Literal

import orjson

from cdc_bridge.changes import Change, TableInfo
from cdc_bridge.config import HashMask, MaskRule, TableSettings, TruncateMask
from cdc_bridge.values import JsonValue, converter_for

__all__ = [
    "REDACTED",
    "ChangeFilters",
    "Mask",
    "TableFilter",
    "build_filters",
    "hash_value",
    "mask_kind",
    "table_filter",
    "truncate_value",
]

#: What a redacted value becomes, whatever it was (NULL included).
REDACTED: Final = "***"

_ALL_OPS: Final = frozenset({"insert", "update", "delete", "truncate"})

# A masked value is a string whatever the column's type: envelopes that describe
# columns by type (wal2json, Debezium) see it as text.
_TEXT_OID: Final = 25


def hash_value(value: JsonValue, salt: bytes) -> str | None:
    """Hex HMAC-SHA256 of ``value`` under ``salt``; NULL stays NULL.

    A string is hashed as its UTF-8 bytes, anything else as its JSON text (keys sorted),
    so ``encode(hmac(value::text, salt, 'sha256'), 'hex')`` in PostgreSQL (pgcrypto)
    gives the same hash for text, numbers and booleans.
    """
    if value is None:
        return None
    data = (
        value.encode()
        if isinstance(value, str)
        else orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    )
    return hmac.new(salt, data, hashlib.sha256).hexdigest()


def truncate_value(value: JsonValue, length: int) -> JsonValue:
    """The first ``length`` characters (code points) of a string; NULL stays NULL."""
    if value is None:
        return None
    if isinstance(value, str):
        return value[:length]
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()[:length]


@dataclass(frozen=True, slots=True)
class Mask:
    """One column's mask, compiled."""

    kind: Literal["hash", "redact", "truncate"]
    salt: bytes = b""
    length: int = 0

    def apply(self, value: JsonValue) -> JsonValue:
        if self.kind == "hash":
            return hash_value(value, self.salt)
        if self.kind == "truncate":
            return truncate_value(value, self.length)
        return REDACTED

    def __repr__(self) -> str:  # never show the salt
        return f"Mask({self.kind!r}, length={self.length})"


@dataclass(frozen=True, slots=True)
class TableFilter:
    """What one table publishes: ops, columns (``include`` None: all), masks."""

    ops: frozenset[str] = _ALL_OPS
    include: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()
    masks: Mapping[str, Mask] | None = None

    @property
    def touches_columns(self) -> bool:
        return self.include is not None or bool(self.exclude) or bool(self.masks)

    def apply(self, change: Change) -> bool:
        """Filter and mask ``change`` in place; False if it is not to be published."""
        if change.op not in self.ops and change.op != "read":  # snapshot.mode rules reads
            return False
        if change.after is not None:
            change.after = self._row(change.after)
        if change.before is not None:
            change.before = self._row(change.before)
        if change.key is not None and self.masks:
            change.key = self._row(change.key)
        if change.unchanged_toast:
            change.unchanged_toast = [c for c in change.unchanged_toast if self._published(c)]
        return True

    def view(self, table: TableInfo) -> TableInfo:
        """``table`` as published: left-out columns gone, masked columns typed as text.

        Every envelope describes a change through its table, so none of them can show
        a left-out column, or apply a column type's formatting to a masked value.
        """
        if not self.touches_columns:
            return table
        masks = self.masks or {}
        names: list[str] = []
        converters = []
        type_oids: list[int] = []
        for name, converter, oid in zip(
            table.column_names, table.converters, table.type_oids, strict=True
        ):
            if not self._published(name):
                continue
            names.append(name)
            if name in masks:
                converters.append(converter_for(_TEXT_OID))
                type_oids.append(_TEXT_OID)
            else:
                converters.append(converter)
                type_oids.append(oid)
        return replace(
            table,
            column_names=tuple(names),
            converters=tuple(converters),
            type_oids=tuple(type_oids),
            identity_names=frozenset(n for n in table.identity_names if self._published(n)),
        )

    def _published(self, column: str) -> bool:
        include = self.include
        return column not in self.exclude and (include is None or column in include)

    def _row(self, row: dict[str, JsonValue]) -> dict[str, JsonValue]:
        include = self.include
        if include is not None:
            row = {name: value for name, value in row.items() if name in include}
        for name in self.exclude:
            row.pop(name, None)
        if self.masks:
            for name, mask in self.masks.items():
                if name in row:
                    row[name] = mask.apply(row[name])
        return row


def mask_kind(rule: MaskRule) -> Literal["hash", "redact", "truncate"]:
    """The kind of a configured mask rule."""
    if isinstance(rule, HashMask):
        return "hash"
    if isinstance(rule, TruncateMask):
        return "truncate"
    return "redact"


def table_filter(settings: TableSettings) -> TableFilter | None:
    """The compiled filter of one table, or None when it publishes everything as it is.

    Reads the hash salts (ValueError naming the variable or file if one is missing).
    """
    masks: dict[str, Mask] = {}
    for column, rule in settings.mask.items():
        if isinstance(rule, HashMask):
            salt = rule.hash.salt().get_secret_value().encode()
            masks[column] = Mask("hash", salt=salt)
        elif isinstance(rule, TruncateMask):
            masks[column] = Mask("truncate", length=rule.truncate)
        else:
            masks[column] = Mask("redact")
    compiled = TableFilter(
        ops=frozenset(settings.ops),
        include=frozenset(settings.columns) if settings.columns is not None else None,
        exclude=frozenset(settings.exclude_columns),
        masks=masks or None,
    )
    if compiled.ops == _ALL_OPS and not compiled.touches_columns:
        return None
    return compiled


class ChangeFilters:
    """The filters of the configured tables, looked up per change by relation.

    The lookup is by the table's name in the config (kept across a rename while
    streaming), cached per relation OID and checked against the relation's current
    :class:`TableInfo` object (a new one is made at every Relation message). A
    filtered change leaves with the table's published view (:meth:`published_table`),
    one object per relation shape, so caches keyed the same way keep working.
    """

    __slots__ = ("_by_name", "_cache")

    def __init__(self, by_name: Mapping[str, TableFilter]) -> None:
        self._by_name = dict(by_name)
        self._cache: dict[int, tuple[TableInfo, TableFilter | None, TableInfo]] = {}

    def _entry(self, table: TableInfo) -> tuple[TableInfo, TableFilter | None, TableInfo]:
        cached = self._cache.get(table.oid)
        if cached is not None and cached[0] is table:
            return cached
        # By the name in the config: a table renamed while streaming keeps its filter.
        found = self._by_name.get(table.config_name or table.qualified_name)
        entry = (table, found, table if found is None else found.view(table))
        self._cache[table.oid] = entry
        return entry

    def for_table(self, table: TableInfo) -> TableFilter | None:
        return self._entry(table)[1]

    def published_table(self, table: TableInfo) -> TableInfo:
        """``table`` as its messages show it (for schema-change events, say)."""
        return self._entry(table)[2]

    def apply(self, change: Change) -> bool:
        """Filter and mask ``change`` in place; False if it is not to be published."""
        _, found, view = self._entry(change.table)
        if found is None:
            return True
        if found.apply(change):
            change.table = view
            return True
        return False


def build_filters(tables: Mapping[str, TableSettings]) -> ChangeFilters | None:
    """The filters of the configured tables; None when no table has one (the fast path)."""
    compiled = {name: f for name, s in tables.items() if (f := table_filter(s)) is not None}
    return ChangeFilters(compiled) if compiled else None
