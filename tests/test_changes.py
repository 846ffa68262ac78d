"""Tests for cdc_bridge.changes: pgoutput messages -> Change / MessageEvent with context."""

from __future__ import annotations

import pytest

from cdc_bridge.changes import (
    Change,
    ChangeAssembler,
    MessageEvent,
    SchemaChange,
    TableInfo,
    TransactionBegin,
    TransactionEnd,
)
from cdc_bridge.errors import DecodeError
from cdc_bridge.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    StreamStart,
    Truncate,
    Type,
    Update,
)
from cdc_bridge.values import converter_for

OID = 16384
OTHER_OID = 16400
XID = 750
COMMIT_LSN = 0x16B3800
END_LSN = 0x16B3830
TS = 849_087_130_437_029  # 2026-11-27T09:32:10.437029Z

UUID = "0b7e3f8a-4c2d-4e6f-9a1b-2c3d4e5f6a7b"
UUID2 = "5f0c2d1e-0000-4000-8000-000000000002"

INT8, TEXT, UUID_T, JSONB, TIMESTAMPTZ, BYTEA = 20, 25, 2950, 3802, 1184, 17


def _columns(key_flags: int = 0) -> tuple[Column, ...]:
    # `key_flags` is put on the non-key columns too (REPLICA IDENTITY FULL flags them all).
    return (
        Column(1, "id", INT8, -1),
        Column(key_flags, "conversation_uuid", UUID_T, -1),
        Column(key_flags, "body", TEXT, -1),
        Column(key_flags, "meta", JSONB, -1),
        Column(key_flags, "created_at", TIMESTAMPTZ, -1),
    )


RELATION = Relation(OID, "public", "conversations", "d", _columns())
RELATION_FULL = Relation(OID, "public", "conversations", "f", _columns(key_flags=1))
OTHER = Relation(OTHER_OID, "app", "users", "d", (Column(1, "user_id", INT8, -1),))

ROW_TEXT = (
    "1",
    UUID,
    "hello",
    '{"a": [1, 2], "b": null}',
    "2026-11-27 09:32:10.437029+00",
)
ROW = {
    "id": 1,
    "conversation_uuid": UUID,
    "body": "hello",
    "meta": {"a": [1, 2], "b": None},
    "created_at": "2026-11-27T09:32:10.437029Z",
}


def _begin(assembler: ChangeAssembler, xid: int = XID, commit_lsn: int = COMMIT_LSN) -> None:
    assert assembler.feed(Begin(commit_lsn, TS, xid), commit_lsn - 0x100) == (
        TransactionBegin(xid, commit_lsn, TS),
    )


def _one(assembler: ChangeAssembler, message: object, lsn: int) -> Change:
    events = assembler.feed(message, lsn)  # type: ignore[arg-type]
    assert len(events) == 1
    change = events[0]
    assert isinstance(change, Change)
    return change


def _change(
    table: TableInfo,
    op: str,
    *,
    key: dict[str, object] | None,
    after: dict[str, object] | None,
    before: dict[str, object] | None,
    lsn: int,
    index: int,
    unchanged_toast: list[str] | None = None,
    xid: int = XID,
    commit_lsn: int = COMMIT_LSN,
) -> Change:
    return Change(
        op=op,  # type: ignore[arg-type]
        table=table,
        key=key,  # type: ignore[arg-type]
        after=after,  # type: ignore[arg-type]
        before=before,  # type: ignore[arg-type]
        unchanged_toast=unchanged_toast or [],
        lsn=lsn,
        commit_lsn=commit_lsn,
        xid=xid,
        commit_ts=TS,
        index=index,
    )


# --------------------------------------------------------------------------- relations


def test_relation_builds_table_info() -> None:
    assembler = ChangeAssembler()
    assert assembler.feed(RELATION, 0x10) == ()
    table = assembler.tables[OID]
    assert table == TableInfo(
        oid=OID,
        schema="public",
        table="conversations",
        column_names=("id", "conversation_uuid", "body", "meta", "created_at"),
        converters=tuple(converter_for(oid) for oid in (INT8, UUID_T, TEXT, JSONB, TIMESTAMPTZ)),
        type_oids=(INT8, UUID_T, TEXT, JSONB, TIMESTAMPTZ),
        key_names=("id",),
        identity_names=frozenset({"id"}),
        replica_identity="d",
        type_modifiers=(-1, -1, -1, -1, -1),
    )
    assert table.qualified_name == "public.conversations"
    assert assembler.in_transaction is False


