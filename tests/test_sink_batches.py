"""The sink and the transaction publisher against a real nats-server: atomic batches,
chunking, the byte window, the read-back, and a re-sent batch rejected as a duplicate."""

from __future__ import annotations

import asyncio
from typing import Any

import nats as nats_client
import pytest
from nats.js.api import StreamConfig

from cdc_bridge.batching import TransactionPublisher
from cdc_bridge.checkpoint import Checkpointer, TransactionTicket
from cdc_bridge.config import NatsSettings
from cdc_bridge.errors import PublishError
from cdc_bridge.lsn import format_lsn
from cdc_bridge.readback import Position, is_stored, last_published, position_of, read_back
from cdc_bridge.router import OutgoingMessage
from cdc_bridge.sink import JetStreamSink, StreamSpec
from tests.fixtures.proxy import TcpProxy

pytestmark = pytest.mark.servers

SLOT = "s1"


def message(lsn: int, index: int, subject: str = "t.x", size: int = 10) -> OutgoingMessage:
    commit = format_lsn(lsn)
    return OutgoingMessage(
        subject,
        {
            "Nats-Msg-Id": f"{SLOT}:{commit}:{index}",
            "Cdc-Commit-Lsn": commit,
            "Cdc-Index": str(index),
        },
        b"x" * size,
    )


class Bridge:
    """A sink, a checkpointer and a publisher wired as the pipeline wires them."""

    def __init__(self, sink: JetStreamSink[TransactionTicket], checkpointer: Checkpointer) -> None:
        self.sink = sink
        self.checkpointer = checkpointer

    @classmethod
    async def open(
        cls,
        url: str,
        stream: str,
        *,
        atomic: bool = True,
        batch_size: int = 1000,
        create: bool = True,
        **sink_options: Any,
    ) -> Bridge:
        checkpointer = Checkpointer(0)
        sink: JetStreamSink[TransactionTicket] = await JetStreamSink.connect(
            NatsSettings(url=url),
            on_ack=lambda ticket, duplicate: checkpointer.acked(ticket),
            max_in_flight=sink_options.pop("max_in_flight", 1000),
            ack_timeout=sink_options.pop("ack_timeout", 10.0),
            **sink_options,
        )
        spec = StreamSpec(name=stream, subjects=("t.>",), create=create)
        await sink.ensure_stream(spec, atomic_batches=atomic)

        async def stored(subject: str, headers: dict[str, str]) -> bool:
            position = position_of(headers["Nats-Msg-Id"], SLOT)
            assert position is not None
            return await is_stored(sink.client, stream, subject, position, SLOT)

        sink.is_stored = stored
        bridge = cls(sink, checkpointer)
        bridge.batch_size = batch_size
        return bridge

    batch_size = 1000

    def publisher(self) -> TransactionPublisher:
        return TransactionPublisher(
            self.sink,
            self.checkpointer,
            atomic=self.sink.atomic_batches,
            batch_size=self.batch_size,
            batch_bytes=1 << 30,
        )

    async def transaction(
        self, publisher: TransactionPublisher, lsn: int, count: int, size: int = 10
    ) -> None:
        ticket = self.checkpointer.begin()
        for index in range(count):
            await publisher.add(message(lsn, index, size=size), ticket)
        await publisher.end(ticket)
        self.checkpointer.commit(ticket, lsn + 1)


async def stream_messages(url: str, stream: str) -> list[Any]:
    nc = await nats_client.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        return [await js.get_msg(stream, seq) for seq in range(1, info.state.last_seq + 1)]
    finally:
        await nc.close()


async def test_transactions_become_atomic_batches_chunked_at_the_batch_size(
    nats: Any, stream_name: str
) -> None:
    bridge = await Bridge.open(nats.url, stream_name, batch_size=4)
    try:
        assert bridge.sink.atomic_batches
        publisher = bridge.publisher()
        await bridge.transaction(publisher, 0x100, 1)  # a single message: no batch
        await bridge.transaction(publisher, 0x200, 10)  # chunks of 4, 4, 2
        assert await bridge.sink.drain(10)
        assert bridge.checkpointer.confirmed_lsn == 0x201
    finally:
        await bridge.sink.close()
    stored = await stream_messages(nats.url, stream_name)
    headers = [dict(m.headers) for m in stored]
    assert [h["Nats-Msg-Id"] for h in headers] == ["s1:0/100:0"] + [
        f"s1:0/200:{i}" for i in range(10)
    ]
    assert "Nats-Batch-Id" not in headers[0]
    batches = [h["Nats-Batch-Id"] for h in headers[1:]]
    assert batches[0] == batches[3] != batches[4] == batches[7] != batches[8] == batches[9]
    assert [h["Nats-Batch-Sequence"] for h in headers[1:]] == list("1234123412")
    assert [h.get("Nats-Batch-Commit") for h in headers[1:]] == [None, None, None, "1"] * 2 + [
        None,
        "1",
    ]


