"""The CopyBoth frames of the streaming replication protocol, without the socket.

Once ``START_REPLICATION`` is running, every CopyData message from the server is either
an XLogData frame (wrapping one pgoutput message) or a Primary Keepalive, and the client
answers with Standby Status Updates. Those envelopes are a different layer from the
pgoutput payload inside them: they are framed by the walsender, not by the output
plugin, and they are where the bridge reports how far it has durably published. Keeping
them pure here lets the acknowledgement bytes be tested exactly, with no server.

Layout reference: PostgreSQL manual, Frontend/Backend Protocol chapter, section
"Streaming Replication Protocol", under ``START_REPLICATION`` (XLogData, Primary
keepalive message, Standby status update).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from cdc_bridge.errors import DecodeError
from cdc_bridge.pgoutput.messages import PG_EPOCH_UNIX_MICROS

__all__ = [
    "PrimaryKeepalive",
    "XLogData",
    "encode_standby_status",
    "parse_copy_frame",
    "pg_now_micros",
]

# "Streaming Replication Protocol" → START_REPLICATION → XLogData (B):
# Byte1('w'), Int64 start of WAL data, Int64 current end of WAL on the server,
# Int64 server clock at transmission; then the payload (one pgoutput message).
_XLOGDATA_HEADER = struct.Struct("!cQQq")

# "Streaming Replication Protocol" → START_REPLICATION → Primary keepalive message (B):
# Byte1('k'), Int64 current end of WAL, Int64 server clock, Byte1 reply requested (1/0).
_PRIMARY_KEEPALIVE = struct.Struct("!cQqB")

# "Streaming Replication Protocol" → START_REPLICATION → Standby status update (F):
# Byte1('r'), Int64 last WAL byte + 1 written, ... flushed, ... applied,
# Int64 client clock, Byte1 reply requested (1/0).
_STANDBY_STATUS = struct.Struct("!cQQQqB")

_XLOGDATA_TAG = ord("w")
_KEEPALIVE_TAG = ord("k")


# Frames are not frozen, unlike the pgoutput messages: one is made per WAL record and
# a frozen dataclass costs three times as much to build (0.6 against 0.2 µs).
@dataclass(slots=True)
class XLogData:
    wal_start: int
    wal_end: int
    send_time: int
    """Server clock, microseconds since 2000-01-01 UTC."""
    payload: bytes | memoryview
    """The pgoutput message; a memoryview when the frame was one (no copy)."""


@dataclass(slots=True)
class PrimaryKeepalive:
    wal_end: int
    send_time: int
    """Server clock, microseconds since 2000-01-01 UTC."""
    reply_requested: bool


def parse_copy_frame(data: bytes | memoryview) -> XLogData | PrimaryKeepalive:
    """Parse one CopyData payload received during ``START_REPLICATION``.

    Raises :class:`DecodeError` for an empty, truncated, oversized or unknown frame.
    """
    if not data:
        raise DecodeError("empty replication frame")
    tag = data[0]
    if tag == _XLOGDATA_TAG:
        size = _XLOGDATA_HEADER.size
        if len(data) < size:
            raise DecodeError(
                f"truncated XLogData frame: header needs {size} bytes from offset 0, "
                f"got {len(data)}"
            )
        _, wal_start, wal_end, send_time = _XLOGDATA_HEADER.unpack_from(data, 0)
        return XLogData(wal_start, wal_end, send_time, data[size:])
    if tag == _KEEPALIVE_TAG:
        size = _PRIMARY_KEEPALIVE.size
        if len(data) != size:
            raise DecodeError(
                f"Primary keepalive frame must be {size} bytes, got {len(data)} "
                f"({'truncated' if len(data) < size else 'trailing bytes'} at offset "
                f"{min(len(data), size)})"
            )
        _, wal_end, send_time, reply = _PRIMARY_KEEPALIVE.unpack_from(data, 0)
        if reply > 1:
            raise DecodeError(
                f"Primary keepalive frame: reply-requested flag at offset 17 is {reply}, "
                "expected 0 or 1"
            )
        return PrimaryKeepalive(wal_end, send_time, reply == 1)
    raise DecodeError(f"unknown replication frame type {chr(tag)!r} (0x{tag:02x}) at offset 0")


def encode_standby_status(
    *,
    write_lsn: int,
    flush_lsn: int,
    apply_lsn: int,
    now_micros: int,
    reply_requested: bool = False,
) -> bytes:
    """Build a Standby Status Update (``'r'``) frame to send as CopyData.

    ``flush_lsn`` is what the server may discard WAL up to and what
    ``confirmed_flush_lsn`` of the slot advances to. Raises ``ValueError`` for LSNs
    outside ``0..2**64-1`` or a clock outside the signed 64-bit range.
    """
    try:
        return _STANDBY_STATUS.pack(
            b"r", write_lsn, flush_lsn, apply_lsn, now_micros, 1 if reply_requested else 0
        )
    except struct.error as exc:
        raise ValueError(
            f"standby status out of range (write={write_lsn}, flush={flush_lsn}, "
            f"apply={apply_lsn}, now={now_micros}): {exc}"
        ) from None


def pg_now_micros() -> int:
    """The current time as microseconds since 2000-01-01 UTC, the protocol's clock."""
    return time.time_ns() // 1000 - PG_EPOCH_UNIX_MICROS