def test_configured_key_columns_override_the_flags() -> None:
    assembler = ChangeAssembler(key_columns={"public.conversations": ["conversation_uuid"]})
    assembler.feed(RELATION, 0x10)
    table = assembler.tables[OID]
    assert table.key_names == ("conversation_uuid",)
    assert table.identity_names == frozenset({"id"})


def test_empty_configured_key_falls_back_to_the_flags() -> None:
    assembler = ChangeAssembler(key_columns={"public.conversations": []})
    assembler.feed(RELATION, 0x10)
    assert assembler.tables[OID].key_names == ("id",)


def test_type_and_origin_yield_nothing() -> None:
    assembler = ChangeAssembler()
    assert assembler.feed(Type(50000, "public", "mood"), 0x10) == ()
    assert assembler.feed(Origin(COMMIT_LSN, "node_a"), 0x10) == ()


# --------------------------------------------------------------------------- transactions


def test_transaction_with_insert_update_delete() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x16B3600)
    _begin(assembler)
    assert assembler.in_transaction is True
    table = assembler.tables[OID]

    insert = _one(assembler, Insert(OID, ROW_TEXT), 0x16B3700)
    assert insert == _change(
        table, "insert", key={"id": 1}, after=ROW, before=None, lsn=0x16B3700, index=0
    )

    new_text = ("1", UUID, "edited", "[]", "2026-11-27 10:00:00+00")
    update = _one(assembler, Update(OID, new_text, None, None), 0x16B3740)
    assert update == _change(
        table,
        "update",
        key={"id": 1},
        after={
            "id": 1,
            "conversation_uuid": UUID,
            "body": "edited",
            "meta": [],
            "created_at": "2026-11-27T10:00:00Z",
        },
        before=None,
        lsn=0x16B3740,
        index=1,
    )

    delete = _one(assembler, Delete(OID, ("1", None, None, None, None), "K"), 0x16B3780)
    assert delete == _change(
        table, "delete", key={"id": 1}, after=None, before={"id": 1}, lsn=0x16B3780, index=2
    )

    assert assembler.feed(Commit(0, COMMIT_LSN, END_LSN, TS), 0x16B3800) == (
        TransactionEnd(COMMIT_LSN, END_LSN),
    )
    assert assembler.in_transaction is False


def test_index_resets_per_transaction() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    assert [_one(assembler, Insert(OID, ROW_TEXT), 0x100 + i).index for i in range(3)] == [0, 1, 2]
    assembler.feed(Commit(0, COMMIT_LSN, END_LSN, TS), COMMIT_LSN)

    _begin(assembler, xid=751, commit_lsn=0x16B3900)
    change = _one(assembler, Insert(OID, ROW_TEXT), 0x16B3880)
    assert (change.index, change.xid, change.commit_lsn, change.commit_ts) == (
        0,
        751,
        0x16B3900,
        TS,
    )
    assembler.feed(Commit(0, 0x16B3900, 0x16B3930, TS), 0x16B3900)


def test_relation_is_remembered_across_transactions() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    assembler.feed(Commit(0, COMMIT_LSN, END_LSN, TS), COMMIT_LSN)
    _begin(assembler, xid=800, commit_lsn=0x20000000)
    assert _one(assembler, Insert(OID, ROW_TEXT), 0x1FFFFF00).after == ROW


def test_values_and_nulls() -> None:
    assembler = ChangeAssembler()
    relation = Relation(
        OID,
        "public",
        "conversations",
        "d",
        (
            Column(1, "id", INT8, -1),
            Column(0, "conversation_uuid", UUID_T, -1),
            Column(0, "body", TEXT, -1),
            Column(0, "meta", JSONB, -1),
            Column(0, "created_at", TIMESTAMPTZ, -1),
            Column(0, "blob", BYTEA, -1),
            Column(0, "raw", BYTEA, -1),
        ),
    )
    assembler.feed(relation, 0x10)
    _begin(assembler)
    change = _one(
        assembler,
        Insert(
            OID,
            (
                "-9223372036854775808",
                UUID,
                "",
                '{"nested": {"x": 1.5, "t": true}}',
                "2026-11-27 09:32:10-05",
                "\\x0102ff",
                b"\x01\x02\xff",  # binary-format value
            ),
        ),
        0x100,
    )
    assert change.after == {
        "id": -9223372036854775808,
        "conversation_uuid": UUID,
        "body": "",
        "meta": {"nested": {"x": 1.5, "t": True}},
        "created_at": "2026-11-27T09:32:10-05:00",
        "blob": "AQL/",
        "raw": "AQL/",
    }
    nulls = _one(assembler, Insert(OID, ("2", None, None, None, None, None, None)), 0x101)
    assert nulls.after == {
        "id": 2,
        "conversation_uuid": None,
        "body": None,
        "meta": None,
        "created_at": None,
        "blob": None,
        "raw": None,
    }
    assert nulls.unchanged_toast == []
    assert nulls.key == {"id": 2}


