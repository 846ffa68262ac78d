"""Replication CopyBoth frames: hand-built layouts, captured walsender frames, fuzzing."""

from __future__ import annotations

import contextlib
import struct
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_bridge.errors import DecodeError
from cdc_bridge.pgoutput import (
    PG_EPOCH_UNIX_MICROS,
    Begin,
    Commit,
    Insert,
    PgOutputMessage,
    PrimaryKeepalive,
    Relation,
    StreamAbort,
    StreamStart,
    StreamStop,
    XLogData,
    decode_message,
    encode_standby_status,
    parse_copy_frame,
    pg_now_micros,
    pg_timestamp_to_datetime,
)

from .capture import load_frames

U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)

FRAMES = load_frames()


def _be(value: int, size: int = 8, *, signed: bool = False) -> bytes:
    return value.to_bytes(size, "big", signed=signed)


# --- Standby status update ----------------------------------------------------------


def test_standby_status_layout() -> None:
    frame = encode_standby_status(
        write_lsn=0x16_B374_D848,
        flush_lsn=0x16_B374_D800,
        apply_lsn=0x16_B374_0000,
        now_micros=849_089_453_301_580,
    )
    assert frame == (
        b"r"
        + _be(0x16_B374_D848)
        + _be(0x16_B374_D800)
        + _be(0x16_B374_0000)
        + _be(849_089_453_301_580)
        + b"\x00"
    )
    assert len(frame) == 34


def test_standby_status_reply_requested_and_extremes() -> None:
    frame = encode_standby_status(
        write_lsn=2**64 - 1, flush_lsn=0, apply_lsn=1, now_micros=-1, reply_requested=True
    )
    assert frame == b"r" + b"\xff" * 8 + bytes(8) + _be(1) + b"\xff" * 8 + b"\x01"


