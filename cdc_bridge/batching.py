"""Transactions → JetStream publishes: whole transactions in atomic batches, or singles.

With atomic batches (ADR-50) a transaction's messages become visible in the stream
together, so a consumer never sees half of it. An atomic batch costs the server a few
milliseconds to commit, one at a time per stream, so one batch per transaction caps a
stream at a few hundred transactions per second. Consecutive transactions therefore
share a batch: a transaction's messages are collected until its end (at most one batch's
worth, so memory stays bounded), then appended to the open batch if they fit, else the
open batch is committed first. The reader commits the open batch whenever it has to wait
for more WAL, between transactions: under load batches fill up, when quiet every
transaction goes out at once. A batch never holds part of a transaction that would fit
in one.

The batch's last message carries ``Nats-Batch-Commit``, so one message is always held
back until the next one (or the commit) decides its headers. A batch of one message
needs no batch headers (a single message is already atomic).

A transaction larger than ``batch_size`` messages (the server allows 1,000), or than
``batch_bytes``, is sent in chunks as it arrives: each chunk is atomic, the transaction
as a whole is not; exactly-once still holds, because every message keeps its
deterministic ``Nats-Msg-Id`` and the read-back position covers chunk boundaries.

One PubAck acknowledges every transaction in its batch (:class:`TicketGroup`).

Members are encoded as they are placed and written to NATS in runs (a transaction's
members at its end, or every :data:`SEND_RUN` messages while a big one is chunked), one
write per run instead of one per message; the commit always follows its members.
"""

from __future__ import annotations

import uuid

from cdc_bridge.checkpoint import Checkpointer, TicketGroup, TransactionTicket
from cdc_bridge.router import OutgoingMessage
from cdc_bridge.sink import BATCH_HEADER_BYTES, JetStreamSink

__all__ = ["TransactionPublisher"]

#: Batch members encoded but not yet written at most (a write each run).
SEND_RUN = 256


class TransactionPublisher:
    def __init__(
        self,
        sink: JetStreamSink[TransactionTicket],
        checkpointer: Checkpointer,
        *,
        atomic: bool,
        batch_size: int,
        batch_bytes: int,
    ) -> None:
        self._sink = sink
        self._checkpointer = checkpointer
        self._atomic = atomic
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        # The open batch: members sent, and the last message, held back.
        self._batch_id: str | None = None
        self._members = 0
        self._member_bytes = 0
        self._held: OutgoingMessage | None = None
        self._group: list[TransactionTicket] = []  # transactions in it, each published once
        # The open transaction's messages, not placed yet (it may still fit a batch).
        self._collected: list[OutgoingMessage] = []
        self._collected_bytes = 0
        self._chunking = False  # the open transaction outgrew a batch: sent as it comes
        # Members of the open batch encoded and counted, not written yet.
        self._frames: list[bytes] = []
        self._unsent: list[OutgoingMessage] = []
        self._unsent_bytes = 0

    @property
    def atomic(self) -> bool:
        return self._atomic

    async def add(self, message: OutgoingMessage, ticket: TransactionTicket) -> None:
        """Publish ``message`` of the open transaction ``ticket`` (perhaps later)."""
        if not self._atomic:
            self._checkpointer.published(ticket)
            await self._sink.publish(message.subject, message.body, message.headers, ticket)
            return
        if self._chunking:
            await self._place([message], ticket)
            return
        self._collected.append(message)
        self._collected_bytes += len(message.body) + BATCH_HEADER_BYTES
        if len(self._collected) >= self._batch_size or self._collected_bytes >= self._batch_bytes:
            # Too big for one batch: the open one goes first, then this one in chunks.
            await self.flush()
            self._chunking = True
            await self._place(self._take_collected(), ticket)

    async def end(self, ticket: TransactionTicket, *, flush: bool = True) -> None:
        """The transaction is complete: place it in the open batch; commit that if ``flush``."""
        if not self._atomic:
            return
        if self._chunking:
            self._chunking = False
        else:
            collected_bytes = self._collected_bytes
            collected = self._take_collected()
            if collected and not self._fits(len(collected), collected_bytes):
                await self.flush()
            await self._place(collected, ticket)
        await self._send()
        if flush:
            await self.flush()

    async def flush(self) -> None:
        """Commit the open batch (or send its one message), if there is one."""
        await self._send()
        held, self._held = self._held, None
        if held is None:
            return
        group, self._group = self._group, []
        ticket = (
            group[0]
            if len(group) == 1
            else TicketGroup(commit_time=max(t.commit_time for t in group), members=tuple(group))
        )
        if self._batch_id is None:
            await self._sink.publish(held.subject, held.body, held.headers, ticket)
            return
        headers = held.headers
        headers["Nats-Batch-Id"] = self._batch_id
        headers["Nats-Batch-Sequence"] = str(self._members + 1)
        headers["Nats-Batch-Commit"] = "1"
        batch = (self._members, self._member_bytes)
        # Under half a batch: a live trickle, where fewer batches in flight keep latency low.
        small = 2 * (self._members + 1) < self._batch_size and (
            2 * self._member_bytes < self._batch_bytes
        )
        self._batch_id = None
        self._members = self._member_bytes = 0
        await self._sink.publish(held.subject, held.body, headers, ticket, batch=batch, small=small)

    def _take_collected(self) -> list[OutgoingMessage]:
        collected, self._collected = self._collected, []
        self._collected_bytes = 0
        return collected

    def _fits(self, count: int, size: int) -> bool:
        """Whether ``count`` messages of ``size`` bytes (bodies and batch headers, as
        collected) can join the open batch."""
        held = self._held
        if held is None:
            return True
        count += self._members + 1
        size += self._member_bytes + len(held.body) + BATCH_HEADER_BYTES
        return count <= self._batch_size and size < self._batch_bytes

    async def _place(self, messages: list[OutgoingMessage], ticket: TransactionTicket) -> None:
        """Append ``messages`` to the open batch, one by one: the held one becomes a
        member first, or commits the batch when it is full."""
        for message in messages:
            held = self._held
            if held is not None:
                sequence = self._members + 1
                full = (
                    sequence >= self._batch_size
                    or self._member_bytes + len(held.body) + BATCH_HEADER_BYTES >= self._batch_bytes
                )
                if full:
                    await self.flush()
                else:
                    if self._batch_id is None:
                        await self._sink.open_batch()
                        self._batch_id = uuid.uuid4().hex
                    headers = held.headers
                    headers["Nats-Batch-Id"] = self._batch_id
                    headers["Nats-Batch-Sequence"] = str(sequence)
                    frame, size = self._sink.encode_member(held.subject, held.body, headers)
                    self._frames.append(frame)
                    self._unsent.append(held)
                    self._unsent_bytes += size
                    self._member_bytes += size
                    self._members = sequence
                    if len(self._frames) >= SEND_RUN:
                        await self._send()
            self._held = message
            if not self._group or self._group[-1] is not ticket:
                self._checkpointer.published(ticket)
                self._group.append(ticket)

    async def _send(self) -> None:
        """Write the members encoded so far (before anything else goes out)."""
        if self._frames:
            frames, self._frames = self._frames, []
            unsent, self._unsent = self._unsent, []
            size, self._unsent_bytes = self._unsent_bytes, 0
            await self._sink.send_members(frames, size, unsent)