def test_null_key_value_is_kept() -> None:
    assembler = ChangeAssembler(key_columns={"public.conversations": ["conversation_uuid"]})
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    change = _one(assembler, Insert(OID, ("1", None, "x", None, None)), 0x100)
    assert change.key == {"conversation_uuid": None}


# --------------------------------------------------------------------------- TOAST and old rows


def test_unchanged_toast_without_old_row() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    new = ("1", UUID, UNCHANGED_TOAST, UNCHANGED_TOAST, "2026-11-27 09:32:10.437029+00")
    change = _one(assembler, Update(OID, new, None, None), 0x100)
    assert change == _change(
        assembler.tables[OID],
        "update",
        key={"id": 1},
        after={"id": 1, "conversation_uuid": UUID, "created_at": "2026-11-27T09:32:10.437029Z"},
        before=None,
        unchanged_toast=["body", "meta"],
        lsn=0x100,
        index=0,
    )


def test_full_old_row_fills_unchanged_toast() -> None:
    assembler = ChangeAssembler(key_columns={"public.conversations": ["id"]})
    assembler.feed(RELATION_FULL, 0x10)
    _begin(assembler)
    new = ("1", UUID2, UNCHANGED_TOAST, '{"v": 2}', "2026-11-27 09:32:10.437029+00")
    change = _one(assembler, Update(OID, new, ROW_TEXT, "O"), 0x100)
    assert change == _change(
        assembler.tables[OID],
        "update",
        key={"id": 1},
        after={
            "id": 1,
            "conversation_uuid": UUID2,
            "body": "hello",  # filled from the old row
            "meta": {"v": 2},
            "created_at": "2026-11-27T09:32:10.437029Z",
        },
        before=ROW,
        unchanged_toast=[],
        lsn=0x100,
        index=0,
    )
    assert list(change.after or {}) == [
        "id",
        "conversation_uuid",
        "meta",
        "created_at",
        "body",
    ]


def test_full_old_row_without_the_value_keeps_it_listed() -> None:
    assembler = ChangeAssembler(key_columns={"public.conversations": ["id"]})
    assembler.feed(RELATION_FULL, 0x10)
    _begin(assembler)
    new = ("1", UUID, UNCHANGED_TOAST, UNCHANGED_TOAST, None)
    old = ("1", UUID, UNCHANGED_TOAST, "{}", None)
    change = _one(assembler, Update(OID, new, old, "O"), 0x100)
    assert change.after == {"id": 1, "conversation_uuid": UUID, "meta": {}, "created_at": None}
    assert change.before == {"id": 1, "conversation_uuid": UUID, "meta": {}, "created_at": None}
    assert change.unchanged_toast == ["body"]


def test_full_identity_without_configured_key_uses_every_flagged_column() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION_FULL, 0x10)
    _begin(assembler)
    change = _one(assembler, Delete(OID, ROW_TEXT, "O"), 0x100)
    assert change == _change(
        assembler.tables[OID], "delete", key=ROW, after=None, before=ROW, lsn=0x100, index=0
    )


def test_key_only_old_row_keeps_only_identity_columns() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    # The primary key changed from 1 to 2: PostgreSQL sends the old key ('K').
    new = ("2", UUID, UNCHANGED_TOAST, "{}", None)
    change = _one(assembler, Update(OID, new, ("1", None, None, None, None), "K"), 0x100)
    assert change == _change(
        assembler.tables[OID],
        "update",
        key={"id": 2},
        after={"id": 2, "conversation_uuid": UUID, "meta": {}, "created_at": None},
        before={"id": 1},
        unchanged_toast=["body"],  # not filled from a key-only old row
        lsn=0x100,
        index=0,
    )


