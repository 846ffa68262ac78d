"""The pure parts of ``cdc-bridge verify``: decoding, folding, comparing, reporting.

The property tests run random histories of one table (inserts, updates with and without
unchanged TOAST values, key changes, deletes, truncates) through the bridge's real
envelope encoders, then through :func:`decode_row` and :class:`TableFold`, and compare
with the table the same history leaves behind.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.js.api import StreamConfig, StreamInfo, StreamState

from cdc_bridge.changes import Change, TableInfo
from cdc_bridge.envelope import encode_change
from cdc_bridge.envelopes import DebeziumEncoder, Wal2JsonEncoder
from cdc_bridge.values import converter_for
from cdc_bridge.verify.fold import (
    RowEvent,
    SnapshotVisibility,
    TableFold,
    decode_row,
    differing_columns,
    key_text,
    sample_predicate,
)
from cdc_bridge.verify.repair import repair_msg_id
from cdc_bridge.verify.report import (
    Differing,
    TableResult,
    VerifyResult,
    render_metrics,
    render_text,
)
from cdc_bridge.verify.stream import history_note

TABLE = TableInfo(
    oid=16384,
    schema="public",
    table="t",
    column_names=("id", "a", "b"),
    converters=(converter_for(23), converter_for(25), converter_for(25)),
    type_oids=(23, 25, 25),
    key_names=("id",),
    identity_names=frozenset({"id"}),
    replica_identity="d",
)
KEY = ("id",)


def _encoders() -> dict[str, Any]:
    return {
        "native": encode_change,
        "wal2json": Wal2JsonEncoder(),
        "debezium": DebeziumEncoder(name="s", database="d", clock=lambda: 0),
    }


def _change(
    op: str,
    *,
    after: dict[str, Any] | None = None,
    before: dict[str, Any] | None = None,
    toast: list[str] | None = None,
    index: int = 0,
) -> Change:
    row = after if after is not None else before
    return Change(
        op=op,  # type: ignore[arg-type]
        table=TABLE,
        key=None if row is None else {"id": row["id"]},
        after=after,
        before=before,
        unchanged_toast=toast or [],
        lsn=100 + index,
        commit_lsn=100 + index,
        xid=700 + index,
        commit_ts=0,
        index=index,
    )


# --------------------------------------------------------------------------- histories

_ids = st.integers(min_value=1, max_value=6)
_values = st.text(alphabet="xyz", max_size=3)


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Random valid operations on the table, as (op, args...) tuples."""
    live: set[int] = set()
    steps: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(min_value=0, max_value=30))):
        kind = draw(st.sampled_from(["insert", "update", "toast", "rekey", "delete", "trunc"]))
        if kind == "insert":
            key = draw(_ids)
            if key in live:
                continue
            live.add(key)
            steps.append(("insert", key, draw(_values), draw(_values)))
        elif kind in ("update", "toast", "rekey", "delete") and live:
            key = draw(st.sampled_from(sorted(live)))
            if kind == "update":
                steps.append(("update", key, draw(_values), draw(_values)))
            elif kind == "toast":
                steps.append(("toast", key, draw(_values)))
            elif kind == "rekey":
                new = draw(_ids)
                if new in live:
                    continue
                live.discard(key)
                live.add(new)
                steps.append(("rekey", key, new, draw(_values)))
            else:
                live.discard(key)
                steps.append(("delete", key))
        elif kind == "trunc":
            live.clear()
            steps.append(("truncate",))
    return steps


def _play(steps: list[tuple[Any, ...]]) -> tuple[dict[int, dict[str, Any]], list[Change]]:
    """The table a history leaves, and the changes the bridge would publish for it."""
    table: dict[int, dict[str, Any]] = {}
    changes: list[Change] = []
    for index, step in enumerate(steps):
        op = step[0]
        if op == "insert":
            _, key, a, b = step
            table[key] = {"id": key, "a": a, "b": b}
            changes.append(_change("insert", after=dict(table[key]), index=index))
        elif op == "update":
            _, key, a, b = step
            table[key] = {"id": key, "a": a, "b": b}
            changes.append(_change("update", after=dict(table[key]), index=index))
        elif op == "toast":  # b is an unchanged TOAST value: not in the message
            _, key, a = step
            table[key]["a"] = a
            changes.append(_change("update", after={"id": key, "a": a}, toast=["b"], index=index))
        elif op == "rekey":
            _, key, new, a = step
            row = table.pop(key)
            table[new] = {"id": new, "a": a, "b": row["b"]}
            changes.append(
                _change("update", after=dict(table[new]), before={"id": key}, index=index)
            )
        elif op == "delete":
            _, key = step
            del table[key]
            changes.append(_change("delete", before={"id": key}, index=index))
        else:
            table.clear()
            changes.append(
                Change(
                    op="truncate",
                    table=TABLE,
                    key=None,
                    after=None,
                    before=None,
                    unchanged_toast=[],
                    lsn=index,
                    commit_lsn=index,
                    xid=1,
                    commit_ts=0,
                    index=index,
                    truncate_options=(False, False),
                )
            )
    return table, changes


