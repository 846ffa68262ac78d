"""decode_message against bytes captured from PostgreSQL 18 (see capture.py), plus fuzzing."""

from __future__ import annotations

import copy
import pickle
import struct
from collections import Counter
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    PgOutputMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    UnchangedToast,
    Update,
    decode_message,
    pg_timestamp_to_datetime,
    pg_timestamp_to_iso,
)

from .capture import ORIGIN_LSN, ORIGIN_NAME, load_capture, toast_text

M = TypeVar("M")

INT4, TEXT, NUMERIC, VARCHAR, BYTEA = 23, 25, 1700, 1043, 17


class Decoded:
    """A capture decoded in order, tracking Stream Start/Stop like the reader will."""

    def __init__(self, name: str) -> None:
        self.records = load_capture(name)
        self.messages: list[PgOutputMessage] = []
        self.in_stream_flags: list[bool] = []
        in_stream = False
        for _, _, payload in self.records:
            msg = decode_message(payload, in_stream=in_stream)
            self.messages.append(msg)
            self.in_stream_flags.append(in_stream)
            if isinstance(msg, StreamStart):
                in_stream = True
            elif isinstance(msg, StreamStop):
                in_stream = False

    def of(self, kind: type[M]) -> list[M]:
        return [m for m in self.messages if isinstance(m, kind)]

    def relation(self, name: str) -> Relation:
        return next(r for r in self.of(Relation) if r.name == name)

    def rows(self, kind: type[M], relation: str) -> list[M]:
        oid = self.relation(relation).oid
        return [m for m in self.of(kind) if getattr(m, "relation_oid", None) == oid]


V1 = Decoded("v1")
V2 = Decoded("v2_stream")
V4 = Decoded("v4_parallel")
BINARY = Decoded("binary")
# Every protocol-1 payload, plus one streamed payload per (type, in-stream) pair, keeps
# the exhaustive and property-based tests fast while covering every captured shape.
SAMPLE_PAYLOADS: list[tuple[bytes, bool]] = [
    (p, False) for d in (V1, BINARY) for _, _, p in d.records
] + list(
    {
        (p[0], flag, d is V4): (p, flag)
        for d in (V2, V4)
        for (_, _, p), flag in zip(d.records, d.in_stream_flags, strict=True)
    }.values()
)


# --- protocol 1 ---------------------------------------------------------------------


def test_v1_message_kinds() -> None:
    counts = Counter(type(m).__name__ for m in V1.messages)
    assert counts == {
        "Begin": 15,
        "Commit": 15,
        # parent, child and scratch are announced again after TRUNCATE gave them
        # new relfilenodes: consumers must accept repeated Relation messages.
        "Relation": 9,
        "Type": 1,
        "Insert": 9,
        "Update": 4,
        "Delete": 2,
        "Truncate": 2,
        "LogicalMessage": 2,
        "Origin": 1,
    }


def test_begin_and_commit_agree() -> None:
    begins = V1.of(Begin)
    commits = V1.of(Commit)
    assert len(begins) == len(commits)
    for begin, commit in zip(begins, commits, strict=True):
        assert commit.commit_lsn == begin.final_lsn
        assert commit.commit_ts == begin.commit_ts
        assert commit.end_lsn > commit.commit_lsn
        assert commit.flags == 0
    # The record header of every message in a transaction carries the same xid.
    for (_, xid, _), msg in zip(V1.records, V1.messages, strict=True):
        if isinstance(msg, Begin):
            assert msg.xid == xid
    assert [b.xid for b in begins] == sorted(b.xid for b in begins)
    for (lsn, _, _), msg in zip(V1.records, V1.messages, strict=True):
        if isinstance(msg, Commit):
            assert lsn == msg.end_lsn


def test_commit_timestamp_is_recent_utc() -> None:
    ts = pg_timestamp_to_datetime(V1.of(Begin)[0].commit_ts)
    assert ts.tzinfo is UTC
    assert datetime(2025, 1, 1, tzinfo=UTC) < ts < datetime(2100, 1, 1, tzinfo=UTC)