def test_configured_key_on_delete_comes_from_the_old_row() -> None:
    assembler = ChangeAssembler(key_columns={"public.conversations": ["conversation_uuid", "id"]})
    assembler.feed(RELATION_FULL, 0x10)
    _begin(assembler)
    change = _one(assembler, Delete(OID, ROW_TEXT, "O"), 0x100)
    assert change.key == {"conversation_uuid": UUID, "id": 1}
    assert list(change.key or {}) == ["conversation_uuid", "id"]
    assert change.before == ROW
    assert change.after is None


def test_update_key_column_toasted_comes_from_before() -> None:
    # A (text) key column not resent in the new tuple: the key is taken from the old row.
    relation = Relation(
        OID, "public", "docs", "f", (Column(1, "slug", TEXT, -1), Column(1, "n", INT8, -1))
    )
    assembler = ChangeAssembler(key_columns={"public.docs": ["slug"]})
    assembler.feed(relation, 0x10)
    _begin(assembler)
    change = _one(assembler, Update(OID, (UNCHANGED_TOAST, "3"), ("s", "2"), "O"), 2)
    assert change.key == {"slug": "s"}
    assert change.after == {"n": 3, "slug": "s"}
    assert change.unchanged_toast == []


def test_table_without_key_has_no_key() -> None:
    relation = Relation(OID, "public", "log", "n", (Column(0, "line", TEXT, -1),))
    assembler = ChangeAssembler()
    assembler.feed(relation, 0x10)
    _begin(assembler)
    change = _one(assembler, Insert(OID, ("x",)), 0x100)
    assert change.key is None
    assert change.after == {"line": "x"}


# --------------------------------------------------------------------- truncate, shape changes


def test_truncate_of_two_relations() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    assembler.feed(OTHER, 0x11)
    _begin(assembler)
    _one(assembler, Insert(OID, ROW_TEXT), 0x100)
    events = assembler.feed(Truncate(1, (OID, OTHER_OID)), 0x200)  # 1: CASCADE
    first = _change(
        assembler.tables[OID], "truncate", key=None, after=None, before=None, lsn=0x200, index=1
    )
    second = _change(
        assembler.tables[OTHER_OID],
        "truncate",
        key=None,
        after=None,
        before=None,
        lsn=0x200,
        index=2,
    )
    first.truncate_options = second.truncate_options = (True, False)
    assert events == (first, second)
    restart = assembler.feed(Truncate(2, (OID,)), 0x250)  # 2: RESTART IDENTITY
    assert isinstance(restart[0], Change)
    assert restart[0].truncate_options == (False, True)
    assert restart[0].index == 3
    assert _one(assembler, Insert(OTHER_OID, ("5",)), 0x300).index == 4


def test_relation_mid_stream_changes_the_shape() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    first = _one(assembler, Insert(OID, ROW_TEXT), 0x100)
    widened = Relation(
        OID, "public", "conversations", "d", (*_columns(), Column(0, "title", TEXT, -1))
    )
    (event,) = assembler.feed(widened, 0x180)
    assert isinstance(event, SchemaChange)
    assert (event.lsn, event.commit_lsn, event.xid, event.number) == (0x180, COMMIT_LSN, XID, 0)
    assert (event.added, event.dropped, event.renamed, event.type_changed) == (
        ["title"],
        [],
        {},
        [],
    )
    second = _one(assembler, Insert(OID, (*ROW_TEXT, "Hi")), 0x200)
    assert second.index == 1
    assert second.after == {**ROW, "title": "Hi"}
    assert second.table.column_names == (
        "id",
        "conversation_uuid",
        "body",
        "meta",
        "created_at",
        "title",
    )
    # The change already handed out keeps the shape it was decoded with.
    assert first.table.column_names == ("id", "conversation_uuid", "body", "meta", "created_at")
    with pytest.raises(DecodeError) as info:
        assembler.feed(Insert(OID, ROW_TEXT), 0x300)
    assert str(info.value) == "public.conversations: tuple has 5 columns, relation has 6"