def _events(envelope: str, changes: list[Change]) -> list[RowEvent]:
    encoder = _encoders()[envelope]
    return [decode_row(envelope, c.op, orjson.loads(encoder(c, "slot")), KEY) for c in changes]


def _published(envelope: str, row: dict[str, Any]) -> dict[str, Any]:
    """A table row as the stream would state it (as verify's table side does)."""
    body = orjson.loads(_encoders()[envelope](_change("read", after=dict(row)), "slot"))
    published = decode_row(envelope, "read", body, KEY).row
    assert published is not None
    return published


@pytest.mark.parametrize("envelope", ["native", "wal2json", "debezium"])
@settings(max_examples=150, deadline=None)
@given(steps=histories())
def test_the_fold_of_a_whole_history_is_the_table(
    envelope: str, steps: list[tuple[Any, ...]]
) -> None:
    table, changes = _play(steps)
    fold = TableFold()
    for event in _events(envelope, changes):
        fold.apply(event)
    live = {k: v for k, v in fold.states.items() if v is not None}
    expected = {
        key_text(KEY, _published(envelope, row)): _published(envelope, row)
        for row in table.values()
    }
    assert live == expected


@pytest.mark.parametrize("envelope", ["native", "wal2json"])
@settings(max_examples=150, deadline=None)
@given(steps=histories(), data=st.data())
def test_a_history_without_its_start_never_contradicts_the_table(
    envelope: str, steps: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    """Retention dropped the first messages: what the fold still knows is right."""
    table, changes = _play(steps)
    events = _events(envelope, changes)
    dropped = data.draw(st.integers(min_value=0, max_value=len(events)))
    fold = TableFold(baseline_known=dropped == 0)
    for event in events[dropped:]:
        fold.apply(event)
    rows = {key_text(KEY, _published(envelope, r)): _published(envelope, r) for r in table.values()}
    for key, state in fold.states.items():
        if state is None:
            assert key not in rows
        else:
            assert key in rows
            assert differing_columns(rows[key], state) == []
    if fold.baseline_known:  # no drop, or a truncate since: absent keys are known
        assert set(rows) <= {k for k, v in fold.states.items() if v is not None}


@settings(max_examples=100, deadline=None)
@given(steps=histories(), seed=st.text(max_size=8))
def test_a_sampled_fold_is_the_whole_fold_restricted_to_the_sample(
    steps: list[tuple[Any, ...]], seed: str
) -> None:
    _, changes = _play(steps)
    events = _events("native", changes)
    keep = sample_predicate(0.5, seed)
    assert keep is not None
    whole, sampled = TableFold(), TableFold(keep=keep)
    for event in events:
        whole.apply(event)
        sampled.apply(event)
    assert sampled.states == {k: v for k, v in whole.states.items() if keep(k)}


def test_sample_predicate_edges() -> None:
    assert sample_predicate(1.0, "s") is None
    assert sample_predicate(3.0, "s") is None
    none = sample_predicate(0.0, "s")
    assert none is not None
    assert not any(none(str(i)) for i in range(100))
    half = sample_predicate(0.5, "s")
    assert half is not None
    assert 400 < sum(half(f"[{i}]") for i in range(1000)) < 600
    other = sample_predicate(0.5, "t")
    assert other is not None
    assert [half(f"[{i}]") for i in range(50)] != [other(f"[{i}]") for i in range(50)]


# --------------------------------------------------------------------------- decoding


def test_unchanged_toast_keeps_the_known_value_in_every_envelope() -> None:
    insert = _change("insert", after={"id": 1, "a": "x", "b": "long"})
    update = _change("update", after={"id": 1, "a": "y"}, toast=["b"], index=1)
    for envelope in ("native", "wal2json", "debezium"):
        events = _events(envelope, [insert, update])
        assert events[1].row == {"id": 1, "a": "y"}, envelope
        fold = TableFold()
        for event in events:
            fold.apply(event)
        assert fold.states == {"[1]": {"id": 1, "a": "y", "b": "long"}}, envelope


def test_an_update_first_seen_leaves_its_toast_column_unknown() -> None:
    fold = TableFold(baseline_known=False)
    fold.apply(RowEvent("update", "[1]", {"id": 1, "a": "y"}))
    assert fold.states == {"[1]": {"id": 1, "a": "y"}}
    state = fold.states["[1]"]
    assert state is not None
    assert differing_columns({"id": 1, "a": "y", "b": "anything"}, state) == []


def test_a_key_change_clears_the_old_key() -> None:
    for envelope in ("native", "wal2json", "debezium"):
        events = _events(
            envelope,
            [
                _change("insert", after={"id": 1, "a": "x", "b": "b"}),
                _change("update", after={"id": 2, "a": "x", "b": "b"}, before={"id": 1}),
            ],
        )
        assert (events[1].old_key, events[1].key) == ("[1]", "[2]"), envelope
        fold = TableFold()
        for event in events:
            fold.apply(event)
        assert fold.states == {"[1]": None, "[2]": {"id": 2, "a": "x", "b": "b"}}, envelope


def test_decode_reads_the_transaction_where_the_envelope_has_it() -> None:
    change = _change("insert", after={"id": 1, "a": "x", "b": "b"}, index=5)
    assert decode_row("native", "insert", orjson.loads(encode_change(change, "s")), KEY).xid == 705
    debezium = DebeziumEncoder(name="s", database="d")(change, "s")
    assert decode_row("debezium", "insert", orjson.loads(debezium), KEY).xid == 705
    plain = Wal2JsonEncoder()(change, "s")
    assert decode_row("wal2json", "insert", orjson.loads(plain), KEY).xid is None
    with_xids = Wal2JsonEncoder(include_xids=True)(change, "s")
    assert decode_row("wal2json", "insert", orjson.loads(with_xids), KEY).xid == 705
    read = _change("read", after={"id": 1, "a": "x", "b": "b"})
    body = orjson.loads(encode_change(read, "s"))
    assert decode_row("native", "read", body, KEY).xid is None  # snapshot rows: no xid


def test_a_truncate_clears_everything_and_makes_absence_known() -> None:
    fold = TableFold(baseline_known=False)
    fold.apply(RowEvent("insert", "[1]", {"id": 1}))
    fold.apply(RowEvent("truncate", None, None))
    fold.apply(RowEvent("insert", "[2]", {"id": 2}))
    assert fold.states == {"[2]": {"id": 2}}
    assert fold.baseline_known
    assert fold.truncates == 1
    assert fold.messages == 3


def test_differing_columns_compares_only_what_both_sides_have() -> None:
    table = {"id": 1, "a": "x", "b": [1, 2], "c": {"k": 1}, "n": None}
    assert differing_columns(table, {"id": 1, "a": "x", "b": [1, 2]}) == []
    assert differing_columns(table, {"id": 1, "a": "y", "c": {"k": 2}, "n": 0}) == ["a", "c", "n"]
    assert differing_columns(table, {"id": 1, "gone": 5}) == []


def test_key_text_is_canonical_json_of_the_key_values() -> None:
    assert key_text(("id", "k"), {"k": "b", "id": 1, "x": 0}) == '[1,"b"]'
    assert key_text(("id",), {"x": 1}) is None
    assert key_text(("id",), None) is None
    assert key_text((), {"id": 1}) is None


# --------------------------------------------------------------------------- snapshots


def test_snapshot_visibility() -> None:
    snapshot = SnapshotVisibility("10:20:12,15")
    assert [x for x in range(5, 25) if snapshot.visible(x)] == [
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        13,
        14,
        16,
        17,
        18,
        19,
    ]


def test_snapshot_visibility_across_the_xid_epoch() -> None:
    epoch = 2**32
    snapshot = SnapshotVisibility(f"{epoch - 6}:{epoch + 5}:{epoch - 2},{epoch + 1}")
    assert snapshot.visible(2**32 - 1)  # epoch - 1: before xmin, committed
    assert not snapshot.visible(2**32 - 2)  # in progress
    assert snapshot.visible(3)  # epoch + 3
    assert not snapshot.visible(1)  # epoch + 1: in progress
    assert not snapshot.visible(7)  # epoch + 7: after xmax
    assert snapshot.full_xid(2**32 - 1) == epoch - 1
    assert snapshot.full_xid(7) == epoch + 7


def test_repair_ids_are_not_wal_positions() -> None:
    from cdc_bridge.readback import position_of

    msg_id = repair_msg_id("cdc_bridge", "0/16B3748", "public.t", 3)
    assert msg_id == "cdc_bridge:verify:0/16B3748:public.t:3"
    assert position_of(msg_id, "cdc_bridge") is None


# --------------------------------------------------------------------------- retention


def _info(first_seq: int, deleted: int = 0, **limits: Any) -> StreamInfo:
    return StreamInfo(
        config=StreamConfig(name="S", subjects=["t.*"], **limits),
        state=StreamState(
            messages=10,
            bytes=100,
            first_seq=first_seq,
            last_seq=20,
            consumer_count=0,
            num_deleted=deleted,
        ),
    )


def test_history_note_only_for_streams_with_limits_that_dropped_something() -> None:
    assert history_note(_info(1)) is None
    assert history_note(_info(11)) is None  # no limits: a missing message is a loss
    assert history_note(_info(1, max_msgs=10)) is None  # limits, nothing dropped yet
    assert history_note(_info(11, max_msgs=10)) == (
        "stream S no longer holds its first 10 messages (max_msgs 10; first sequence 11): "
        "only keys whose state the stream still fully knows are compared; table rows "
        "without a message in it are counted as not comparable"
    )
    note = history_note(_info(1, deleted=2, max_msgs_per_subject=1, max_age=3600))
    assert note is not None
    assert note.startswith(
        "stream S no longer holds some messages (max_age 3600, max_msgs_per_subject 1; "
    )


# --------------------------------------------------------------------------- reports


def _result() -> VerifyResult:
    table = TableResult(
        "public.t",
        table_rows=99,
        stream_keys=100,
        messages=250,
        checked=100,
        only_in_table=1,
        only_in_stream=2,
        differing=1,
        only_in_table_examples=[{"id": 7}],
        only_in_stream_examples=[{"id": 8}, {"id": 9}],
        differing_examples=[Differing({"id": 3}, ["a"])],
        differing_columns={"a": 1},
    )
    return VerifyResult(
        stream="S",
        slot="cdc_bridge",
        lsn="0/10",
        envelope="native",
        mode="full",
        sample=None,
        max_mismatch=3.0,
        started="2026-11-27T16:00:00Z",
        duration_seconds=1.5,
        tables=[table],
        timings={"stream": 1.0, "tables": 0.5},
    )


def test_exit_code_follows_max_mismatch() -> None:
    result = _result()
    assert result.tables[0].mismatch_percent == 4.0
    assert (result.ok, result.exit_code) == (False, 1)
    result.max_mismatch = 4.0
    assert (result.ok, result.exit_code) == (True, 0)


def test_json_shape() -> None:
    assert _result().to_json() == {
        "ok": False,
        "stream": "S",
        "slot": "cdc_bridge",
        "lsn": "0/10",
        "envelope": "native",
        "mode": "full",
        "sample": None,
        "max_mismatch_percent": 3.0,
        "started": "2026-11-27T16:00:00Z",
        "duration_seconds": 1.5,
        "timings": {"stream": 1.0, "tables": 0.5},
        "history": {"complete": True, "note": None},
        "repair": False,
        "tables": [
            {
                "table": "public.t",
                "table_rows": 99,
                "stream_keys": 100,
                "messages": 250,
                "checked": 100,
                "mismatched": 4,
                "mismatch_percent": 4.0,
                "only_in_table": {"count": 1, "percent": 1.0, "examples": [{"id": 7}]},
                "only_in_stream": {
                    "count": 2,
                    "percent": 2.0,
                    "examples": [{"id": 8}, {"id": 9}],
                },
                "differing": {
                    "count": 1,
                    "percent": 1.0,
                    "columns": {"a": 1},
                    "examples": [{"key": {"id": 3}, "columns": ["a"]}],
                },
                "unverifiable": 0,
                "repaired": 0,
            }
        ],
    }


def test_text_report() -> None:
    assert render_text(_result()) == "\n".join(
        [
            "verify stream S (slot cdc_bridge, native envelope) against the tables at LSN "
            "0/10: full",
            "public.t",
            "  table rows         99   stream keys 100 (from 250 messages)",
            "  checked            100",
            '  only in table      1 (1.00%)  e.g. {"id":7}',
            '  only in stream     2 (2.00%)  e.g. {"id":8} {"id":9}',
            "  differing          1 (1.00%)",
            "    columns          a (1)",
            '    e.g.             {"id":3}: a',
            "result: MISMATCH (4.000% at most, above --max-mismatch 3%) in 1.5s "
            "(stream 1.0s, tables 0.5s)",
        ]
    )


def test_metrics_exposition() -> None:
    text = render_metrics(_result(), 1700000000.0)
    for line in (
        'cdc_bridge_verify_rows{outcome="checked",stream="S",table="public.t"} 100.0',
        'cdc_bridge_verify_rows{outcome="only_in_stream",stream="S",table="public.t"} 2.0',
        'cdc_bridge_verify_mismatch_ratio{stream="S",table="public.t"} 0.04',
        'cdc_bridge_verify_ok{stream="S"} 0.0',
        'cdc_bridge_verify_last_run_timestamp_seconds{stream="S"} 1.7e+09',
        'cdc_bridge_verify_duration_seconds{stream="S"} 1.5',
        "# TYPE cdc_bridge_verify_rows gauge",
    ):
        assert line in text.splitlines(), line
