"""The fault-test harness itself: the stream/history comparator and the workload.

The comparator tests are pure; the workload test runs against a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.bridge import StreamedMessage
from tests.fixtures.workload import (
    Comparison,
    Event,
    HistoryRow,
    Workload,
    compare_stream_with_history,
    create_workload_table,
    read_history,
)


def _message(
    seq: int, event: Event, *, table: str = "items", msg_id: str | None = None
) -> StreamedMessage:
    row = {"id": event.id, "version": event.version, "body": "x"}
    before = row if event.op == "delete" else None
    after = None if event.op == "delete" else row
    return StreamedMessage(
        seq=seq,
        subject=f"{table}.{event.op}",
        headers={
            "Nats-Msg-Id": msg_id or f"cdc_bridge:0/{seq:X}:0",
            "Cdc-Op": event.op,
            "Cdc-Table": f"public.{table}",
        },
        body={
            "op": event.op,
            "schema": "public",
            "table": table,
            "key": {"id": event.id},
            "after": after,
            "before": before,
            "unchanged_toast": [],
            "source": {"slot": "cdc_bridge", "index": 0},
        },
    )


def _stream(events: list[Event]) -> list[StreamedMessage]:
    return [_message(seq, event) for seq, event in enumerate(events, start=1)]


def _history(events: list[Event]) -> list[HistoryRow]:
    return [HistoryRow(seq, e.id, e.op, e.version) for seq, e in enumerate(events, start=1)]


EVENTS = [
    Event(1, "insert", 1),
    Event(2, "insert", 1),
    Event(1, "update", 2),
    Event(2, "update", 2),
    Event(1, "delete", 2),
    Event(3, "insert", 1),
]


def _problems(result: Comparison) -> set[str]:
    """The kinds of difference a comparison found."""
    kinds = ("missing", "duplicates", "duplicate_msg_ids", "unexpected", "order_violations")
    return {kind for kind in kinds if getattr(result, kind)}


def _compare(stream: list[StreamedMessage], history: list[Event] = EVENTS) -> Comparison:
    return compare_stream_with_history(stream, _history(history), table="items")


def test_exact_match_passes() -> None:
    result = _compare(_stream(EVENTS))
    assert result.exact
    assert (result.stream_count, result.history_count) == (6, 6)
    result.assert_exact()


def test_other_tables_and_logical_messages_are_ignored() -> None:
    stream = _stream(EVENTS)
    stream.insert(2, _message(100, Event(1, "insert", 1), table="other"))
    heartbeat = StreamedMessage(
        101, "cdc.heartbeat", {"Nats-Msg-Id": "cdc_bridge:0/1:0"}, {"op": "message"}
    )
    stream.insert(0, heartbeat)
    result = _compare(stream)
    assert result.exact, result.summary()
    assert result.stream_count == 6


def test_one_missing_is_reported() -> None:
    result = _compare(_stream([e for e in EVENTS if e != Event(2, "update", 2)]))
    assert result.missing == [Event(2, "update", 2)]
    assert _problems(result) == {"missing"}
    with pytest.raises(AssertionError, match=r"missing: 1: update\(id=2, v2\)"):
        result.assert_exact()


def test_duplicate_content_with_a_new_msg_id_is_reported() -> None:
    stream = _stream(EVENTS)
    stream.append(_message(7, Event(1, "update", 2)))  # republished under another id
    result = _compare(stream)
    assert result.duplicates == {Event(1, "update", 2): 2}
    assert _problems(result) == {"duplicates"}
    with pytest.raises(AssertionError, match=r"duplicates: 1: update\(id=1, v2\) x2"):
        result.assert_exact()


def test_duplicate_msg_id_is_reported() -> None:
    stream = _stream(EVENTS)
    stream.append(_message(7, Event(3, "insert", 1), msg_id="cdc_bridge:0/6:0"))
    result = _compare(stream)
    assert result.duplicate_msg_ids == {"cdc_bridge:0/6:0": 2}
    assert result.duplicates == {Event(3, "insert", 1): 2}
    with pytest.raises(AssertionError, match=r"duplicate Nats-Msg-Id: 1: cdc_bridge:0/6:0 x2"):
        result.assert_exact()


def test_same_msg_id_on_different_content_is_reported() -> None:
    # A dedup-window bug would show as two different changes under one id.
    stream = _stream(EVENTS)
    stream[1] = _message(2, EVENTS[1], msg_id=stream[0].headers["Nats-Msg-Id"])
    result = _compare(stream)
    assert result.duplicate_msg_ids == {stream[0].headers["Nats-Msg-Id"]: 2}
    assert not result.duplicates
    assert not result.exact


def test_out_of_order_pair_is_reported() -> None:
    events = list(EVENTS)
    events[2], events[4] = events[4], events[2]  # id 1: delete before its update
    result = _compare(_stream(events))
    assert [v.id for v in result.order_violations] == [1]
    violation = result.order_violations[0]
    assert violation.history == (
        Event(1, "insert", 1),
        Event(1, "update", 2),
        Event(1, "delete", 2),
    )
    assert violation.stream == (Event(1, "insert", 1), Event(1, "delete", 2), Event(1, "update", 2))
    assert _problems(result) == {"order_violations"}
    with pytest.raises(AssertionError, match=r"order violations: 1: id=1: history"):
        result.assert_exact()


def test_reordering_of_different_keys_is_accepted() -> None:
    events = list(EVENTS)
    events[2], events[3] = events[3], events[2]  # update of 1 and update of 2 swap
    assert _compare(_stream(events)).exact


def test_unexpected_message_is_reported() -> None:
    stream = _stream(EVENTS)
    stream.insert(3, _message(50, Event(7, "update", 3)))  # e.g. a rolled-back change
    result = _compare(stream)
    assert result.unexpected == [Event(7, "update", 3)]
    assert _problems(result) == {"unexpected"}
    with pytest.raises(AssertionError, match=r"unexpected: 1: update\(id=7, v3\)"):
        result.assert_exact()


def test_summary_shows_at_most_five_examples() -> None:
    result = _compare([], [Event(i, "insert", 1) for i in range(1, 9)])
    assert len(result.missing) == 8
    summary = result.summary()
    assert "missing: 8: insert(id=1, v1)" in summary
    assert "insert(id=5, v1), ... (3 more)" in summary
    assert "id=6" not in summary


def test_delete_without_old_row_is_an_error() -> None:
    message = _message(1, Event(1, "delete", 1))
    message.body["before"] = None
    with pytest.raises(ValueError, match="delete without id/version"):
        compare_stream_with_history([message], [], table="items")


# ---------------------------------------------------------------- properties


def _key_histories(lengths: list[int]) -> dict[int, list[Event]]:
    """Per key: insert v1, updates v2.., and a delete (of the last version) for odd keys."""
    histories: dict[int, list[Event]] = {}
    for key, length in enumerate(lengths, start=1):
        events = [Event(key, "insert", 1)]
        events += [Event(key, "update", v) for v in range(2, length + 1)]
        if key % 2:
            events.append(Event(key, "delete", length))
        histories[key] = events
    return histories


@st.composite
def interleavings(draw: st.DrawFn) -> tuple[list[Event], list[Event]]:
    """(history, stream): two interleavings of the same per-key sequences."""
    lengths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=6))
    histories = _key_histories(lengths)
    tokens = [key for key, events in histories.items() for _ in events]

    def interleave(order: list[int]) -> list[Event]:
        positions: dict[int, int] = defaultdict(int)
        result = []
        for key in order:
            result.append(histories[key][positions[key]])
            positions[key] += 1
        return result

    return (
        interleave(draw(st.permutations(tokens))),
        interleave(draw(st.permutations(tokens))),
    )


@settings(max_examples=200, deadline=None)
@given(interleavings())
def test_any_interleaving_keeping_per_key_order_is_accepted(
    pair: tuple[list[Event], list[Event]],
) -> None:
    history, stream = pair
    result = _compare(_stream(stream), history)
    assert result.exact, result.summary()


@settings(max_examples=200, deadline=None)
@given(interleavings(), st.data())
def test_swapping_two_messages_of_one_key_is_an_order_violation(
    pair: tuple[list[Event], list[Event]], data: st.DataObject
) -> None:
    history, stream = pair
    positions: dict[int, list[int]] = defaultdict(list)
    for index, event in enumerate(stream):
        positions[event.id].append(index)
    keys = sorted(key for key, found in positions.items() if len(found) >= 2)
    if not keys:
        # Make one: a key with two events, appended to both interleavings.
        extra = [Event(999, "insert", 1), Event(999, "update", 2)]
        history, stream = history + extra, stream + extra
        positions[999] = [len(stream) - 2, len(stream) - 1]
        keys = [999]
    key = data.draw(st.sampled_from(keys))
    first, second = sorted(data.draw(st.permutations(positions[key]))[:2])
    stream = list(stream)
    stream[first], stream[second] = stream[second], stream[first]
    result = _compare(_stream(stream), history)
    assert [v.id for v in result.order_violations] == [key]
    assert _problems(result) == {"order_violations"}


# ---------------------------------------------------------------- real server


def _count(dsn: str, query: str, params: tuple[Any, ...] = ()) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def _check_history(dsn: str, history: list[HistoryRow]) -> None:
    """Per id: insert v1, each update one version up, a delete (last) of the last version."""
    by_id: dict[int, list[HistoryRow]] = defaultdict(list)
    for row in history:
        by_id[row.id].append(row)
    with psycopg.connect(dsn, autocommit=True) as conn:
        table = {int(i): int(v) for i, v in conn.execute("SELECT id, version FROM items")}
    for key, rows in by_id.items():
        assert (rows[0].op, rows[0].version) == ("insert", 1), rows
        for previous, row in itertools.pairwise(rows):
            assert previous.op != "delete", f"change after the delete of {key}: {rows}"
            if row.op == "update":
                assert row.version == previous.version + 1, rows
            else:
                assert (row.op, row.version) == ("delete", previous.version), rows
        if rows[-1].op == "delete":
            assert key not in table
        else:
            assert table.get(key) == rows[-1].version, (key, rows)
    assert set(table) <= set(by_id)


@pytest.mark.servers
@pytest.mark.timeout(120)
async def test_workload_writes_a_consistent_committed_history(database: str) -> None:
    create_workload_table(database, "items")
    workload = Workload(
        database,
        "items",
        workers=2,
        rate=100,
        large_every=15,
        large_ops=(300, 600),
        rollback_ratio=0.1,
        toast_ratio=0.1,
        seed=1,
    )
    async with workload:
        await asyncio.sleep(2)
    assert workload.committed >= 20, vars(workload)
    assert workload.rolled_back >= 1, vars(workload)
    assert workload.errors == 0, workload.last_error

    history = await asyncio.to_thread(read_history, database, "items")
    ops = {row.op for row in history}
    assert ops == {"insert", "update", "delete"}
    assert [row.seq for row in history] == sorted(row.seq for row in history)
    inserts = sum(row.op == "insert" for row in history)
    deletes = sum(row.op == "delete" for row in history)
    assert inserts - deletes == _count(database, "SELECT count(*) FROM items")
    assert len({row.event for row in history}) == len(history), "(id, op, version) not unique"
    assert len(history) >= workload.committed_ops - deletes  # ops on a deleted key are skipped
    _check_history(database, history)
    assert _count(database, "SELECT count(*) FROM items WHERE length(body) > 3000") > 0

    # The workload's own rollbacks left nothing behind.
    assert workload.rolled_back_ids
    assert not {row.id for row in history} & set(workload.rolled_back_ids)

    # Nor does an explicit one that inserts, updates and deletes.
    with psycopg.connect(database) as conn:
        live = [int(r[0]) for r in conn.execute("SELECT id FROM items ORDER BY id LIMIT 2")]
        conn.execute("INSERT INTO items VALUES (-1, 1, 'rolled back')")
        conn.execute("UPDATE items SET version = version + 1 WHERE id = %s", (live[0],))
        conn.execute("DELETE FROM items WHERE id = %s", (live[1],))
        in_transaction = conn.execute("SELECT count(*) FROM items_history").fetchone()
        conn.rollback()
    assert in_transaction == (len(history) + 3,)
    assert await asyncio.to_thread(read_history, database, "items") == history
    _check_history(database, history)