def test_relation_renamed_mid_stream_keeps_its_configured_name_and_key() -> None:
    assembler = ChangeAssembler(key_columns={"public.conversations": ("conversation_uuid",)})
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    (event,) = assembler.feed(Relation(OID, "archive", "old_conversations", "d", _columns()), 0x20)
    assert isinstance(event, SchemaChange)
    assert event.before.qualified_name == "public.conversations"
    assert event.after.qualified_name == "archive.old_conversations"
    change = _one(assembler, Insert(OID, ROW_TEXT), 0x100)
    assert change.table.qualified_name == "archive.old_conversations"
    assert change.table.config_name == "public.conversations"
    assert change.key == {"conversation_uuid": UUID}


def test_an_unchanged_relation_is_not_a_schema_change() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    assert assembler.feed(RELATION, 0x20) == ()  # a new session or a cache flush
    assert assembler.feed(OTHER, 0x30) == ()  # first sight of a table


def _shape_change(before: tuple[Column, ...], after: tuple[Column, ...]) -> SchemaChange:
    assembler = ChangeAssembler()
    assembler.feed(Relation(OID, "public", "t", "d", before), 0x10)
    _begin(assembler)
    (event,) = assembler.feed(Relation(OID, "public", "t", "d", after), 0x20)
    assert isinstance(event, SchemaChange)
    return event


def test_schema_change_tells_renamed_dropped_added_and_retyped_columns() -> None:
    a, b, c = Column(1, "a", INT8, -1), Column(0, "b", TEXT, -1), Column(0, "c", INT8, -1)
    renamed = _shape_change((a, b, c), (a, Column(0, "title", TEXT, -1), c))
    assert (renamed.renamed, renamed.added, renamed.dropped) == ({"b": "title"}, [], [])
    # Drop one column and add another of the same type: not a rename.
    swapped = _shape_change((a, b, c), (a, c, Column(0, "d", INT8, -1)))
    assert (swapped.renamed, swapped.added, swapped.dropped) == ({}, ["d"], ["b"])
    retyped = _shape_change((a, b, c), (a, b, Column(0, "c", TEXT, -1)))
    assert (retyped.type_changed, retyped.renamed, retyped.added) == (["c"], {}, [])
    rekeyed = _shape_change((a, b, c), (Column(0, "a", INT8, -1), Column(1, "b", TEXT, -1), c))
    assert rekeyed.before.key_names == ("a",)
    assert rekeyed.after.key_names == ("b",)


def test_two_schema_changes_of_a_table_in_one_transaction_are_numbered() -> None:
    a, b = Column(1, "a", INT8, -1), Column(0, "b", TEXT, -1)
    assembler = ChangeAssembler()
    assembler.feed(Relation(OID, "public", "t", "d", (a,)), 0x10)
    _begin(assembler)
    (first,) = assembler.feed(Relation(OID, "public", "t", "d", (a, b)), 0x20)
    (second,) = assembler.feed(Relation(OID, "public", "t", "d", (a,)), 0x30)
    assert isinstance(first, SchemaChange)
    assert isinstance(second, SchemaChange)
    assert (first.number, second.number) == (0, 1)


# --------------------------------------------------------------------------- logical messages


def test_transactional_message() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    _one(assembler, Insert(OID, ROW_TEXT), 0x100)
    events = assembler.feed(LogicalMessage(1, 0x16B3790, "app", b"hello"), 0x16B3790)
    assert events == (
        MessageEvent(
            prefix="app",
            content=b"hello",
            transactional=True,
            lsn=0x16B3790,
            commit_lsn=COMMIT_LSN,
            xid=XID,
            commit_ts=TS,
            index=1,
        ),
    )
    assert _one(assembler, Insert(OID, ROW_TEXT), 0x16B37A0).index == 2


def test_message_without_own_lsn_uses_the_frame_lsn() -> None:
    assembler = ChangeAssembler()
    _begin(assembler)
    (event,) = assembler.feed(LogicalMessage(1, 0, "app", b""), 0x1234)
    assert isinstance(event, MessageEvent)
    assert (event.lsn, event.index) == (0x1234, 0)


def test_non_transactional_message() -> None:
    assembler = ChangeAssembler()
    events = assembler.feed(LogicalMessage(0, 0x16B4000, "audit", b"\xff\x00"), 0x16B4000)
    assert events == (
        MessageEvent(
            prefix="audit",
            content=b"\xff\x00",
            transactional=False,
            lsn=0x16B4000,
            commit_lsn=0x16B4000,
            xid=None,
            commit_ts=None,
            index=0,
        ),
    )
    assert assembler.in_transaction is False
    (event,) = assembler.feed(LogicalMessage(0, 0, "audit", b"x"), 0x16B5000)
    assert isinstance(event, MessageEvent)
    assert (event.lsn, event.commit_lsn, event.index) == (0x16B5000, 0x16B5000, 0)