@pytest.mark.parametrize(
    ("write", "flush", "now"),
    [(-1, 0, 0), (0, 2**64, 0), (0, 0, 2**63)],
)
def test_standby_status_rejects_out_of_range(write: int, flush: int, now: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_standby_status(write_lsn=write, flush_lsn=flush, apply_lsn=0, now_micros=now)


@given(U64, U64, U64, I64, st.booleans())
def test_standby_status_round_trips_through_struct(
    write: int, flush: int, apply: int, now: int, reply: bool
) -> None:
    frame = encode_standby_status(
        write_lsn=write, flush_lsn=flush, apply_lsn=apply, now_micros=now, reply_requested=reply
    )
    assert struct.unpack("!cQQQqB", frame) == (b"r", write, flush, apply, now, int(reply))


# --- parsing server frames ----------------------------------------------------------


def test_xlogdata_hand_built() -> None:
    payload = b"E"
    frame = b"w" + _be(0x1_0000_0001) + _be(0x2_0000_0000) + _be(-5, signed=True) + payload
    assert parse_copy_frame(frame) == XLogData(0x1_0000_0001, 0x2_0000_0000, -5, b"E")


def test_xlogdata_from_memoryview_keeps_a_view() -> None:
    frame = bytearray(b"w" + bytes(24) + b"payload")
    parsed = parse_copy_frame(memoryview(frame))
    assert isinstance(parsed, XLogData)
    assert isinstance(parsed.payload, memoryview)
    assert bytes(parsed.payload) == b"payload"
    frame[-1] = ord("!")  # no copy was taken
    assert bytes(parsed.payload) == b"payloa!"


def test_xlogdata_with_empty_payload_is_a_frame_but_not_a_message() -> None:
    parsed = parse_copy_frame(b"w" + bytes(24))
    assert isinstance(parsed, XLogData)
    assert parsed.payload == b""
    with pytest.raises(DecodeError, match="empty"):
        decode_message(parsed.payload)


@pytest.mark.parametrize("reply", [False, True])
def test_keepalive_hand_built(reply: bool) -> None:
    frame = b"k" + _be(0xABCDEF) + _be(123_456) + bytes([reply])
    assert parse_copy_frame(frame) == PrimaryKeepalive(0xABCDEF, 123_456, reply)


@pytest.mark.parametrize(
    ("frame", "pattern"),
    [
        (b"", "empty replication frame"),
        (b"w" + bytes(23), "truncated XLogData frame: header needs 25 bytes"),
        (b"k" + bytes(16), r"must be 18 bytes, got 17 \(truncated at offset 17\)"),
        (b"k" + bytes(18), r"must be 18 bytes, got 19 \(trailing bytes at offset 18\)"),
        (b"k" + bytes(16) + b"\x02", "reply-requested flag at offset 17 is 2"),
        (b"r" + bytes(33), r"unknown replication frame type 'r' \(0x72\) at offset 0"),
        (b"d" + bytes(30), "unknown replication frame type 'd'"),
    ],
)
def test_bad_frames(frame: bytes, pattern: str) -> None:
    with pytest.raises(DecodeError, match=pattern):
        parse_copy_frame(frame)


@given(U64, U64, I64, st.binary(max_size=32))
def test_xlogdata_round_trip(start: int, end: int, sent: int, payload: bytes) -> None:
    frame = struct.pack("!cQQq", b"w", start, end, sent) + payload
    assert parse_copy_frame(frame) == XLogData(start, end, sent, payload)
    assert parse_copy_frame(memoryview(frame)) == XLogData(start, end, sent, payload)


@given(U64, I64, st.booleans())
def test_keepalive_round_trip(end: int, sent: int, reply: bool) -> None:
    frame = struct.pack("!cQqB", b"k", end, sent, reply)
    assert parse_copy_frame(frame) == PrimaryKeepalive(end, sent, reply)


@given(st.binary(max_size=40))
def test_random_frames_never_raise_anything_but_decode_error(frame: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parse_copy_frame(frame)


# --- frames captured from a real walsender ------------------------------------------


def _decode_captured() -> list[tuple[XLogData | PrimaryKeepalive, PgOutputMessage | None]]:
    out: list[tuple[XLogData | PrimaryKeepalive, PgOutputMessage | None]] = []
    in_stream = False
    for raw in FRAMES:
        frame = parse_copy_frame(raw)
        msg = None
        if isinstance(frame, XLogData):
            msg = decode_message(frame.payload, in_stream=in_stream)
            if isinstance(msg, StreamStart):
                in_stream = True
            elif isinstance(msg, StreamStop):
                in_stream = False
        out.append((frame, msg))
    return out


CAPTURED = _decode_captured()


def test_captured_frames_decode() -> None:
    kinds = [type(m).__name__ for _, m in CAPTURED if m is not None]
    assert kinds[:4] == ["Begin", "Relation", "Insert", "Commit"]
    assert kinds[-1] == "StreamAbort"
    assert "StreamStart" in kinds
    assert "StreamStop" in kinds
    assert any(isinstance(f, PrimaryKeepalive) for f, _ in CAPTURED)


def test_captured_top_level_stream_abort() -> None:
    start = next(m for _, m in CAPTURED if isinstance(m, StreamStart))
    abort = next(m for _, m in CAPTURED if isinstance(m, StreamAbort))
    # A whole streamed transaction rolled back: subxid repeats the top-level xid.
    assert abort == StreamAbort(start.xid, start.xid, None, None)
    inserts = [m for _, m in CAPTURED if isinstance(m, Insert)]
    assert {m.xid for m in inserts[1:]} == {start.xid}


def test_captured_xlogdata_positions() -> None:
    begin_frame, begin = next((f, m) for f, m in CAPTURED if isinstance(m, Begin))
    commit_frame, commit = next((f, m) for f, m in CAPTURED if isinstance(m, Commit))
    assert isinstance(begin, Begin)
    assert isinstance(commit, Commit)
    assert isinstance(commit_frame, XLogData)
    assert isinstance(begin_frame, XLogData)
    # pgoutput frames carry the same LSN as start and end, and a Commit frame carries
    # the end of the commit record: the position to confirm once it is published.
    assert commit_frame.wal_start == commit_frame.wal_end == commit.end_lsn
    assert begin_frame.wal_start <= begin.final_lsn
    # Relation messages are written outside any WAL record: their frames say 0/0,
    # so a frame's wal_start must never be taken as progress on its own.
    for frame, msg in CAPTURED:
        if isinstance(msg, Relation):
            assert isinstance(frame, XLogData)
            assert (frame.wal_start, frame.wal_end) == (0, 0)


def test_captured_clocks_and_keepalives() -> None:
    send_times = [f.send_time for f, _ in CAPTURED]
    assert send_times == sorted(send_times)
    assert pg_timestamp_to_datetime(send_times[0]) > datetime(2025, 1, 1, tzinfo=UTC)
    keepalive_ends = [f.wal_end for f, _ in CAPTURED if isinstance(f, PrimaryKeepalive)]
    assert keepalive_ends == sorted(keepalive_ends)
    last_data = max(f.wal_end for f, _ in CAPTURED if isinstance(f, XLogData))
    assert keepalive_ends[-1] >= last_data


# --- clock --------------------------------------------------------------------------


def test_pg_now_micros() -> None:
    before = time.time_ns() // 1000 - PG_EPOCH_UNIX_MICROS
    now = pg_now_micros()
    after = time.time_ns() // 1000 - PG_EPOCH_UNIX_MICROS
    assert before <= now <= after
    delta = pg_timestamp_to_datetime(now) - datetime.now(UTC)
    assert abs(delta.total_seconds()) < 5
