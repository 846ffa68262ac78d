"""DBLog watermarks: where a backfill chunk goes in the stream, and which of its rows.

An online backfill reads a table in keyset chunks while the slot keeps streaming. For
each chunk the backfill runner (``backfill.py``) writes a *low* watermark into the WAL
(a ``pg_logical_emit_message`` in a transaction of its own), reads the chunk in a
``REPEATABLE READ`` snapshot S, then writes a *high* watermark the same way. The reader
meets both in commit order; inside the high watermark's transaction it publishes the
chunk's rows (op ``read``), except the rows some transaction may have changed behind
the chunk's back. Those changes are in the stream with their newer state, so every key
still ends in its latest state. The rows dropped are those whose key was touched by a
transaction that S does not see but whose commit precedes the high watermark:

- any transaction committed between the watermarks (the DBLog window), and
- any transaction in S's in-progress list committed *before* the low watermark. A
  commit becomes visible a moment after its commit record is written (after the WAL
  flush, and after a synchronous standby's answer), so a snapshot taken after the low
  watermark can still miss a commit that precedes it in the WAL. Such a commit is caught
  by its xid: the reader remembers the keys each transaction touched in the backfilled
  table since the backfill began, and S lists its xid as in progress.

A transaction that committed before the backfill began but is still invisible to S
would have gone unrecorded: the chunk is read again instead (rare: it needs a commit to
stay invisible for the whole start of the backfill). So is a chunk during which the
table changed shape, or one whose stale rows cannot be named (a delete that carries
only the columns of a REPLICA IDENTITY USING INDEX other than the chunk's key).

This module is pure bookkeeping, driven by the reader (``reader.py``) and fed by the
runner; it holds no connection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from cdc_bridge.changes import Change, TableInfo

__all__ = [
    "WATERMARK_PREFIX",
    "ChunkOutcome",
    "ChunkRequest",
    "TableTracker",
    "Watermarks",
    "XidSnapshot",
    "row_key",
]

#: The logical decoding message prefix of backfill watermarks.
WATERMARK_PREFIX = "cdc_bridge.backfill"

#: How many recent commits the reader remembers (xids only), so that a backfill can
#: tell whether its first snapshot misses a commit made before it began.
RECENT_COMMITS = 1 << 16

_XID_MASK = 0xFFFFFFFF
_TRUNCATED = b"*"  # a touched "key" meaning: the whole table was truncated
# A touched row whose key columns the change does not carry (a delete under REPLICA
# IDENTITY USING INDEX of other columns): the chunk cannot tell which row it was.
_UNKNOWN = b"?"


def _xid_precedes(a: int, b: int) -> bool:
    """PostgreSQL's TransactionIdPrecedes for 32-bit xids (modulo-2^32 order)."""
    return ((a - b) & _XID_MASK) >= 0x80000000


@dataclass(frozen=True, slots=True)
class XidSnapshot:
    """A snapshot's visibility: xids before ``xmin`` are finished, ``in_progress`` are
    not visible (32-bit xids, as pgoutput sends them)."""

    xmin: int
    xmax: int
    in_progress: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> XidSnapshot:
        """From ``pg_current_snapshot()::text``: ``xmin:xmax:xip,xip,…`` (64-bit xids)."""
        xmin, xmax, xip = text.split(":")
        return cls(
            int(xmin) & _XID_MASK,
            int(xmax) & _XID_MASK,
            frozenset(int(x) & _XID_MASK for x in xip.split(",") if x),
        )


def row_key(row: dict[str, Any], columns: Sequence[str]) -> bytes:
    """The key of a row (converted values) as comparable bytes."""
    return orjson.dumps([row.get(c) for c in columns])


@dataclass(slots=True)
class ChunkOutcome:
    """What the reader did with a chunk at its high watermark."""

    high_lsn: int
    published: int
    dropped: int


@dataclass(slots=True, eq=False)
class ChunkRequest:
    """One chunk on its way: registered before the low watermark is written, filled with
    the rows and the snapshot before the high one is, resolved by the reader at the high
    watermark (None: read the chunk again)."""

    token: str
    backfill_id: str
    table: TableInfo | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    snapshot: XidSnapshot | None = None
    result: asyncio.Future[ChunkOutcome | None] | None = None