def test_relation_and_type() -> None:
    items = V1.relation("items")
    mood = V1.of(Type)[0]
    assert (mood.namespace, mood.name, mood.xid) == ("cdc_capture", "mood", None)
    assert items.namespace == "cdc_capture"
    assert items.replica_identity == "d"
    assert items.xid is None
    assert items.columns == (
        Column(1, "id", INT4, -1),
        Column(0, "name", TEXT, -1),
        Column(0, "price", NUMERIC, (10 << 16 | 2) + 4),  # numeric(10,2)
        Column(0, "mood", mood.oid, -1),
        Column(0, "note", VARCHAR, 20 + 4),  # varchar(20)
        Column(0, "data", BYTEA, -1),
    )
    assert [c.is_key for c in items.columns] == [True, False, False, False, False, False]
    # The Type message precedes the first Relation that uses it.
    assert V1.messages.index(mood) < V1.messages.index(items)


def test_replica_identity_full_marks_every_column_as_key() -> None:
    full = V1.relation("full_rows")
    assert full.replica_identity == "f"
    assert [c.is_key for c in full.columns] == [True, True]
    # A table without a primary key still gets a Relation; no column is a key.
    scratch = V1.relation("scratch")
    assert scratch.replica_identity == "d"
    assert not any(c.is_key for c in scratch.columns)


def test_insert_with_nulls_and_non_ascii_text() -> None:
    rows = V1.rows(Insert, "items")
    assert [r.new for r in rows] == [
        ("1", "widget", "9.99", "happy", None, "\\x00ff"),
        ("2", "gizmo", None, None, "ünïcödé", None),
    ]
    assert all(r.xid is None for r in rows)


def test_update_without_old_tuple() -> None:
    first = V1.rows(Update, "items")[0]
    assert first.old is None
    assert first.old_kind is None
    assert first.new == ("1", "widget v2", "9.99", "happy", None, "\\x00ff")


def test_update_with_old_key() -> None:
    changed_key = V1.rows(Update, "items")[1]
    assert changed_key.old_kind == "K"
    # The old key tuple has every column; non-key ones are sent as NULL.
    assert changed_key.old == ("2", None, None, None, None, None)
    assert changed_key.new == ("20", "gizmo", None, None, "ünïcödé", None)


def test_update_with_full_old_row() -> None:
    (update,) = V1.rows(Update, "full_rows")
    assert update.old_kind == "O"
    assert update.old == ("1", "one")
    assert update.new == ("1", "uno")


def test_deletes() -> None:
    (by_key,) = V1.rows(Delete, "items")
    assert (by_key.old_kind, by_key.old) == ("K", ("20", None, None, None, None, None))
    (full,) = V1.rows(Delete, "full_rows")
    assert (full.old_kind, full.old) == ("O", ("2", "two"))


def test_unchanged_toast() -> None:
    (insert,) = V1.rows(Insert, "toasty")
    assert insert.new == ("1", "0", toast_text())
    (update,) = V1.rows(Update, "toasty")
    assert update.new == ("1", "1", UNCHANGED_TOAST)
    assert update.new[2] is UNCHANGED_TOAST
    assert update.old is None


def test_truncates() -> None:
    cascade, plain = V1.of(Truncate)
    assert cascade.options == 3
    assert cascade.cascade
    assert cascade.restart_identity
    assert cascade.relation_oids == (V1.relation("parent").oid, V1.relation("child").oid)
    assert plain.options == 0
    assert not plain.cascade
    assert not plain.restart_identity
    assert plain.relation_oids == (V1.relation("scratch").oid,)


def test_logical_messages() -> None:
    transactional, plain = V1.of(LogicalMessage)
    assert transactional == LogicalMessage(
        flags=1, lsn=transactional.lsn, prefix="cdc-test", content=b"hello, transactional"
    )
    assert transactional.transactional
    assert not plain.transactional
    assert (plain.prefix, plain.content, plain.xid) == ("cdc-test", b"\x00\x01\x02\x03", None)
    # A non-transactional message sits outside any Begin/Commit, under xid 0.
    index = V1.messages.index(plain)
    lsn, xid, _ = V1.records[index]
    assert xid == 0
    assert plain.lsn == lsn
    assert isinstance(V1.messages[index - 1], Commit)
    assert isinstance(V1.messages[index + 1], Begin)


def test_origin_follows_begin() -> None:
    (origin,) = V1.of(Origin)
    assert origin == Origin(commit_lsn=ORIGIN_LSN, name=ORIGIN_NAME)
    assert isinstance(V1.messages[V1.messages.index(origin) - 1], Begin)