async def test_without_atomic_batches_messages_go_one_by_one(nats: Any, stream_name: str) -> None:
    bridge = await Bridge.open(nats.url, stream_name, atomic=False)
    try:
        assert not bridge.sink.atomic_batches
        await bridge.transaction(bridge.publisher(), 0x100, 3)
        assert await bridge.sink.drain(10)
        assert bridge.checkpointer.confirmed_lsn == 0x101
    finally:
        await bridge.sink.close()
    stored = await stream_messages(nats.url, stream_name)
    assert len(stored) == 3
    assert not any("Nats-Batch-Id" in m.headers for m in stored)


async def test_an_existing_stream_without_allow_atomic_falls_back(
    nats: Any, stream_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats_client.connect(nats.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=stream_name, subjects=["t.>"]))
    finally:
        await nc.close()
    bridge = await Bridge.open(nats.url, stream_name, create=False)
    try:
        assert not bridge.sink.atomic_batches
    finally:
        await bridge.sink.close()
    assert f"stream {stream_name} does not allow atomic batches" in caplog.text


async def test_a_resent_batch_rejected_as_duplicate_counts_as_acked_once_verified(
    nats: Any, stream_name: str
) -> None:
    first = await Bridge.open(nats.url, stream_name)
    try:
        await first.transaction(first.publisher(), 0x300, 5)
        assert await first.sink.drain(10)
    finally:
        await first.sink.close()
    # A restart that re-sends the same transaction inside the duplicate window:
    # JetStream rejects the whole batch (10201); it was stored, so it counts as acked.
    again = await Bridge.open(nats.url, stream_name)
    try:
        await again.transaction(again.publisher(), 0x300, 5)
        assert await again.sink.drain(10)
        assert again.checkpointer.confirmed_lsn == 0x301
        assert again.sink.duplicates == 5
    finally:
        await again.sink.close()
    assert len(await stream_messages(nats.url, stream_name)) == 5


async def test_a_duplicate_batch_that_was_not_stored_whole_fails(
    nats: Any, stream_name: str
) -> None:
    first = await Bridge.open(nats.url, stream_name)
    try:
        # Only the first two messages of a transaction made it (sent one by one).
        ticket = first.checkpointer.begin()
        publisher = TransactionPublisher(
            first.sink, first.checkpointer, atomic=False, batch_size=1000, batch_bytes=1 << 30
        )
        for index in range(2):
            await publisher.add(message(0x400, index), ticket)
        assert await first.sink.drain(10)
    finally:
        await first.sink.close()
    again = await Bridge.open(nats.url, stream_name)
    try:
        publisher = again.publisher()
        ticket = again.checkpointer.begin()
        for index in range(4):
            await publisher.add(message(0x400, index), ticket)
        await publisher.end(ticket)
        assert not await again.sink.drain(10)
        with pytest.raises(PublishError, match="duplicate message id, but its last message"):
            again.sink.raise_if_failed()
        assert again.checkpointer.confirmed_lsn == 0
    finally:
        await again.sink.close()


async def test_the_byte_window_bounds_what_awaits_a_puback(nats: Any, stream_name: str) -> None:
    host, port = nats.url.removeprefix("nats://").split(":")
    proxy = TcpProxy(host, int(port))
    bridge = await Bridge.open(
        proxy.url, stream_name, atomic=False, max_in_flight_bytes=10_000, ack_timeout=30
    )
    try:
        publisher = bridge.publisher()
        with proxy.holding_replies():
            ticket = bridge.checkpointer.begin()
            sent = 0

            async def publish_all() -> None:
                nonlocal sent
                for index in range(20):
                    await publisher.add(message(0x500, index, size=1000), ticket)
                    sent += 1

            task = asyncio.create_task(publish_all())
            await asyncio.sleep(1.0)
            # About 1,060 bytes each (body and headers): at most 9 fit in 10,000 bytes.
            assert sent == 9
            assert 9_000 < bridge.sink.in_flight_bytes <= 10_000
            assert not task.done()
        await asyncio.wait_for(task, 10)
        await publisher.end(ticket)
        bridge.checkpointer.commit(ticket, 0x501)
        assert await bridge.sink.drain(10)
        assert bridge.sink.in_flight_bytes == 0
        assert bridge.checkpointer.confirmed_lsn == 0x501
    finally:
        await bridge.sink.close()
        proxy.close()


async def test_read_back_finds_the_newest_message_of_its_own_slot(
    nats: Any, stream_name: str
) -> None:
    nc = await nats_client.connect(nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream_name, subjects=["a.>", "b.>", "hb"]))
        assert await last_published(nc, stream_name, ["a.>", "hb"], "s1") is None
        for subject, msg_id in [
            ("a.1", "s1:0/10:0"),
            ("a.2", "s1:0/10:1"),
            ("b.1", "s1:0/20:0"),  # our slot, but not on our subjects
            ("hb", "s1:0/15:m"),  # a heartbeat of ours
            ("a.3", "s2:1/0:0"),  # another slot on shared subjects
            ("hb", "s2:1/1:m"),
        ]:
            await js.publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id})
        assert await last_published(nc, stream_name, ["a.>", "hb"], "s1") == Position(0x15, -1)
        assert await last_published(nc, stream_name, ["a.>"], "s1") == Position(0x10, 1)
        assert await last_published(nc, stream_name, ["a.>", "hb"], "s2") == Position(
            0x1_0000_0001, -1
        )
        # A deleted message is skipped over.
        await js.delete_msg(stream_name, 2)
        assert await last_published(nc, stream_name, ["a.>"], "s1") == Position(0x10, 0)
        # Beyond the scan limit the read-back gives up (the duplicate window remains).
        assert await last_published(nc, stream_name, ["a.>"], "s1", scan_limit=1) is None
    finally:
        await nc.close()


