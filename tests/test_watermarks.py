"""The DBLog bookkeeping of online backfills (watermarks.py), without servers.

The property test models what PostgreSQL can do: transactions commit in WAL order, a
REPEATABLE READ snapshot taken after the low watermark sees every earlier commit except
a few that are not visible yet (their commit record is written, the backend has not
left the proc array), and any commit between the watermarks may or may not be visible.
Whatever the interleaving, the stream folded per key must equal the table.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_bridge.changes import Change, TableInfo
from cdc_bridge.watermarks import (
    WATERMARK_PREFIX,
    ChunkRequest,
    TableTracker,
    Watermarks,
    XidSnapshot,
    row_key,
)

TABLE = TableInfo(
    oid=4242,
    schema="public",
    table="t",
    column_names=("id", "v"),
    converters=(int, str),
    type_oids=(23, 25),
    key_names=("id",),
    identity_names=frozenset({"id"}),
    replica_identity="d",
)


def _change(xid: int, op: str, key: int, value: int | None = None) -> Change:
    after: dict[str, Any] | None = {"id": key, "v": value} if op in ("insert", "update") else None
    before: dict[str, Any] | None = {"id": key} if op == "delete" else None
    return Change(
        op=op,  # type: ignore[arg-type]
        table=TABLE,
        key={"id": key} if op != "truncate" else None,
        after=after,
        before=before,
        unchanged_toast=[],
        lsn=0,
        commit_lsn=0,
        xid=xid,
        commit_ts=0,
        index=0,
    )


def test_snapshot_text_is_parsed_to_32_bit_xids() -> None:
    snapshot = XidSnapshot.parse("4294967300:4294967310:4294967301,4294967305")
    assert snapshot == XidSnapshot(4, 14, frozenset({5, 9}))
    assert XidSnapshot.parse("747:747:") == XidSnapshot(747, 747, frozenset())


def test_rows_touched_in_the_window_are_left_out() -> None:
    tracker = TableTracker(TABLE.oid, ("id",), earlier_commits=set())
    tracker.open_window()
    tracker.observe(_change(100, "update", 2, 7))
    tracker.observe(_change(101, "delete", 3))
    rows = [{"id": i, "v": "old"} for i in range(1, 5)]
    kept = tracker.close_window(rows, XidSnapshot(100, 102, frozenset({100, 101})))
    assert kept == [{"id": 1, "v": "old"}, {"id": 4, "v": "old"}]


def test_a_commit_before_the_low_watermark_the_snapshot_missed_is_caught_by_xid() -> None:
    tracker = TableTracker(TABLE.oid, ("id",), earlier_commits=set())
    tracker.observe(_change(90, "update", 1, 5))  # committed before the low watermark …
    tracker.observe(_change(91, "update", 2, 5))  # … and seen by the snapshot
    tracker.open_window()
    rows = [{"id": 1, "v": "stale"}, {"id": 2, "v": "5"}]
    # … but the snapshot still lists xid 90 as in progress.
    assert tracker.close_window(rows, XidSnapshot(90, 95, frozenset({90}))) == [rows[1]]
    # Its xmin (90) keeps 90 and 91 known; a later xmin forgets them.
    assert set(tracker.touched) == {90, 91}
    tracker.open_window()
    tracker.close_window([], XidSnapshot(92, 95, frozenset()))
    assert tracker.touched == {}


def test_truncate_in_the_window_drops_the_whole_chunk() -> None:
    tracker = TableTracker(TABLE.oid, ("id",), earlier_commits=set())
    tracker.open_window()
    tracker.observe(_change(7, "truncate", 0))
    assert tracker.close_window([{"id": 1, "v": "x"}], XidSnapshot(7, 8, frozenset({7}))) == []


def test_a_missed_commit_older_than_the_backfill_means_reading_the_chunk_again() -> None:
    tracker = TableTracker(TABLE.oid, ("id",), earlier_commits={55, 56})
    tracker.open_window()
    assert tracker.close_window([{"id": 1, "v": "x"}], XidSnapshot(55, 60, frozenset({55}))) is None
    tracker.open_window()
    assert tracker.close_window([{"id": 1, "v": "x"}], XidSnapshot(57, 60, frozenset())) == [
        {"id": 1, "v": "x"}
    ]
    tracker.reshape()
    tracker.open_window()
    assert tracker.close_window([{"id": 1, "v": "x"}], XidSnapshot(57, 60, frozenset())) is None


def test_a_touched_row_without_the_chunks_key_columns_means_reading_the_chunk_again() -> None:
    # A delete under REPLICA IDENTITY USING INDEX carries that index's columns only.
    tracker = TableTracker(TABLE.oid, ("id",), earlier_commits=set())
    tracker.open_window()
    delete = _change(30, "delete", 1)
    assert delete.before is not None
    delete.before = {"v": "by index"}
    tracker.observe(delete)
    assert tracker.close_window([{"id": 1, "v": "x"}], XidSnapshot(30, 31, frozenset())) is None
    # Outside the window and visible to the snapshot: no doubt about the chunk.
    tracker.open_window()
    assert tracker.close_window([{"id": 1, "v": "x"}], XidSnapshot(31, 31, frozenset())) == [
        {"id": 1, "v": "x"}
    ]


def test_xids_wrap_around_when_forgetting() -> None:
    tracker = TableTracker(TABLE.oid, ("id",), earlier_commits=set())
    tracker.observe(_change(0xFFFFFFF0, "update", 1, 1))  # before the wrap
    tracker.observe(_change(5, "update", 2, 1))  # after it
    tracker.open_window()
    tracker.close_window([], XidSnapshot(3, 9, frozenset()))
    assert set(tracker.touched) == {5}


def test_watermark_messages_drive_the_tracker_only_for_their_slot_and_tokens() -> None:
    async def go() -> None:
        marks = Watermarks("slot_a")
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        marks.recent_commits.extend([11, 12])
        marks.starts["s1"] = (started, TABLE.oid, ("id",))
        # Another slot's start, and a token nobody waits for: ignored.
        assert marks.on_message(Watermarks.content("slot_b", "s1", "start").encode(), 5) is None
        assert marks.tracker is None
        assert marks.on_message(b"not json", 5) is None
        marks.on_message(Watermarks.content("slot_a", "s1", "start").encode(), 7)
        assert started.result() == 7
        assert marks.tracker is not None
        assert marks.tracker.earlier == {11, 12}
        chunk = ChunkRequest("c1", "bf", result=asyncio.get_running_loop().create_future())
        marks.chunks["c1"] = chunk
        assert marks.on_message(Watermarks.content("slot_a", "c1", "low").encode(), 8) is None
        assert marks.tracker.window == set()
        chunk.snapshot = XidSnapshot(1, 2, frozenset())
        chunk.rows = [{"id": 1, "v": "a"}]
        assert marks.on_message(Watermarks.content("slot_a", "c1", "high").encode(), 9) is chunk
        assert marks.select(chunk) == [{"id": 1, "v": "a"}]
        # A replay of the same watermarks finds nothing waiting.
        assert marks.on_message(Watermarks.content("slot_a", "c1", "high").encode(), 9) is None
        pending = ChunkRequest("c2", "bf", result=asyncio.get_running_loop().create_future())
        marks.chunks["c2"] = pending
        marks.stop()
        assert marks.tracker is None
        assert pending.result is not None
        assert pending.result.cancelled()

    asyncio.run(go())
    assert WATERMARK_PREFIX == "cdc_bridge.backfill"


# --------------------------------------------------------------------------- the model

_Write = tuple[int, int | None]  # (key, new value or None: delete); key -1: truncate


@st.composite
def _histories(draw: Any) -> dict[str, Any]:
    keys = draw(st.integers(1, 6))
    initial = {k: 0 for k in range(keys) if draw(st.booleans())}
    count = draw(st.integers(0, 12))
    transactions: list[list[_Write]] = []
    for _ in range(count):
        if draw(st.integers(0, 20)) == 0:
            transactions.append([(-1, None)])
            continue
        writes = draw(
            st.lists(
                st.tuples(st.integers(0, keys - 1), st.one_of(st.none(), st.integers(1, 99))),
                min_size=1,
                max_size=3,
            )
        )
        transactions.append(writes)
    xids = draw(st.lists(st.integers(1, 2**32 - 1), min_size=count, max_size=count, unique=True))
    start = draw(st.integers(0, count))
    low = draw(st.integers(start, count))
    high = draw(st.integers(low, count))
    # Visible to the chunk's snapshot: before the low watermark unless "late", in the
    # window at random, never after the high watermark.
    visible = [i < low or (i < high and draw(st.booleans())) for i in range(count)]
    if count:
        for late in draw(st.sets(st.integers(0, count - 1), max_size=2)):
            if late < low:
                visible[late] = False
    # A commit that overwrote a row waited for the previous writer to finish: when it
    # is visible, so is every earlier commit touching the same keys (or truncating).
    for later in range(count - 1, -1, -1):
        if not visible[later]:
            continue
        touched = {k for k, _ in transactions[later]}
        for earlier in range(later):
            theirs = {k for k, _ in transactions[earlier]}
            if touched & theirs or -1 in touched or -1 in theirs:
                visible[earlier] = True
    # An invisible commit after the low watermark may come from a transaction that
    # began after the snapshot: its xid is past the snapshot's xmax, not in its list.
    began_after = [not visible[i] and i >= low and draw(st.booleans()) for i in range(count)]
    xmax = max((x for x, late in zip(xids, began_after, strict=True) if not late), default=0) + 1
    xids = [
        xmax + n if late else x for n, (x, late) in enumerate(zip(xids, began_after, strict=True))
    ]
    in_progress = frozenset(
        x
        for x, shown, late in zip(xids, visible, began_after, strict=True)
        if not shown and not late
    )
    return {
        "snapshot": XidSnapshot(min(in_progress, default=xmax), xmax, in_progress),
        "initial": initial,
        "transactions": transactions,
        "xids": xids,
        "start": start,
        "low": low,
        "high": high,
        "visible": visible,
    }


def _apply(state: dict[int, int], writes: list[_Write]) -> None:
    for key, value in writes:
        if key == -1:
            state.clear()
        elif value is None:
            state.pop(key, None)
        else:
            state[key] = value


@settings(max_examples=400, deadline=None)
@given(_histories())
def test_a_chunk_folded_into_the_stream_always_ends_in_the_tables_state(
    history: dict[str, Any],
) -> None:
    initial: dict[int, int] = history["initial"]
    transactions: list[list[_Write]] = history["transactions"]
    xids: list[int] = history["xids"]
    start, low, high = history["start"], history["low"], history["high"]
    visible: list[bool] = history["visible"]

    # The chunk: the whole table as the snapshot sees it.
    seen = dict(initial)
    for writes, shown in zip(transactions, visible, strict=True):
        if shown:
            _apply(seen, writes)
    rows = [{"id": k, "v": str(v)} for k, v in sorted(seen.items())]
    snapshot: XidSnapshot = history["snapshot"]

    # The stream as a consumer folds it; the reader meets the watermarks in order.
    stream = {k: str(v) for k, v in initial.items()}  # everything before is in it
    table = dict(initial)
    tracker: TableTracker | None = None
    outcome: list[dict[str, Any]] | None = None
    for position in range(len(transactions) + 1):
        if position == start:
            tracker = TableTracker(TABLE.oid, ("id",), set(xids[:start]))
        if position == low:
            assert tracker is not None
            tracker.open_window()
        if position == high:
            assert tracker is not None
            outcome = tracker.close_window(rows, snapshot)
            for row in outcome or []:
                stream[row["id"]] = row["v"]
        if position == len(transactions):
            break
        writes, xid = transactions[position], xids[position]
        _apply(table, writes)
        for key, value in writes:
            if key == -1:
                stream.clear()
                change = _change(xid, "truncate", 0)
            elif value is None:
                stream.pop(key, None)
                change = _change(xid, "delete", key)
            else:
                stream[key] = str(value)
                change = _change(xid, "update", key, value)
            if tracker is not None:
                tracker.observe(change)

    if outcome is None:
        # Only when the snapshot missed a commit made before the backfill began.
        assert snapshot.in_progress & set(xids[:start])
        return
    assert stream == {k: str(v) for k, v in table.items()}
    # Only what the snapshot read is published, in key order.
    assert [orjson.loads(row_key(r, ("id",)))[0] for r in outcome] == sorted(
        r["id"] for r in outcome
    )
