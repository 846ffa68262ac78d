"""Bytes → :mod:`cdc_bridge.pgoutput.messages`: the pgoutput wire decoder.

One function, :func:`decode_message`, turns the payload of a single XLogData frame into
a typed message. It is pure and stateless so it can be tested byte-for-byte against
captured server output and driven by property tests without a database; the caller
(the replication reader) owns the only piece of state the format needs, namely whether
it is between Stream Start and Stream Stop.

Layout reference: PostgreSQL manual, Frontend/Backend Protocol chapter, section "Logical
Replication Message Formats". Protocol versions 1 and 2 are covered, plus the optional
version 4 tail of Stream Abort. Two-phase messages (version 3) are rejected, since the
bridge never asks for them.

This is the hot path, so it uses precompiled :class:`struct.Struct` objects, reads at
explicit offsets, and leans on Python's zero-cost ``try`` to turn short reads into
:class:`DecodeError` instead of checking lengths before every field.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from cdc_bridge.errors import DecodeError
from cdc_bridge.pgoutput.messages import (
    UNCHANGED_TOAST,
    Begin,
    Column,
    ColumnValue,
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
    TupleData,
    Type,
    Update,
)

__all__ = ["decode_message"]

# Field layouts, network byte order. LSNs are unsigned, timestamps signed, OIDs and
# xids unsigned 32-bit; the type modifier is the one signed Int32 (-1 = none).
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")  # final LSN, commit timestamp, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit timestamp
_REL_TAIL = struct.Struct("!BH")  # replica identity, column count
_COLUMN_TAIL = struct.Struct("!Ii")  # type OID, type modifier
_TRUNCATE_HEAD = struct.Struct("!IB")  # relation count, options
_MESSAGE_HEAD = struct.Struct("!BQ")  # flags, LSN
_STREAM_START = struct.Struct("!IB")  # xid, first-segment flag
_STREAM_COMMIT = struct.Struct("!IBQQq")  # xid, flags, commit LSN, end LSN, timestamp
_STREAM_ABORT = struct.Struct("!II")  # xid, subxact xid
_STREAM_ABORT_V4 = struct.Struct("!IIQq")  # ... + abort LSN, abort timestamp

_KIND_TEXT = 0x74  # 't'
_KIND_NULL = 0x6E  # 'n'
_KIND_UNCHANGED = 0x75  # 'u'
_KIND_BINARY = 0x62  # 'b'
_TUPLE_NEW = 0x4E  # 'N'
_TUPLE_KEY = 0x4B  # 'K'
_TUPLE_OLD = 0x4F  # 'O'

_REPLICA_IDENTITIES = {ord(c): c for c in "dnfi"}

_STREAM_STOP = StreamStop()

_Handler = Callable[[bytes, bool], PgOutputMessage]


def decode_message(data: bytes | memoryview, *, in_stream: bool = False) -> PgOutputMessage:
    """Decode one pgoutput message (the payload of one XLogData frame).

    ``in_stream`` must be true between Stream Start and Stream Stop: there, Insert,
    Update, Delete, Truncate, Relation, Type and Message carry a leading xid, which
    ends up in the message's ``xid`` field. It changes nothing else; checking the
    order of stream messages is the caller's job.

    Raises :class:`DecodeError` for empty, unknown, truncated or otherwise malformed
    input and for trailing bytes after a complete message. Text is decoded as UTF-8
    with replacement characters rather than rejected: a value the server did send must
    never wedge the slot.
    """
    if type(data) is not bytes:
        # One copy buys bytes.find and cheap slicing for everything below.
        data = bytes(data)
    if not data:
        raise DecodeError("empty pgoutput message")
    handler = _HANDLERS.get(data[0])
    if handler is None:
        raise DecodeError(
            f"unknown pgoutput message type {chr(data[0])!r} (0x{data[0]:02x}) at offset 0"
        )
    return handler(data, in_stream)


def _truncated(what: str, field: str, pos: int, data: bytes) -> DecodeError:
    return DecodeError(
        f"truncated {what} message: {field} at offset {pos} runs past the end ({len(data)} bytes)"
    )


def _check_end(what: str, pos: int, data: bytes) -> None:
    if pos != len(data):
        raise DecodeError(
            f"{what} message has {len(data) - pos} trailing byte(s) at offset {pos} "
            f"(expected {pos} bytes, got {len(data)})"
        )


def _read_xid(data: bytes, in_stream: bool, what: str) -> tuple[int | None, int]:
    if not in_stream:
        return None, 1
    try:
        return _U32.unpack_from(data, 1)[0], 5
    except struct.error:
        raise _truncated(what, "streamed xid", 1, data) from None


def _read_str(data: bytes, pos: int, what: str, field: str) -> tuple[str, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        raise DecodeError(f"{what} message: {field} string at offset {pos} has no NUL terminator")
    return data[pos:end].decode("utf-8", "replace"), end + 1


def _read_tuple(data: bytes, pos: int, what: str) -> tuple[TupleData, int]:
    """Read TupleData at ``pos``; return the values and the offset just past them."""
    n = len(data)
    try:
        (ncols,) = _U16.unpack_from(data, pos)
    except struct.error:
        raise _truncated(what, "tuple column count", pos, data) from None
    pos += 2
    values: list[ColumnValue] = []
    append = values.append
    col = 0
    try:
        for col in range(ncols):
            kind = data[pos]
            if kind == _KIND_TEXT:
                (length,) = _U32.unpack_from(data, pos + 1)
                start = pos + 5
                end = start + length
                if end > n:
                    raise _truncated(
                        what, f"text value of column {col} ({length} bytes)", start, data
                    )
                append(data[start:end].decode("utf-8", "replace"))
                pos = end
            elif kind == _KIND_NULL:
                append(None)
                pos += 1
            elif kind == _KIND_UNCHANGED:
                append(UNCHANGED_TOAST)
                pos += 1
            elif kind == _KIND_BINARY:
                (length,) = _U32.unpack_from(data, pos + 1)
                start = pos + 5
                end = start + length
                if end > n:
                    raise _truncated(
                        what, f"binary value of column {col} ({length} bytes)", start, data
                    )
                append(data[start:end])
                pos = end
            else:
                raise DecodeError(
                    f"{what} message: unknown tuple column kind {chr(kind)!r} (0x{kind:02x}) "
                    f"for column {col} at offset {pos}"
                )
    except (IndexError, struct.error):
        # pos still points at the column whose header could not be read.
        raise _truncated(what, f"column {col} of {ncols}", pos, data) from None
    return tuple(values), pos


def _read_tuple_tag(data: bytes, pos: int, what: str) -> int:
    try:
        return data[pos]
    except IndexError:
        raise _truncated(what, "tuple tag", pos, data) from None


def _decode_begin(data: bytes, in_stream: bool) -> Begin:
    try:
        final_lsn, commit_ts, xid = _BEGIN.unpack_from(data, 1)
    except struct.error:
        raise _truncated("Begin", "header", 1, data) from None
    _check_end("Begin", 1 + _BEGIN.size, data)
    return Begin(final_lsn, commit_ts, xid)


def _decode_commit(data: bytes, in_stream: bool) -> Commit:
    try:
        flags, commit_lsn, end_lsn, commit_ts = _COMMIT.unpack_from(data, 1)
    except struct.error:
        raise _truncated("Commit", "header", 1, data) from None
    _check_end("Commit", 1 + _COMMIT.size, data)
    return Commit(flags, commit_lsn, end_lsn, commit_ts)


def _decode_origin(data: bytes, in_stream: bool) -> Origin:
    try:
        (commit_lsn,) = _U64.unpack_from(data, 1)
    except struct.error:
        raise _truncated("Origin", "commit LSN", 1, data) from None
    name, pos = _read_str(data, 9, "Origin", "origin name")
    _check_end("Origin", pos, data)
    return Origin(commit_lsn, name)


def _decode_relation(data: bytes, in_stream: bool) -> Relation:
    xid, pos = _read_xid(data, in_stream, "Relation")
    try:
        (oid,) = _U32.unpack_from(data, pos)
    except struct.error:
        raise _truncated("Relation", "relation OID", pos, data) from None
    namespace, pos = _read_str(data, pos + 4, "Relation", "namespace")
    name, pos = _read_str(data, pos, "Relation", "relation name")
    try:
        ident_code, ncols = _REL_TAIL.unpack_from(data, pos)
    except struct.error:
        raise _truncated("Relation", "replica identity and column count", pos, data) from None
    replica_identity = _REPLICA_IDENTITIES.get(ident_code)
    if replica_identity is None:
        raise DecodeError(
            f"Relation message: unknown replica identity {chr(ident_code)!r} "
            f"(0x{ident_code:02x}) at offset {pos}"
        )
    pos += _REL_TAIL.size
    columns = []
    find = data.find
    for col in range(ncols):
        if pos >= len(data):
            raise _truncated("Relation", f"column {col} of {ncols}", pos, data)
        flags = data[pos]
        end = find(b"\0", pos + 1)
        if end < 0:
            raise DecodeError(
                f"Relation message: name of column {col} at offset {pos + 1} has no NUL terminator"
            )
        col_name = data[pos + 1 : end].decode("utf-8", "replace")
        try:
            type_oid, type_modifier = _COLUMN_TAIL.unpack_from(data, end + 1)
        except struct.error:
            raise _truncated("Relation", f"type of column {col}", end + 1, data) from None
        columns.append(Column(flags, col_name, type_oid, type_modifier))
        pos = end + 1 + _COLUMN_TAIL.size
    _check_end("Relation", pos, data)
    return Relation(oid, namespace, name, replica_identity, tuple(columns), xid)


def _decode_type(data: bytes, in_stream: bool) -> Type:
    xid, pos = _read_xid(data, in_stream, "Type")
    try:
        (oid,) = _U32.unpack_from(data, pos)
    except struct.error:
        raise _truncated("Type", "type OID", pos, data) from None
    namespace, pos = _read_str(data, pos + 4, "Type", "namespace")
    name, pos = _read_str(data, pos, "Type", "type name")
    _check_end("Type", pos, data)
    return Type(oid, namespace, name, xid)


def _decode_insert(data: bytes, in_stream: bool) -> Insert:
    if in_stream:
        xid, pos = _read_xid(data, in_stream, "Insert")
    else:
        xid, pos = None, 1
    try:
        (relation_oid,) = _U32.unpack_from(data, pos)
        tag = data[pos + 4]
    except (struct.error, IndexError):
        raise _truncated("Insert", "relation OID and tuple tag", pos, data) from None
    if tag != _TUPLE_NEW:
        raise DecodeError(
            f"Insert message: expected tuple tag 'N' at offset {pos + 4}, got {chr(tag)!r}"
        )
    new, pos = _read_tuple(data, pos + 5, "Insert")
    _check_end("Insert", pos, data)
    return Insert(relation_oid, new, xid)


def _decode_update(data: bytes, in_stream: bool) -> Update:
    if in_stream:
        xid, pos = _read_xid(data, in_stream, "Update")
    else:
        xid, pos = None, 1
    try:
        (relation_oid,) = _U32.unpack_from(data, pos)
        tag = data[pos + 4]
    except (struct.error, IndexError):
        raise _truncated("Update", "relation OID and tuple tag", pos, data) from None
    pos += 5
    old: TupleData | None = None
    old_kind: str | None = None
    if tag in (_TUPLE_KEY, _TUPLE_OLD):
        old_kind = "K" if tag == _TUPLE_KEY else "O"
        old, pos = _read_tuple(data, pos, "Update")
        tag = _read_tuple_tag(data, pos, "Update")
        pos += 1
    if tag != _TUPLE_NEW:
        raise DecodeError(
            f"Update message: expected tuple tag 'N' at offset {pos - 1}, got {chr(tag)!r}"
        )
    new, pos = _read_tuple(data, pos, "Update")
    _check_end("Update", pos, data)
    return Update(relation_oid, new, old, old_kind, xid)


def _decode_delete(data: bytes, in_stream: bool) -> Delete:
    if in_stream:
        xid, pos = _read_xid(data, in_stream, "Delete")
    else:
        xid, pos = None, 1
    try:
        (relation_oid,) = _U32.unpack_from(data, pos)
        tag = data[pos + 4]
    except (struct.error, IndexError):
        raise _truncated("Delete", "relation OID and tuple tag", pos, data) from None
    if tag == _TUPLE_KEY:
        old_kind = "K"
    elif tag == _TUPLE_OLD:
        old_kind = "O"
    else:
        raise DecodeError(
            f"Delete message: expected tuple tag 'K' or 'O' at offset {pos + 4}, got {chr(tag)!r}"
        )
    old, pos = _read_tuple(data, pos + 5, "Delete")
    _check_end("Delete", pos, data)
    return Delete(relation_oid, old, old_kind, xid)


def _decode_truncate(data: bytes, in_stream: bool) -> Truncate:
    xid, pos = _read_xid(data, in_stream, "Truncate")
    try:
        nrels, options = _TRUNCATE_HEAD.unpack_from(data, pos)
    except struct.error:
        raise _truncated("Truncate", "relation count and options", pos, data) from None
    pos += _TRUNCATE_HEAD.size
    end = pos + 4 * nrels
    if end > len(data):
        raise _truncated("Truncate", f"{nrels} relation OIDs", pos, data)
    _check_end("Truncate", end, data)
    oids = struct.unpack_from(f"!{nrels}I", data, pos)
    return Truncate(options, oids, xid)


def _decode_message(data: bytes, in_stream: bool) -> LogicalMessage:
    xid, pos = _read_xid(data, in_stream, "Message")
    try:
        flags, lsn = _MESSAGE_HEAD.unpack_from(data, pos)
    except struct.error:
        raise _truncated("Message", "flags and LSN", pos, data) from None
    prefix, pos = _read_str(data, pos + _MESSAGE_HEAD.size, "Message", "prefix")
    try:
        (length,) = _U32.unpack_from(data, pos)
    except struct.error:
        raise _truncated("Message", "content length", pos, data) from None
    pos += 4
    end = pos + length
    if end > len(data):
        raise _truncated("Message", f"content ({length} bytes)", pos, data)
    _check_end("Message", end, data)
    return LogicalMessage(flags, lsn, prefix, data[pos:end], xid)


def _decode_stream_start(data: bytes, in_stream: bool) -> StreamStart:
    try:
        xid, first_segment = _STREAM_START.unpack_from(data, 1)
    except struct.error:
        raise _truncated("Stream Start", "header", 1, data) from None
    if first_segment > 1:
        raise DecodeError(
            f"Stream Start message: first-segment flag at offset 5 is {first_segment}, "
            "expected 0 or 1"
        )
    _check_end("Stream Start", 1 + _STREAM_START.size, data)
    return StreamStart(xid, first_segment == 1)


def _decode_stream_stop(data: bytes, in_stream: bool) -> StreamStop:
    _check_end("Stream Stop", 1, data)
    return _STREAM_STOP


def _decode_stream_commit(data: bytes, in_stream: bool) -> StreamCommit:
    try:
        xid, flags, commit_lsn, end_lsn, commit_ts = _STREAM_COMMIT.unpack_from(data, 1)
    except struct.error:
        raise _truncated("Stream Commit", "header", 1, data) from None
    _check_end("Stream Commit", 1 + _STREAM_COMMIT.size, data)
    return StreamCommit(xid, flags, commit_lsn, end_lsn, commit_ts)


def _decode_stream_abort(data: bytes, in_stream: bool) -> StreamAbort:
    # The abort LSN and timestamp exist only with protocol 4 + streaming=parallel, and
    # the message carries no flag saying so: its length is the only signal.
    if len(data) == 1 + _STREAM_ABORT_V4.size:
        xid, subxid, abort_lsn, abort_ts = _STREAM_ABORT_V4.unpack_from(data, 1)
        return StreamAbort(xid, subxid, abort_lsn, abort_ts)
    try:
        xid, subxid = _STREAM_ABORT.unpack_from(data, 1)
    except struct.error:
        raise _truncated("Stream Abort", "header", 1, data) from None
    _check_end("Stream Abort", 1 + _STREAM_ABORT.size, data)
    return StreamAbort(xid, subxid, None, None)


_HANDLERS: dict[int, _Handler] = {
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("O"): _decode_origin,
    ord("R"): _decode_relation,
    ord("Y"): _decode_type,
    ord("I"): _decode_insert,
    ord("U"): _decode_update,
    ord("D"): _decode_delete,
    ord("T"): _decode_truncate,
    ord("M"): _decode_message,
    ord("S"): _decode_stream_start,
    ord("E"): _decode_stream_stop,
    ord("c"): _decode_stream_commit,
    ord("A"): _decode_stream_abort,
}