class TableTracker:
    """The reader's memory for one running backfill: the keys each transaction touched
    in the table since the backfill began, and the current chunk's window."""

    def __init__(self, oid: int, key_columns: Sequence[str], earlier_commits: set[int]) -> None:
        self.oid = oid
        self.key_columns = tuple(key_columns)
        # Commits the reader saw before the backfill began: unrecorded.
        self.earlier = earlier_commits
        self.touched: dict[int, list[bytes]] = {}  # xid → keys (since the start)
        self.window: set[int] | None = None  # xids committed since the low watermark
        self.reshaped = False  # a Relation message for the table since the last chunk

    def observe(self, change: Change) -> None:
        """A change of the tracked table (the caller checks the OID)."""
        keys = self.touched.setdefault(change.xid, [])
        if change.op == "truncate":
            keys.append(_TRUNCATED)
        else:
            columns = self.key_columns
            for row in (change.after, change.before):
                if row is not None:
                    known = all(c in row for c in columns)
                    keys.append(row_key(row, columns) if known else _UNKNOWN)
        if self.window is not None:
            self.window.add(change.xid)

    def reshape(self) -> None:
        self.reshaped = True

    def open_window(self) -> None:
        self.window = set()

    def close_window(
        self, rows: Sequence[dict[str, Any]], snapshot: XidSnapshot
    ) -> list[dict[str, Any]] | None:
        """The rows to publish at the high watermark, or None to read the chunk again."""
        window, self.window = self.window or set(), None
        reshaped, self.reshaped = self.reshaped, False
        missed = snapshot.in_progress
        if reshaped or (missed and not missed.isdisjoint(self.earlier)):
            return None
        stale_xids = window | (missed & self.touched.keys())
        stale: set[bytes] = set()
        for xid in stale_xids:
            stale.update(self.touched.get(xid, ()))
        self._forget_before(snapshot.xmin)
        if _UNKNOWN in stale:
            return None
        if _TRUNCATED in stale:
            return []
        if not stale:
            return list(rows)
        columns = self.key_columns
        return [row for row in rows if row_key(row, columns) not in stale]

    def _forget_before(self, xmin: int) -> None:
        """Transactions before ``xmin`` are visible to every later snapshot: drop them."""
        self.touched = {x: k for x, k in self.touched.items() if not _xid_precedes(x, xmin)}
        self.earlier = {x for x in self.earlier if not _xid_precedes(x, xmin)}


class Watermarks:
    """Shared by the backfill runner and the reader (same event loop, no locks)."""

    def __init__(self, slot: str) -> None:
        self.slot = slot
        self.recent_commits: deque[int] = deque(maxlen=RECENT_COMMITS)
        self.tracker: TableTracker | None = None
        # Token → what the runner waits for: a start (future of the table to track) or
        # a chunk.
        self.starts: dict[str, tuple[asyncio.Future[int], int, tuple[str, ...]]] = {}
        self.chunks: dict[str, ChunkRequest] = {}

    @staticmethod
    def content(slot: str, token: str, mark: str) -> str:
        return orjson.dumps({"slot": slot, "token": token, "mark": mark}).decode()

    def on_message(self, content: bytes, lsn: int) -> ChunkRequest | None:
        """A watermark message met in the WAL; the chunk to publish now, if one ends."""
        try:
            body = orjson.loads(content)
            slot, token, mark = body["slot"], body["token"], body["mark"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if slot != self.slot:
            return None  # another bridge's backfill on the same database
        if mark == "start":
            start = self.starts.pop(token, None)
            if start is not None:
                future, oid, key_columns = start
                self.tracker = TableTracker(oid, key_columns, set(self.recent_commits))
                if not future.done():
                    future.set_result(lsn)
            return None
        chunk = self.chunks.get(token)
        tracker = self.tracker
        if chunk is None:
            return None  # a replayed watermark of an earlier run
        if mark == "low":
            if tracker is not None:
                tracker.open_window()
            return None
        if mark == "high":
            del self.chunks[token]
            return chunk
        return None

    def select(self, chunk: ChunkRequest) -> list[dict[str, Any]] | None:
        """The rows of ``chunk`` to publish (None: read it again)."""
        tracker = self.tracker
        if tracker is None or chunk.snapshot is None or tracker.window is None:
            return None
        return tracker.close_window(chunk.rows, chunk.snapshot)

    def stop(self) -> None:
        """The backfill ended (or its runner did): stop tracking."""
        self.tracker = None
        self.starts.clear()
        for chunk in self.chunks.values():
            if chunk.result is not None and not chunk.result.done():
                chunk.result.cancel()
        self.chunks.clear()
