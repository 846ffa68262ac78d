"""is_stored (the check behind a re-sent atomic batch rejected as a duplicate) against a
real nats-server: other messages on the same subject must not hide ours."""

from __future__ import annotations

from typing import Any

import nats as nats_client
import pytest
from nats.js.api import StreamConfig

from cdc_bridge.readback import Position, is_stored

pytestmark = pytest.mark.servers


async def test_is_stored_walks_back_past_messages_that_are_not_our_positions(
    nats: Any, stream_name: str
) -> None:
    nc = await nats_client.connect(nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream_name, subjects=["a.>"]))
        for subject, msg_id in [
            ("a.x", "s1:0/10:0"),
            ("a.x", "s1:0/10:1"),  # the batch's last message
            ("a.y", "s1:0/20:0"),  # ours, but on another subject
            ("a.x", "s2:0/90:0"),  # another slot's
            ("a.x", "s1:verify:0/95:public.t:0"),  # a verify repair
        ]:
            await js.publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id})
        await js.delete_msg(stream_name, 3)  # a gap in the walk
        assert await is_stored(nc, stream_name, "a.x", Position(0x10, 1), "s1")
        assert not await is_stored(nc, stream_name, "a.x", Position(0x10, 2), "s1")
        assert not await is_stored(nc, stream_name, "a.z", Position(0x10, 1), "s1")
        # Past the scan limit it does not know, so it says not stored (a clear failure).
        assert not await is_stored(nc, stream_name, "a.x", Position(0x10, 1), "s1", scan_limit=2)
        # This slot's snapshot rows end the walk: every change of it is newer.
        await js.publish("a.w", b"{}", headers={"Nats-Msg-Id": "s1:0/5:0"})
        await js.publish("a.w", b"{}", headers={"Nats-Msg-Id": "s1:snapshot:1:public.t:0:0"})
        assert not await is_stored(nc, stream_name, "a.w", Position(0x5, 0), "s1")
    finally:
        await nc.close()
