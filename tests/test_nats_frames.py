"""The sink's own HPUB frames are byte for byte what nats-py's ``publish`` would send."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from cdc_bridge.nats_connection import BadHeaderError, encode_hpub, frame_payload_size


def nats_py_frame(subject: str, headers: dict[str, str], body: bytes, reply: str = "") -> bytes:
    """The frame nats-py's Client.publish builds (captured before it is queued)."""

    async def capture() -> bytes:
        client = Client()
        frames: list[bytes] = []

        async def send_command(cmd: bytes, priority: bool = False) -> None:
            frames.append(cmd)

        client._send_command = send_command  # type: ignore[method-assign]
        client._flush_queue = None
        await client._send_publish(subject, reply, body, len(body), headers)
        return frames[0]

    frame = asyncio.run(capture())
    # nats-py writes an empty reply as a second space; the protocol allows either.
    return frame.replace(f"HPUB {subject}  ".encode(), f"HPUB {subject} ".encode(), 1)


ROUTER_HEADERS = {
    "Nats-Msg-Id": "slot:0/16B3748:12",
    "Cdc-Op": "insert",
    "Cdc-Table": "public.conversations",
    "Cdc-Commit-Lsn": "0/16B3748",
    "Cdc-Index": "12",
    "Nats-Batch-Id": "9f1c2b7e0d4a4b8f9a6e1d2c3b4a5f60",
    "Nats-Batch-Sequence": "13",
}


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.7"])
def test_the_headers_the_router_sets_encode_like_nats_py(reply: str) -> None:
    frame = encode_hpub("messages.abc", ROUTER_HEADERS, b'{"op":"insert"}', reply)
    assert frame == nats_py_frame("messages.abc", ROUTER_HEADERS, b'{"op":"insert"}', reply)
    assert frame_payload_size(frame) == len(frame) - frame.index(b"\r\n") - 4


@pytest.mark.parametrize(
    "value",
    [" leading", "trailing\t", "in side", "line\r\nbreak", "lone\rcr", "lone\nlf", "", "\u2003x"],
)
def test_values_nats_py_would_change_are_changed_the_same_way(value: str) -> None:
    headers = {"Cdc-Table": value, "Nats-Msg-Id": "s:0/1:0"}
    assert encode_hpub("a.b", headers, b"x") == nats_py_frame("a.b", headers, b"x")


@given(
    headers=st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True),
        st.text(max_size=40),
        max_size=8,
    ),
    body=st.binary(max_size=200),
)
def test_any_headers_encode_like_nats_py(headers: dict[str, str], body: bytes) -> None:
    assert encode_hpub("t.x", headers, body) == nats_py_frame("t.x", headers, body)


def test_a_bad_subject_or_header_key_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="invalid NATS subject"):
        encode_hpub("a b", {}, b"")
    with pytest.raises(ValueError, match="invalid NATS subject"):
        encode_hpub("a.b", {}, b"", "in box")
    with pytest.raises(BadHeaderError):
        encode_hpub("a.b", {"bad key": "v"}, b"")