def test_binary_columns() -> None:
    (insert,) = BINARY.rows(Insert, "items")
    assert insert.new[0] == struct.pack("!i", 4)
    assert insert.new[1] == b"binary"
    assert isinstance(insert.new[2], bytes)  # numeric's binary send format
    assert insert.new[3:] == (b"sad", None, b"\xde\xad\xbe\xef")


def test_memoryview_input_decodes_the_same() -> None:
    for payload, in_stream in SAMPLE_PAYLOADS:
        expected = decode_message(payload, in_stream=in_stream)
        assert decode_message(memoryview(payload), in_stream=in_stream) == expected
        framed = memoryview(b"xx" + payload + b"yy")[2:-2]
        assert decode_message(framed, in_stream=in_stream) == expected


# --- protocol 2 streaming -----------------------------------------------------------


def test_v2_stream_structure() -> None:
    starts = V2.of(StreamStart)
    assert [s.first_segment for s in starts] == [True] + [False] * (len(starts) - 1)
    assert len(starts) >= 3
    assert len(V2.of(StreamStop)) == len(starts)
    top_xid = starts[0].xid
    assert all(s.xid == top_xid for s in starts)
    (commit,) = V2.of(StreamCommit)
    assert commit.xid == top_xid
    assert commit.flags == 0
    assert commit.end_lsn > commit.commit_lsn
    # SQL peek reports a commit at its end LSN: that is where a consumer resumes.
    lsn, xid, _ = V2.records[V2.messages.index(commit)]
    assert (lsn, xid) == (commit.end_lsn, top_xid)


def test_v2_in_stream_messages_carry_xids() -> None:
    starts = V2.of(StreamStart)
    top_xid = starts[0].xid
    (abort,) = V2.of(StreamAbort)
    for msg, in_stream in zip(V2.messages, V2.in_stream_flags, strict=True):
        xid = getattr(msg, "xid", "n/a")
        if isinstance(msg, (Insert, Update, Delete, Truncate, Relation, Type, LogicalMessage)):
            if in_stream:
                # Changes carry the xid of the (sub)transaction that made them.
                assert isinstance(xid, int)
                assert xid >= top_xid
            else:
                assert xid is None
    streamed = {type(m).__name__ for m, f in zip(V2.messages, V2.in_stream_flags, strict=True) if f}
    assert streamed >= {"Insert", "Update", "Delete", "Truncate", "Relation", "Type"}
    assert "LogicalMessage" in streamed
    # After ROLLBACK TO SAVEPOINT the savepoint lives on under a new subxact xid.
    (update,) = V2.rows(Update, "bulk")
    assert update.xid not in (None, top_xid, abort.subxid)


def test_v2_subtransaction_abort() -> None:
    (abort,) = V2.of(StreamAbort)
    top_xid = V2.of(StreamStart)[0].xid
    assert abort.xid == top_xid
    assert abort.subxid != top_xid
    assert (abort.abort_lsn, abort.abort_ts) == (None, None)
    # The rolled-back rows were streamed before the abort, under the subxact's xid.
    doomed = [
        r for r in V2.rows(Insert, "bulk") if isinstance(r.new[1], str) and "doomed" in r.new[1]
    ]
    assert doomed
    assert {r.xid for r in doomed} == {abort.subxid}
    # Stream Abort arrives between segments, never inside one.
    assert not V2.in_stream_flags[V2.messages.index(abort)]


def test_v2_payloads_and_counts() -> None:
    labels = Counter(
        str(r.new[1]).split(" ")[0] for r in V2.rows(Insert, "bulk") if isinstance(r.new[1], str)
    )
    assert (labels["row"], labels["late"]) == (600, 600)
    # Only the part of the subtransaction that overflowed the memory limit before the
    # rollback was streamed; the rest was discarded without ever being sent.
    assert 0 < labels["doomed"] < 600
    assert set(labels) == {"row", "doomed", "late"}
    (update,) = V2.rows(Update, "bulk")
    assert (update.old_kind, update.old, update.new) == ("K", ("1", None), ("-1", "row 1"))
    (delete,) = V2.rows(Delete, "bulk")
    assert (delete.old_kind, delete.old) == ("K", ("2", None))
    (truncate,) = V2.of(Truncate)
    assert truncate.relation_oids == (V2.relation("scratch").oid,)
    streamed_msg, plain_msg = V2.of(LogicalMessage)
    assert (streamed_msg.content, streamed_msg.transactional) == (b"first in stream", True)
    assert (plain_msg.content, plain_msg.transactional, plain_msg.xid) == (
        b"not transactional",
        False,
        None,
    )
    # The large transaction rolled back before decoding never shows up at all.
    assert not any(
        isinstance(r.new[1], str) and r.new[1].startswith("aborted")
        for r in V2.rows(Insert, "bulk")
    )
    # A small transaction after the stream is an ordinary Begin/Commit pair.
    assert isinstance(V2.messages[-1], Commit)
    assert V2.of(Begin)[-1].final_lsn == V2.messages[-1].commit_lsn


