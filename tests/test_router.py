"""Tests for cdc_bridge.router (and the envelope it builds): exact subjects, headers, bodies."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from cdc_bridge.changes import Change, MessageEvent, Op, TableInfo
from cdc_bridge.lsn import format_lsn
from cdc_bridge.pgoutput import pg_timestamp_to_iso
from cdc_bridge.router import OutgoingMessage, Router
from cdc_bridge.values import JsonValue, converter_for

SLOT = "cdc_bridge"
XID = 750
COMMIT_LSN = 0x16B3800
TS = 849_087_130_437_029
TS_ISO = "2026-11-27T09:32:10.437029Z"
UUID = "0b7e3f8a-4c2d-4e6f-9a1b-2c3d4e5f6a7b"

CONVERSATIONS = TableInfo(
    oid=16384,
    schema="public",
    table="conversations",
    column_names=("id", "conversation_uuid", "body"),
    converters=tuple(converter_for(oid) for oid in (20, 2950, 25)),
    type_oids=(20, 2950, 25),
    key_names=("id",),
    identity_names=frozenset({"id"}),
    replica_identity="d",
)
USERS = TableInfo(
    oid=16400,
    schema="app",
    table="users",
    column_names=("user_id",),
    converters=(converter_for(20),),
    type_oids=(20,),
    key_names=("user_id",),
    identity_names=frozenset({"user_id"}),
    replica_identity="d",
)
UNROUTED = TableInfo(
    oid=16500,
    schema="public",
    table="secrets",
    column_names=("id",),
    converters=(converter_for(20),),
    type_oids=(20,),
    key_names=("id",),
    identity_names=frozenset({"id"}),
    replica_identity="d",
)

ROW: dict[str, JsonValue] = {"id": 1, "conversation_uuid": UUID, "body": "hello"}


def _router(message_subject: str | None = "cdc.message.{prefix}") -> Router:
    return Router(
        slot=SLOT,
        table_subjects={
            "public.conversations": "messages.{conversation_uuid}",
            "app.users": "cdc.{schema}.{table}.{op}",
        },
        message_subject=message_subject,
    )


def _change(
    op: Op,
    *,
    table: TableInfo = CONVERSATIONS,
    key: dict[str, JsonValue] | None = None,
    after: dict[str, JsonValue] | None = None,
    before: dict[str, JsonValue] | None = None,
    unchanged_toast: list[str] | None = None,
    lsn: int = 0x16B3700,
    commit_lsn: int = COMMIT_LSN,
    index: int = 0,
) -> Change:
    return Change(
        op=op,
        table=table,
        key=key,
        after=after,
        before=before,
        unchanged_toast=unchanged_toast or [],
        lsn=lsn,
        commit_lsn=commit_lsn,
        xid=XID,
        commit_ts=TS,
        index=index,
    )


def _headers(op: str, table: str, index: int, commit_lsn: str = "0/16B3800") -> dict[str, str]:
    return {
        "Nats-Msg-Id": f"{SLOT}:{commit_lsn}:{index}",
        "Cdc-Op": op,
        "Cdc-Table": table,
        "Cdc-Commit-Lsn": commit_lsn,
        "Cdc-Index": str(index),
    }


def _source(lsn: str, index: int, commit_lsn: str = "0/16B3800") -> dict[str, Any]:
    return {
        "slot": SLOT,
        "lsn": lsn,
        "commit_lsn": commit_lsn,
        "xid": XID,
        "commit_ts": TS_ISO,
        "index": index,
    }


def _route(router: Router, change: Change) -> tuple[str, dict[str, str], Any]:
    out = router.route_change(change)
    assert isinstance(out, OutgoingMessage)
    return out.subject, out.headers, orjson.loads(out.body)


# --------------------------------------------------------------------------- changes


def test_insert() -> None:
    change = _change("insert", key={"id": 1}, after=ROW)
    out = _router().route_change(change)
    assert out is not None
    assert out.subject == f"messages.{UUID}"
    assert out.headers == _headers("insert", "public.conversations", 0)
    body = orjson.loads(out.body)
    assert body == {
        "op": "insert",
        "schema": "public",
        "table": "conversations",
        "key": {"id": 1},
        "after": {"id": 1, "conversation_uuid": UUID, "body": "hello"},
        "before": None,
        "unchanged_toast": [],
        "source": _source("0/16B3700", 0),
    }
    # The documented key order of the envelope.
    assert list(body) == [
        "op",
        "schema",
        "table",
        "key",
        "after",
        "before",
        "unchanged_toast",
        "source",
    ]
    assert list(body["source"]) == ["slot", "lsn", "commit_lsn", "xid", "commit_ts", "index"]


def test_update_with_before() -> None:
    after: dict[str, JsonValue] = {"id": 1, "conversation_uuid": UUID, "body": "edited"}
    change = _change("update", key={"id": 1}, after=after, before=ROW, lsn=0x16B3740, index=3)
    subject, headers, body = _route(_router(), change)
    assert subject == f"messages.{UUID}"
    assert headers == _headers("update", "public.conversations", 3)
    assert body == {
        "op": "update",
        "schema": "public",
        "table": "conversations",
        "key": {"id": 1},
        "after": after,
        "before": ROW,
        "unchanged_toast": [],
        "source": _source("0/16B3740", 3),
    }


def test_update_routing_column_unchanged_toast_uses_before() -> None:
    after: dict[str, JsonValue] = {"id": 1, "body": "edited"}
    before: dict[str, JsonValue] = {"id": 1, "conversation_uuid": UUID}
    change = _change(
        "update",
        key={"id": 1},
        after=after,
        before=before,
        unchanged_toast=["conversation_uuid"],
        index=1,
    )
    subject, headers, body = _route(_router(), change)
    assert subject == f"messages.{UUID}"
    assert headers == _headers("update", "public.conversations", 1)
    # The body is not changed by routing.
    assert body == {
        "op": "update",
        "schema": "public",
        "table": "conversations",
        "key": {"id": 1},
        "after": {"id": 1, "body": "edited"},
        "before": {"id": 1, "conversation_uuid": UUID},
        "unchanged_toast": ["conversation_uuid"],
        "source": _source("0/16B3700", 1),
    }


def test_update_new_value_wins_over_before() -> None:
    after: dict[str, JsonValue] = {"id": 1, "conversation_uuid": "new"}
    change = _change("update", after=after, before={"id": 1, "conversation_uuid": "old"})
    assert _route(_router(), change)[0] == "messages.new"


def test_update_routing_column_unknown_without_before() -> None:
    change = _change(
        "update", key={"id": 1}, after={"id": 1}, unchanged_toast=["conversation_uuid"]
    )
    assert _route(_router(), change)[0] == "messages._"


def test_delete_routed_from_before() -> None:
    before: dict[str, JsonValue] = {"id": 7, "conversation_uuid": UUID}
    change = _change("delete", key={"id": 7}, before=before, lsn=0x16B3780, index=2)
    subject, headers, body = _route(_router(), change)
    assert subject == f"messages.{UUID}"
    assert headers == _headers("delete", "public.conversations", 2)
    assert body == {
        "op": "delete",
        "schema": "public",
        "table": "conversations",
        "key": {"id": 7},
        "after": None,
        "before": {"id": 7, "conversation_uuid": UUID},
        "unchanged_toast": [],
        "source": _source("0/16B3780", 2),
    }


def test_truncate_renders_column_placeholders_as_underscore() -> None:
    router = _router()
    subject, headers, body = _route(router, _change("truncate", index=4))
    assert subject == "messages._"
    assert headers == _headers("truncate", "public.conversations", 4)
    assert body == {
        "op": "truncate",
        "schema": "public",
        "table": "conversations",
        "key": None,
        "after": None,
        "before": None,
        "unchanged_toast": [],
        "source": _source("0/16B3700", 4),
    }
    subject, headers, _ = _route(router, _change("truncate", table=USERS, index=5))
    assert subject == "cdc.app.users.truncate"
    assert headers == _headers("truncate", "app.users", 5)


def test_builtin_placeholders_per_op() -> None:
    router = _router()
    row: dict[str, JsonValue] = {"user_id": 9}
    for index, (op, after, before) in enumerate(
        [
            ("insert", row, None),
            ("update", row, None),
            ("delete", None, row),
            ("insert", row, None),  # cached binding reused
        ]
    ):
        change = _change(op, table=USERS, key=row, after=after, before=before, index=index)  # type: ignore[arg-type]
        subject, headers, _ = _route(router, change)
        assert subject == f"cdc.app.users.{op}"
        assert headers == _headers(op, "app.users", index)


def test_routing_values_are_sanitised() -> None:
    router = Router(
        slot=SLOT,
        table_subjects={"public.conversations": "conv.{conversation_uuid}.{id}.{body}"},
        message_subject=None,
    )
    after: dict[str, JsonValue] = {"id": 42, "conversation_uuid": "a.b*c>d e", "body": None}
    assert _route(router, _change("insert", after=after))[0] == "conv.a_b_c_d_e.42._"
    after = {"id": True, "conversation_uuid": "", "body": "x\ny"}
    assert _route(router, _change("insert", after=after))[0] == "conv._.true.x_y"


def test_unconfigured_table_is_not_routed() -> None:
    router = _router()
    assert router.route_change(_change("insert", table=UNROUTED, after={"id": 1})) is None
    assert router.route_change(_change("truncate", table=UNROUTED)) is None


def test_forget_table_after_rename() -> None:
    router = _router()
    assert _route(router, _change("insert", table=USERS, after={"user_id": 1}))[0] == (
        "cdc.app.users.insert"
    )
    renamed = TableInfo(
        oid=USERS.oid,
        schema="public",
        table="conversations",
        column_names=("id", "conversation_uuid"),
        converters=(converter_for(20), converter_for(2950)),
        type_oids=(20, 2950),
        key_names=("id",),
        identity_names=frozenset({"id"}),
        replica_identity="d",
    )
    router.forget_table(USERS.oid)
    subject, headers, _ = _route(router, _change("insert", table=renamed, after=ROW))
    assert subject == f"messages.{UUID}"
    assert headers["Cdc-Table"] == "public.conversations"

    unconfigured = TableInfo(
        oid=USERS.oid,
        schema="app",
        table="people",
        column_names=("user_id",),
        converters=(converter_for(20),),
        type_oids=(20,),
        key_names=("user_id",),
        identity_names=frozenset({"user_id"}),
        replica_identity="d",
    )
    router.forget_table(USERS.oid)
    assert router.route_change(_change("insert", table=unconfigured, after={"user_id": 1})) is None
    router.forget_table(999)  # unknown oid: nothing to do


def test_high_lsns_in_headers_and_body() -> None:
    change = _change("insert", after=ROW, lsn=0x16_B374D848, commit_lsn=0x16_B374D900, index=12345)
    _, headers, body = _route(_router(), change)
    assert headers == _headers("insert", "public.conversations", 12345, "16/B374D900")
    assert body["source"] == _source("16/B374D848", 12345, "16/B374D900")


@given(
    lsn=st.integers(min_value=0, max_value=2**64 - 1),
    commit_lsn=st.integers(min_value=0, max_value=2**64 - 1),
    index=st.integers(min_value=0, max_value=2**31),
    xid=st.integers(min_value=0, max_value=2**32 - 1),
    ts=st.integers(min_value=-(10**15), max_value=10**16),
)
def test_identity_headers_match_the_body(
    lsn: int, commit_lsn: int, index: int, xid: int, ts: int
) -> None:
    change = _change("insert", after=ROW, lsn=lsn, commit_lsn=commit_lsn, index=index)
    change.xid = xid
    change.commit_ts = ts
    _, headers, body = _route(_router(), change)
    assert headers["Nats-Msg-Id"] == f"{SLOT}:{format_lsn(commit_lsn)}:{index}"
    assert headers["Cdc-Commit-Lsn"] == format_lsn(commit_lsn)
    assert headers["Cdc-Index"] == str(index)
    assert body["source"] == {
        "slot": SLOT,
        "lsn": format_lsn(lsn),
        "commit_lsn": format_lsn(commit_lsn),
        "xid": xid,
        "commit_ts": pg_timestamp_to_iso(ts),
        "index": index,
    }


# --------------------------------------------------------------------------- logical messages


def _message(
    content: bytes,
    *,
    prefix: str = "app",
    transactional: bool = True,
    lsn: int = 0x16B3790,
    index: int = 1,
) -> MessageEvent:
    if transactional:
        return MessageEvent(prefix, content, True, lsn, COMMIT_LSN, XID, TS, index)
    return MessageEvent(prefix, content, False, lsn, lsn, None, None, 0)


def test_message_without_subject_is_not_routed() -> None:
    assert _router(message_subject=None).route_message(_message(b"hello")) is None
    assert _router(message_subject="").route_message(_message(b"hello")) is None


def test_transactional_message() -> None:
    out = _router().route_message(_message(b"hello"))
    assert out is not None
    assert out.subject == "cdc.message.app"
    assert out.headers == {
        "Nats-Msg-Id": f"{SLOT}:0/16B3800:1",
        "Cdc-Op": "message",
        "Cdc-Commit-Lsn": "0/16B3800",
        "Cdc-Index": "1",
    }
    body = orjson.loads(out.body)
    assert body == {
        "op": "message",
        "prefix": "app",
        "content": "hello",
        "content_encoding": "utf-8",
        "transactional": True,
        "source": _source("0/16B3790", 1),
    }
    assert list(body) == [
        "op",
        "prefix",
        "content",
        "content_encoding",
        "transactional",
        "source",
    ]


def test_non_transactional_binary_message() -> None:
    out = _router().route_message(
        _message(b"\xff\x00\xfe", prefix="my.app v2", transactional=False, lsn=0x16B4000)
    )
    assert out is not None
    assert out.subject == "cdc.message.my_app_v2"
    assert out.headers == {
        # ":m", not ":0": the message's LSN may be the commit LSN of a transaction.
        "Nats-Msg-Id": f"{SLOT}:0/16B4000:m",
        "Cdc-Op": "message",
        "Cdc-Commit-Lsn": "0/16B4000",
        "Cdc-Index": "0",
    }
    assert orjson.loads(out.body) == {
        "op": "message",
        "prefix": "my.app v2",
        "content": "/wD+",
        "content_encoding": "base64",
        "transactional": False,
        "source": {
            "slot": SLOT,
            "lsn": "0/16B4000",
            "commit_lsn": "0/16B4000",
            "xid": None,
            "commit_ts": None,
            "index": 0,
        },
    }


def test_message_utf8_and_empty_content() -> None:
    router = _router(message_subject="events.{prefix}")
    out = router.route_message(_message("h\u00e9llo \u2603".encode()))
    assert out is not None
    assert out.subject == "events.app"
    body = orjson.loads(out.body)
    assert (body["content"], body["content_encoding"]) == ("h\u00e9llo \u2603", "utf-8")

    out = router.route_message(_message(b"", prefix=""))
    assert out is not None
    assert out.subject == "events._"
    body = orjson.loads(out.body)
    assert (body["content"], body["content_encoding"]) == ("", "utf-8")


def test_message_truncated_utf8_is_base64() -> None:
    out = _router().route_message(_message("\u2603".encode()[:2]))
    assert out is not None
    body = orjson.loads(out.body)
    assert (body["content"], body["content_encoding"]) == ("4pg=", "base64")