async def test_read_back_lists_what_is_stored_since_the_confirmed_lsn(
    nats: Any, stream_name: str
) -> None:
    nc = await nats_client.connect(nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream_name, subjects=["a.>"]))
        # (0x20, 1) is missing: JetStream refused it, the next ones were stored.
        for msg_id in ["s1:0/5:0", "s1:0/10:0", "s1:0/10:1", "s1:0/20:0", "s1:0/30:0"]:
            await js.publish("a.x", b"{}", headers={"Nats-Msg-Id": msg_id})
        found = await read_back(nc, stream_name, ["a.>"], "s1", since_lsn=0x10)
        assert found is not None
        assert found.newest == Position(0x30, 0)
        assert found.complete
        assert found.holds(Position(0x10, 0)) is True
        assert found.holds(Position(0x20, 0)) is True
        assert found.holds(Position(0x20, 1)) is False  # the gap: re-send it
        assert found.holds(Position(0x30, 0)) is True
        assert found.holds(Position(0x30, 1)) is None  # never published
        # A walk cut short by the scan limit trusts the stream's order beyond it.
        short = await read_back(nc, stream_name, ["a.>"], "s1", since_lsn=0x10, scan_limit=2)
        assert short is not None
        assert not short.complete
        assert short.oldest == Position(0x20, 0)
        assert short.holds(Position(0x10, 1)) is True
        assert short.holds(Position(0x20, 1)) is False
    finally:
        await nc.close()


async def test_consecutive_transactions_share_a_batch_and_a_big_one_starts_its_own(
    nats: Any, stream_name: str
) -> None:
    bridge = await Bridge.open(nats.url, stream_name, batch_size=4)
    try:
        publisher = bridge.publisher()
        tickets = []
        for lsn, count in ((0x100, 1), (0x200, 2), (0x300, 1), (0x400, 6)):
            ticket = bridge.checkpointer.begin()
            tickets.append(ticket)
            for index in range(count):
                await publisher.add(message(lsn, index), ticket)
            await publisher.end(ticket, flush=False)  # the reader flushes when idle
            bridge.checkpointer.commit(ticket, lsn + 1)
            if lsn == 0x300:
                await asyncio.sleep(0.2)
                # Three transactions, no batch committed yet: nothing may be confirmed.
                assert bridge.checkpointer.confirmed_lsn == 0
        await publisher.flush()
        assert await bridge.sink.drain(10)
        assert bridge.checkpointer.confirmed_lsn == 0x401
        assert all(t.pending == 0 for t in tickets)
    finally:
        await bridge.sink.close()
    headers = [dict(m.headers) for m in await stream_messages(nats.url, stream_name)]
    ids = [h["Nats-Msg-Id"].removeprefix("s1:0/") for h in headers]
    assert ids == ["100:0", "200:0", "200:1", "300:0", *(f"400:{i}" for i in range(6))]
    batches = [h["Nats-Batch-Id"] for h in headers]
    # The three small transactions (4 messages) fill one batch; the 6-message one is
    # bigger than a batch: it starts a batch of its own and is cut at 4.
    assert batches[0] == batches[3] != batches[4] == batches[7] != batches[8] == batches[9]
    assert [h["Nats-Batch-Sequence"] for h in headers] == list("1234123412")
    assert [h.get("Nats-Batch-Commit") for h in headers] == [None, None, None, "1"] * 2 + [
        None,
        "1",
    ]


async def test_a_small_transaction_that_does_not_fit_waits_for_the_next_batch(
    nats: Any, stream_name: str
) -> None:
    bridge = await Bridge.open(nats.url, stream_name, batch_size=4)
    try:
        publisher = bridge.publisher()
        for lsn, count in ((0x100, 3), (0x200, 2)):
            ticket = bridge.checkpointer.begin()
            for index in range(count):
                await publisher.add(message(lsn, index), ticket)
            await publisher.end(ticket, flush=False)
            bridge.checkpointer.commit(ticket, lsn + 1)
        await publisher.flush()
        assert await bridge.sink.drain(10)
        assert bridge.checkpointer.confirmed_lsn == 0x201
    finally:
        await bridge.sink.close()
    headers = [dict(m.headers) for m in await stream_messages(nats.url, stream_name)]
    batches = [h["Nats-Batch-Id"] for h in headers]
    # 3 + 2 > 4: the second transaction is not split across batches.
    assert batches[0] == batches[2] != batches[3] == batches[4]
    assert [h.get("Nats-Batch-Commit") for h in headers] == [None, None, "1", None, "1"]