def test_v4_stream_abort_has_lsn_and_timestamp() -> None:
    (abort,) = V4.of(StreamAbort)
    (abort_v2,) = V2.of(StreamAbort)
    assert (abort.xid, abort.subxid) == (abort_v2.xid, abort_v2.subxid)
    lsn, xid, payload = V4.records[V4.messages.index(abort)]
    assert len(payload) == 25
    assert abort.abort_lsn == lsn
    assert xid == abort.subxid
    assert abort.abort_ts is not None
    commit_ts = V4.of(StreamCommit)[0].commit_ts
    assert 0 < commit_ts - abort.abort_ts < 60_000_000
    # Apart from Stream Abort, protocol 4 sends the same bytes as protocol 2.
    others_v2 = [m for m in V2.messages if not isinstance(m, StreamAbort)]
    others_v4 = [m for m in V4.messages if not isinstance(m, StreamAbort)]
    assert others_v2 == others_v4


# --- malformed input ----------------------------------------------------------------


def _decode_or_decode_error(data: bytes, in_stream: bool) -> None:
    try:
        decode_message(data, in_stream=in_stream)
    except DecodeError as exc:
        message = str(exc)
    else:
        return
    assert "offset" in message or "empty" in message


def test_every_truncation_of_every_captured_message_is_a_decode_error() -> None:
    for payload, in_stream in SAMPLE_PAYLOADS:
        for cut in range(len(payload)):
            if payload[0] == ord("A") and len(payload) == 25 and cut == 9:
                continue  # a v4 Stream Abort cut to 9 bytes is a valid v2 Stream Abort
            with pytest.raises(DecodeError, match=r"offset|empty"):
                decode_message(payload[:cut], in_stream=in_stream)


def test_trailing_bytes_are_a_decode_error() -> None:
    for payload, in_stream in SAMPLE_PAYLOADS:
        with pytest.raises(DecodeError, match="trailing"):
            decode_message(payload + b"\x00", in_stream=in_stream)


def test_streamed_insert_without_in_stream_is_rejected() -> None:
    payload = next(
        p for (_, _, p), f in zip(V2.records, V2.in_stream_flags, strict=True) if f and p[0] == 73
    )
    with pytest.raises(DecodeError):
        decode_message(payload)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"", "empty"),
        (b"Z", r"unknown pgoutput message type 'Z' \(0x5a\) at offset 0"),
        (b"P" + bytes(40), "unknown pgoutput message type 'P'"),  # 2PC is not requested
        (b"I\x00\x00\x40\x00X\x00\x00", "expected tuple tag 'N' at offset 5"),
        (b"I\x00\x00\x40\x00N\x00\x01x", r"unknown tuple column kind 'x' .* at offset 8"),
        (b"I\x00\x00\x40\x00N\x00\x01t\x00\x00\x00\x05abc", "text value of column 0"),
        (b"I\x00\x00\x40\x00N\x00\x01b\xff\xff\xff\xff", "binary value of column 0"),
        (b"I\x00\x00\x40\x00N\x00\x02n", r"column 1 of 2 at offset 9"),
        (b"U\x00\x00\x40\x00K\x00\x01nX\x00\x01n", "expected tuple tag 'N' at offset 9"),
        (b"U\x00\x00\x40\x00K\x00\x01n", "tuple tag at offset 9"),
        (b"D\x00\x00\x40\x00N\x00\x01n", "expected tuple tag 'K' or 'O' at offset 5"),
        (b"R\x00\x00\x40\x00s\x00t\x00x\x00\x00", "unknown replica identity 'x'"),
        (b"R\x00\x00\x40\x00s\x00t\x00d\x00\x01\x01id", "name of column 0 at offset 13"),
        (b"R\x00\x00\x40\x00s\x00t", "relation name string at offset 7"),
        (b"S\x00\x00\x00\x01\x02", "first-segment flag at offset 5 is 2"),
        (b"T\x00\x00\x00\x02\x00\x00\x00\x40\x00", r"2 relation OIDs at offset 6"),
        (b"M\x01" + bytes(8) + b"p\x00\x00\x00\x00\x09abc", r"content \(9 bytes\)"),
        (b"O" + bytes(8) + b"name", "origin name string at offset 9"),
        (b"E\x00", "1 trailing byte"),
        (b"A" + bytes(12), "trailing"),
    ],
)
def test_malformed_messages(data: bytes, pattern: str) -> None:
    with pytest.raises(DecodeError, match=pattern):
        decode_message(data)


