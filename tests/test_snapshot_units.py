"""Pure parts of the initial snapshot: read changes in every envelope, their routing and
ids, the progress record, and when an unfinished snapshot is resumed."""

from __future__ import annotations

import orjson

from cdc_bridge.changes import Change, TableInfo
from cdc_bridge.envelope import encode_change
from cdc_bridge.envelopes import DebeziumEncoder, Wal2JsonEncoder
from cdc_bridge.filters import TableFilter
from cdc_bridge.lsn import format_lsn
from cdc_bridge.pipeline import _unfinished
from cdc_bridge.readback import position_of
from cdc_bridge.router import Router
from cdc_bridge.snapshot import SnapshotRecord, TableProgress, snapshot_msg_id
from cdc_bridge.values import converter_for

SLOT = "cdc_bridge"
TABLE = TableInfo(
    oid=16385,
    schema="public",
    table="t",
    column_names=("id", "v"),
    converters=(converter_for(23), converter_for(25)),
    type_oids=(23, 25),
    key_names=("id",),
    identity_names=frozenset({"id"}),
    replica_identity="d",
    config_name="public.t",
    type_modifiers=(-1, -1),
)
LSN = 0x1A2B3C8


def _read(index: int = 0) -> Change:
    return Change(
        op="read",
        table=TABLE,
        key={"id": 1},
        after={"id": 1, "v": "a"},
        before=None,
        unchanged_toast=[],
        lsn=LSN,
        commit_lsn=LSN,
        xid=0,
        commit_ts=849_087_130_437_557,
        index=index,
    )


def test_native_read() -> None:
    body = orjson.loads(encode_change(_read(7), SLOT))
    assert body["op"] == "read"
    assert body["after"] == {"id": 1, "v": "a"}
    assert body["before"] is None
    assert body["key"] == {"id": 1}
    assert body["source"]["snapshot"] is True
    assert body["source"]["xid"] is None
    assert body["source"]["lsn"] == body["source"]["commit_lsn"] == format_lsn(LSN)
    assert body["source"]["index"] == 7


def test_debezium_and_wal2json_read() -> None:
    debezium = orjson.loads(DebeziumEncoder(name=SLOT, database="db")(_read(), SLOT))
    assert debezium["op"] == "r"
    assert debezium["source"]["snapshot"] == "true"
    assert debezium["source"]["txId"] is None
    assert debezium["before"] is None
    wal2json = orjson.loads(Wal2JsonEncoder()(_read(), SLOT))
    assert wal2json["action"] == "I"
    assert "identity" not in wal2json


def test_route_read_headers_and_id_not_a_position() -> None:
    router = Router(slot=SLOT, table_subjects={"public.t": "t.{op}.{id}"}, message_subject=None)
    msg_id = snapshot_msg_id(SLOT, 2, "public.t", 3, 4)
    assert msg_id == "cdc_bridge:snapshot:2:public.t:3:4"
    outgoing = router.route_read(_read(), msg_id)
    assert outgoing is not None
    assert outgoing.subject == "t.read.1"
    assert outgoing.headers["Nats-Msg-Id"] == msg_id
    assert outgoing.headers["Cdc-Op"] == "read"
    assert outgoing.headers["Cdc-Snapshot"] == "public.t"
    assert position_of(msg_id, SLOT) is None  # the read-back passes over it


def test_filters_mask_reads_but_ops_do_not_drop_them() -> None:
    only_inserts = TableFilter(ops=frozenset({"insert"}), exclude=frozenset({"v"}))
    change = _read()
    assert only_inserts.apply(change)
    assert change.after == {"id": 1}


def test_progress_record_round_trip() -> None:
    record = SnapshotRecord(slot=SLOT, mode="initial", run=3, lsn="0/1A2B3C8")
    record.tables["public.t"] = TableProgress(last_key=["5", None], chunks=2, rows=20)
    again = SnapshotRecord.from_json(record.to_json())
    assert again == record


def test_unfinished_snapshot_is_resumed_only_at_the_slots_consistent_point() -> None:
    record = SnapshotRecord(slot=SLOT, mode="initial", lsn=format_lsn(LSN))
    assert _unfinished(record, LSN)
    assert not _unfinished(record, LSN + 8)  # an older slot's record
    assert _unfinished(SnapshotRecord(slot=SLOT, mode="initial"), LSN)  # crashed at creation
    record.done = True
    assert not _unfinished(record, LSN)
    assert not _unfinished(None, LSN)
    assert not _unfinished(SnapshotRecord(slot=SLOT, mode="initial_only"), LSN)
