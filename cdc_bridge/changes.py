"""Decoded pgoutput messages → row changes with their transaction context.

pgoutput sends a transaction as Begin, its changes, Commit. Begin already carries the
commit LSN, the xid and the commit time, so a change can leave the bridge as soon as it
is decoded: nothing is buffered here, memory stays flat whatever the transaction size.
The assembler keeps the relation cache (pgoutput sends a Relation message before the
first change of a table and again when its shape changes) and numbers the changes of a
transaction, which gives every change a stable identity: (commit LSN, index).

Pure: no I/O. The pipeline feeds messages in order and acts on what comes back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from cdc_bridge.errors import DecodeError
from cdc_bridge.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    TupleData,
    Type,
    Update,
)
from cdc_bridge.values import JsonValue, convert_binary, converter_for

__all__ = [
    "Change",
    "ChangeAssembler",
    "MessageEvent",
    "Op",
    "SchemaChange",
    "TableInfo",
    "TransactionBegin",
    "TransactionEnd",
]

#: "read": a row of the initial snapshot (cdc_bridge.snapshot), not a change from the WAL.
Op = Literal["insert", "update", "delete", "truncate", "read"]
Row = dict[str, JsonValue]


@dataclass(frozen=True, slots=True)
class TableInfo:
    """What the assembler knows of one relation, rebuilt at every Relation message."""

    oid: int
    schema: str
    table: str
    column_names: tuple[str, ...]
    converters: tuple[Callable[[str], JsonValue], ...]
    type_oids: tuple[int, ...]
    key_names: tuple[str, ...]
    identity_names: frozenset[str]
    replica_identity: str
    #: The name this table has in ``tables:``, kept when it is renamed while streaming.
    config_name: str | None = None
    #: atttypmod of each column (-1: none), e.g. the length of a varchar(20).
    type_modifiers: tuple[int, ...] = ()
    #: ``schema.table``: made once, read for every change (headers, metrics, filters).
    qualified_name: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "qualified_name", f"{self.schema}.{self.table}")


# Not frozen: two are made per transaction, and a frozen dataclass costs three times as
# much to build; nothing changes them after the assembler.
@dataclass(slots=True)
class TransactionBegin:
    xid: int
    commit_lsn: int
    commit_ts: int


@dataclass(slots=True)
class TransactionEnd:
    """The transaction is complete; confirming ``end_lsn`` tells PostgreSQL it is done."""

    commit_lsn: int
    end_lsn: int


@dataclass(slots=True)
class Change:
    """One row change (or one truncated table), with its place in the WAL."""

    op: Op
    table: TableInfo
    key: Row | None
    after: Row | None
    before: Row | None
    unchanged_toast: list[str]
    lsn: int
    commit_lsn: int
    xid: int
    commit_ts: int
    index: int
    #: TRUNCATE only: (CASCADE, RESTART IDENTITY) as given in the statement.
    truncate_options: tuple[bool, bool] | None = None


def read_change(
    table: TableInfo,
    row: Row,
    *,
    lsn: int,
    commit_lsn: int,
    xid: int,
    commit_ts: int,
    index: int,
) -> Change:
    """A row read from the table itself (a snapshot or backfill row): op ``read``."""
    key_names = table.key_names
    return Change(
        op="read",
        table=table,
        key={k: row.get(k) for k in key_names} if key_names else None,
        after=row,
        before=None,
        unchanged_toast=[],
        lsn=lsn,
        commit_lsn=commit_lsn,
        xid=xid,
        commit_ts=commit_ts,
        index=index,
    )


@dataclass(frozen=True, slots=True)
class SchemaChange:
    """A table's shape changed while streaming (a new Relation message for a known OID).

    It arrives inside the transaction whose first change uses the new shape, so it
    reaches the stream right before that change. ``number`` counts the schema changes of
    the same table in that transaction, to keep their message ids apart.
    """

    before: TableInfo
    after: TableInfo
    lsn: int
    commit_lsn: int
    xid: int
    commit_ts: int
    number: int

    @property
    def renamed(self) -> dict[str, str]:
        """Old → new name of renamed columns.

        pgoutput sends no column numbers, so a rename is inferred: same column count,
        and at one position a new name with the old type.
        """
        before, after = self.before, self.after
        if len(before.column_names) != len(after.column_names):
            return {}
        return {
            old: new
            for old, new, old_type, new_type in zip(
                before.column_names,
                after.column_names,
                before.type_oids,
                after.type_oids,
                strict=True,
            )
            if old != new
            and old_type == new_type
            and new not in before.column_names
            and old not in after.column_names
        }

    @property
    def added(self) -> list[str]:
        old = set(self.before.column_names) | set(self.renamed.values())
        return [name for name in self.after.column_names if name not in old]

    @property
    def dropped(self) -> list[str]:
        new = set(self.after.column_names) | set(self.renamed)
        return [name for name in self.before.column_names if name not in new]

    @property
    def type_changed(self) -> list[str]:
        old = dict(zip(self.before.column_names, self.before.type_oids, strict=True))
        return [
            name
            for name, type_oid in zip(self.after.column_names, self.after.type_oids, strict=True)
            if name in old and old[name] != type_oid
        ]


@dataclass(slots=True)
class MessageEvent:
    """A logical decoding message from ``pg_logical_emit_message``."""

    prefix: str
    content: bytes
    transactional: bool
    lsn: int
    commit_lsn: int
    xid: int | None
    commit_ts: int | None
    index: int


Event = TransactionBegin | TransactionEnd | Change | MessageEvent | SchemaChange

_NONE: Final[tuple[Event, ...]] = ()


@dataclass(slots=True)
class _OpenTransaction:
    xid: int
    commit_lsn: int
    commit_ts: int
    next_index: int = 0
    schema_changes: dict[int, int] = field(default_factory=dict)  # OID → how many so far


@dataclass
class ChangeAssembler:
    """Turns the ordered pgoutput messages of one replication stream into events.

    ``key_columns`` maps ``schema.table`` to the columns that identify a row (the primary
    key, or the configured key); tables not in it fall back to the replica identity
    columns PostgreSQL flags in the Relation message.
    """

    key_columns: Mapping[str, Sequence[str]] = field(default_factory=dict)
    tables: dict[int, TableInfo] = field(default_factory=dict)
    #: OID → configured name, so that a table renamed while streaming keeps its config.
    config_names: dict[int, str] = field(default_factory=dict)
    #: Domain type OID → base type OID: a domain's values convert like its base type's.
    type_aliases: Mapping[int, int] = field(default_factory=dict)
    #: Tables whose key is the default (primary key or identity index), not configured
    #: with ``tables.<t>.key``: their key follows a key change while streaming.
    default_keys: frozenset[str] = frozenset()
    _transaction: _OpenTransaction | None = None

    @property
    def in_transaction(self) -> bool:
        return self._transaction is not None

    def feed(self, message: PgOutputMessage, lsn: int) -> tuple[Event, ...]:
        """Consume one message (``lsn`` is its XLogData start) and return what it yields."""
        kind = type(message)
        if kind is Insert or kind is Update or kind is Delete:
            return (self._row_change(message, lsn),)  # type: ignore[arg-type]
        if kind is Begin:
            assert isinstance(message, Begin)
            if self._transaction is not None:
                raise DecodeError(f"Begin of xid {message.xid} inside xid {self._transaction.xid}")
            self._transaction = _OpenTransaction(message.xid, message.final_lsn, message.commit_ts)
            return (TransactionBegin(message.xid, message.final_lsn, message.commit_ts),)
        if kind is Commit:
            assert isinstance(message, Commit)
            if self._transaction is None:
                raise DecodeError(f"Commit at {message.commit_lsn:X} outside a transaction")
            self._transaction = None
            return (TransactionEnd(message.commit_lsn, message.end_lsn),)
        if kind is Relation:
            assert isinstance(message, Relation)
            info = self._table_info(message)
            previous = self.tables.get(message.oid)
            self.tables[message.oid] = info
            transaction = self._transaction
            if previous is None or transaction is None or _same_shape(previous, info):
                # pgoutput also re-sends an unchanged Relation (a new session, a cache
                # flush): only a different shape is a schema change.
                return _NONE
            number = transaction.schema_changes.get(message.oid, 0)
            transaction.schema_changes[message.oid] = number + 1
            return (
                SchemaChange(
                    before=previous,
                    after=info,
                    lsn=lsn,
                    commit_lsn=transaction.commit_lsn,
                    xid=transaction.xid,
                    commit_ts=transaction.commit_ts,
                    number=number,
                ),
            )
        if kind is Truncate:
            assert isinstance(message, Truncate)
            return self._truncate(message, lsn)
        if kind is LogicalMessage:
            assert isinstance(message, LogicalMessage)
            return (self._message(message, lsn),)
        if kind is Type or kind is Origin:
            return _NONE
        raise DecodeError(f"unexpected pgoutput message {kind.__name__} in a protocol v1 stream")

    def _table_info(self, relation: Relation) -> TableInfo:
        aliases = self.type_aliases
        names = tuple(column.name for column in relation.columns)
        qualified = f"{relation.namespace}.{relation.name}"
        config_name = self.config_names.get(relation.oid)
        if config_name is None and qualified in self.key_columns:
            config_name = self.config_names[relation.oid] = qualified
        configured = self.key_columns.get(config_name) if config_name else None
        if (
            configured
            and config_name in self.default_keys
            and relation.replica_identity in ("d", "i")
        ):
            # A key that defaults to the primary key (or identity index) follows it when
            # it changes: under these identities PostgreSQL flags exactly those columns.
            # Under FULL (every column flagged) and NOTHING the key found at start stays.
            configured = None
        if configured:
            key_names = tuple(configured)
        else:
            key_names = tuple(column.name for column in relation.columns if column.is_key)
        return TableInfo(
            oid=relation.oid,
            schema=relation.namespace,
            table=relation.name,
            column_names=names,
            converters=tuple(
                converter_for(aliases.get(column.type_oid, column.type_oid))
                for column in relation.columns
            ),
            type_oids=tuple(column.type_oid for column in relation.columns),
            key_names=key_names,
            identity_names=frozenset(c.name for c in relation.columns if c.is_key),
            replica_identity=relation.replica_identity,
            config_name=config_name,
            type_modifiers=tuple(column.type_modifier for column in relation.columns),
        )

    def _context(self, what: str) -> _OpenTransaction:
        transaction = self._transaction
        if transaction is None:
            raise DecodeError(f"{what} outside a transaction")
        return transaction

    def _table(self, oid: int) -> TableInfo:
        table = self.tables.get(oid)
        if table is None:
            raise DecodeError(f"change for relation {oid} before its Relation message")
        return table

    def _row_change(self, message: Insert | Update | Delete, lsn: int) -> Change:
        transaction = self._context("row change")
        table = self._table(message.relation_oid)
        index = transaction.next_index
        transaction.next_index = index + 1
        after: Row | None = None
        before: Row | None = None
        toast: list[str] = []
        if type(message) is Insert:
            op: Op = "insert"
            after = _convert_row(table, message.new, toast)
        elif type(message) is Update:
            op = "update"
            after = _convert_row(table, message.new, toast)
            if message.old is not None:
                before = _old_row(table, message.old, message.old_kind)
                if toast and message.old_kind == "O":
                    # REPLICA IDENTITY FULL logs the whole old row, detoasted: an unchanged
                    # TOAST column has the same value as before, so it can be filled in.
                    toast = _fill_from_before(after, before, toast)
        else:
            assert isinstance(message, Delete)
            op = "delete"
            before = _old_row(table, message.old, message.old_kind)
        row = after if after is not None else before
        key = _key_of(table.key_names, row, before)
        # Positional: a keyword call costs measurably more, once per change.
        return Change(
            op,
            table,
            key,
            after,
            before,
            toast,
            lsn,
            transaction.commit_lsn,
            transaction.xid,
            transaction.commit_ts,
            index,
        )

    def _truncate(self, message: Truncate, lsn: int) -> tuple[Event, ...]:
        transaction = self._context("Truncate")
        changes: list[Event] = []
        for oid in message.relation_oids:
            changes.append(
                Change(
                    op="truncate",
                    table=self._table(oid),
                    key=None,
                    after=None,
                    before=None,
                    unchanged_toast=[],
                    lsn=lsn,
                    commit_lsn=transaction.commit_lsn,
                    xid=transaction.xid,
                    commit_ts=transaction.commit_ts,
                    index=transaction.next_index,
                    truncate_options=(message.cascade, message.restart_identity),
                )
            )
            transaction.next_index += 1
        return tuple(changes)

    def _message(self, message: LogicalMessage, lsn: int) -> MessageEvent:
        if message.transactional:
            transaction = self._context("transactional logical message")
            index = transaction.next_index
            transaction.next_index += 1
            return MessageEvent(
                prefix=message.prefix,
                content=message.content,
                transactional=True,
                lsn=message.lsn or lsn,
                commit_lsn=transaction.commit_lsn,
                xid=transaction.xid,
                commit_ts=transaction.commit_ts,
                index=index,
            )
        # A non-transactional message stands alone: its own LSN identifies it.
        own_lsn = message.lsn or lsn
        return MessageEvent(
            prefix=message.prefix,
            content=message.content,
            transactional=False,
            lsn=own_lsn,
            commit_lsn=own_lsn,
            xid=None,
            commit_ts=None,
            index=0,
        )


def _same_shape(a: TableInfo, b: TableInfo) -> bool:
    return (
        a.schema == b.schema
        and a.table == b.table
        and a.column_names == b.column_names
        and a.type_oids == b.type_oids
        and a.type_modifiers == b.type_modifiers
        and a.key_names == b.key_names
        and a.identity_names == b.identity_names
        and a.replica_identity == b.replica_identity
    )


def _convert_row(table: TableInfo, values: TupleData, toast: list[str]) -> Row:
    row: Row = {}
    names = table.column_names
    if len(values) != len(names):
        raise DecodeError(
            f"{table.qualified_name}: tuple has {len(values)} columns, relation has {len(names)}"
        )
    converters = table.converters
    for position, value in enumerate(values):
        if value is None:
            row[names[position]] = None
        elif type(value) is str:
            row[names[position]] = converters[position](value)
        elif value is UNCHANGED_TOAST:
            toast.append(names[position])
        else:
            assert isinstance(value, bytes)
            row[names[position]] = convert_binary(table.type_oids[position], value)
    return row


def _old_row(table: TableInfo, values: TupleData, old_kind: str | None) -> Row:
    row = _convert_row(table, values, [])
    if old_kind == "K":
        # A key-only old tuple sends NULL for every other column: those NULLs are not
        # the old values, so they are left out rather than reported.
        return {name: value for name, value in row.items() if name in table.identity_names}
    return row


def _fill_from_before(after: Row, before: Row, toast: list[str]) -> list[str]:
    still_missing = []
    for name in toast:
        if name in before:
            after[name] = before[name]
        else:
            still_missing.append(name)
    return still_missing


def _key_of(key_names: tuple[str, ...], row: Row | None, before: Row | None) -> Row | None:
    if not key_names or row is None:
        return None
    key: Row = {}
    for name in key_names:
        if name in row:
            key[name] = row[name]
        elif before is not None and name in before:
            key[name] = before[name]
    return key