def test_streamed_xid_truncated() -> None:
    with pytest.raises(DecodeError, match="streamed xid at offset 1"):
        decode_message(b"I\x00\x00", in_stream=True)


def test_invalid_utf8_is_replaced_not_raised() -> None:
    msg = decode_message(b"I\x00\x00\x40\x00N\x00\x01t\x00\x00\x00\x02\xc3\x28")
    assert isinstance(msg, Insert)
    assert msg.new == ("\ufffd(",)
    rel = decode_message(b"R\x00\x00\x40\x00\xff\x00t\x00d\x00\x00")
    assert isinstance(rel, Relation)
    assert rel.namespace == "\ufffd"


@given(st.binary(max_size=64), st.booleans())
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes, in_stream: bool) -> None:
    _decode_or_decode_error(data, in_stream)


@given(st.sampled_from(b"BCORYIUDTMSEcA"), st.binary(max_size=64), st.booleans())
def test_random_bodies_after_a_valid_tag(tag: int, body: bytes, in_stream: bool) -> None:
    _decode_or_decode_error(bytes([tag]) + body, in_stream)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> tuple[bytes, bool]:
    payload, in_stream = draw(st.sampled_from(SAMPLE_PAYLOADS))
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord("t"), ord("n")]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data), draw(st.one_of(st.just(in_stream), st.booleans()))


@given(mutated_payloads())
def test_mutated_captures_never_raise_anything_but_decode_error(
    case: tuple[bytes, bool],
) -> None:
    _decode_or_decode_error(*case)


# --- message types ------------------------------------------------------------------


def test_unchanged_toast_is_a_singleton() -> None:
    assert UnchangedToast() is UNCHANGED_TOAST
    assert copy.copy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert copy.deepcopy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert pickle.loads(pickle.dumps(UNCHANGED_TOAST)) is UNCHANGED_TOAST
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"
    assert UNCHANGED_TOAST is not None
    assert UNCHANGED_TOAST != ""


def test_messages_are_frozen_and_hashable() -> None:
    msg = V1.of(Update)[0]
    with pytest.raises(FrozenInstanceError):
        msg.relation_oid = 1  # type: ignore[misc]
    assert hash(msg) == hash(copy.deepcopy(msg))
    assert StreamStop() == StreamStop()


def test_timestamps() -> None:
    assert pg_timestamp_to_iso(0) == "2000-01-01T00:00:00.000000Z"
    assert pg_timestamp_to_iso(-1) == "1999-12-31T23:59:59.999999Z"
    assert pg_timestamp_to_iso(849_089_453_301_580) == "2026-11-27T10:10:53.301580Z"
    assert pg_timestamp_to_iso(-63_082_281_600_000_000) == "0001-01-01T00:00:00.000000Z"
    assert pg_timestamp_to_datetime(1_000_001) == datetime(2000, 1, 1, 0, 0, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="out of datetime range"):
        pg_timestamp_to_datetime(2**63 - 1)  # PostgreSQL's 'infinity'
    with pytest.raises(ValueError, match="out of datetime range"):
        pg_timestamp_to_iso(-(2**63))  # '-infinity'
    with pytest.raises(ValueError, match="out of datetime range"):
        pg_timestamp_to_iso(2**63 - 1)  # 'infinity'


@given(st.integers(min_value=-63_082_281_600_000_000, max_value=252_455_615_999_999_999))
def test_timestamp_text_is_datetime_isoformat(micros: int) -> None:
    # Every wire timestamp a datetime can hold (years 1 to 9999): the arithmetic
    # formatting equals datetime's own.
    expected = (
        pg_timestamp_to_datetime(micros).replace(tzinfo=None).isoformat(timespec="microseconds")
    )
    assert pg_timestamp_to_iso(micros) == expected + "Z"