# --------------------------------------------------------------------------- errors


def test_change_before_relation() -> None:
    assembler = ChangeAssembler()
    _begin(assembler)
    with pytest.raises(DecodeError) as info:
        assembler.feed(Insert(99999, ("1",)), 0x100)
    assert str(info.value) == "change for relation 99999 before its Relation message"
    with pytest.raises(DecodeError) as info:
        assembler.feed(Truncate(0, (99999,)), 0x100)
    assert str(info.value) == "change for relation 99999 before its Relation message"


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (Insert(OID, ROW_TEXT), "row change outside a transaction"),
        (Update(OID, ROW_TEXT, None, None), "row change outside a transaction"),
        (Delete(OID, ROW_TEXT, "O"), "row change outside a transaction"),
        (Truncate(0, (OID,)), "Truncate outside a transaction"),
        (
            LogicalMessage(1, 0x100, "app", b"x"),
            "transactional logical message outside a transaction",
        ),
    ],
)
def test_change_outside_a_transaction(message: object, text: str) -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    with pytest.raises(DecodeError) as info:
        assembler.feed(message, 0x100)  # type: ignore[arg-type]
    assert str(info.value) == text


def test_change_after_commit_is_outside() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    assembler.feed(Commit(0, COMMIT_LSN, END_LSN, TS), COMMIT_LSN)
    with pytest.raises(DecodeError) as info:
        assembler.feed(Insert(OID, ROW_TEXT), 0x100)
    assert str(info.value) == "row change outside a transaction"


def test_begin_inside_a_transaction() -> None:
    assembler = ChangeAssembler()
    _begin(assembler)
    with pytest.raises(DecodeError) as info:
        assembler.feed(Begin(0x16B3900, TS, 751), 0x16B3850)
    assert str(info.value) == "Begin of xid 751 inside xid 750"


def test_commit_outside_a_transaction() -> None:
    assembler = ChangeAssembler()
    with pytest.raises(DecodeError) as info:
        assembler.feed(Commit(0, COMMIT_LSN, END_LSN, TS), COMMIT_LSN)
    assert str(info.value) == "Commit at 16B3800 outside a transaction"


def test_wrong_column_count() -> None:
    assembler = ChangeAssembler()
    assembler.feed(RELATION, 0x10)
    _begin(assembler)
    with pytest.raises(DecodeError) as info:
        assembler.feed(Insert(OID, ("1", UUID)), 0x100)
    assert str(info.value) == "public.conversations: tuple has 2 columns, relation has 5"


def test_streaming_messages_are_rejected() -> None:
    assembler = ChangeAssembler()
    with pytest.raises(DecodeError) as info:
        assembler.feed(StreamStart(XID, True), 0x100)
    assert str(info.value) == "unexpected pgoutput message StreamStart in a protocol v1 stream"


def test_a_default_key_follows_a_new_primary_key_but_a_configured_one_stays() -> None:
    a, b = Column(1, "a", INT8, -1), Column(0, "b", INT8, -1)
    rekeyed = (Column(1, "a", INT8, -1), Column(1, "b", INT8, -1))
    for default_keys, expected in ((frozenset({"public.t"}), ("a", "b")), (frozenset(), ("a",))):
        assembler = ChangeAssembler(key_columns={"public.t": ("a",)}, default_keys=default_keys)
        assembler.feed(Relation(OID, "public", "t", "d", (a, b)), 0x10)
        _begin(assembler)
        assembler.feed(Relation(OID, "public", "t", "d", rekeyed), 0x20)
        change = _one(assembler, Insert(OID, ("1", "2")), 0x30)
        assert change.table.key_names == expected
    # Under REPLICA IDENTITY FULL every column is flagged: the key found at start stays.
    full = (Column(1, "a", INT8, -1), Column(1, "b", INT8, -1))
    assembler = ChangeAssembler(
        key_columns={"public.t": ("a",)}, default_keys=frozenset({"public.t"})
    )
    assembler.feed(Relation(OID, "public", "t", "f", full), 0x10)
    _begin(assembler)
    assert _one(assembler, Insert(OID, ("1", "2")), 0x30).key == {"a": 1}
