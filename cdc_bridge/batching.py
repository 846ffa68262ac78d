"""Transaction → JetStream publishes: one atomic batch per transaction, or single messages.

With atomic batches (ADR-50) a transaction's messages become visible in the stream
together, so a consumer never sees half of it. The batch's last message carries
``Nats-Batch-Commit``, but the last message of a transaction is only known at its
Commit; so each message is held back until the next one arrives (or the transaction
ends), which keeps memory at one message instead of a whole transaction.

A transaction of one message needs no batch (a single message is already atomic). A
transaction larger than ``batch_size`` messages (the server allows 1,000), or whose
batch grows past ``batch_bytes``, is committed in chunks: each chunk is atomic, the
transaction as a whole is not; exactly-once still holds, because every message keeps
its deterministic ``Nats-Msg-Id`` and the read-back position covers chunk boundaries.
"""

from __future__ import annotations

import uuid

from cdc_bridge.checkpoint import Checkpointer, TransactionTicket
from cdc_bridge.router import OutgoingMessage
from cdc_bridge.sink import BATCH_HEADER_BYTES, JetStreamSink

__all__ = ["TransactionPublisher"]


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
        self._held: OutgoingMessage | None = None
        self._batch_id: str | None = None
        self._members = 0  # sent in the open batch, without the commit
        self._member_bytes = 0

    @property
    def atomic(self) -> bool:
        return self._atomic

    async def add(self, message: OutgoingMessage, ticket: TransactionTicket) -> None:
        """Publish ``message`` of the open transaction ``ticket`` (perhaps a bit later)."""
        if not self._atomic:
            await self._single(message, ticket)
            return
        held, self._held = self._held, message
        if held is None:
            return
        if self._batch_id is None:
            await self._sink.open_batch()
            self._batch_id = uuid.uuid4().hex
        sequence = self._members + 1
        full = (
            sequence >= self._batch_size
            or self._member_bytes + len(held.body) + BATCH_HEADER_BYTES >= self._batch_bytes
        )
        if full:
            await self._commit(held, ticket)
        else:
            headers = held.headers
            headers["Nats-Batch-Id"] = self._batch_id
            headers["Nats-Batch-Sequence"] = str(sequence)
            self._member_bytes += await self._sink.publish_batch_member(
                held.subject, held.body, headers
            )
            self._members = sequence

    async def end(self, ticket: TransactionTicket) -> None:
        """The transaction is complete: send what is held, committing the open batch."""
        held, self._held = self._held, None
        if held is None:
            return
        if self._batch_id is None:
            await self._single(held, ticket)
        else:
            await self._commit(held, ticket)

    async def _commit(self, message: OutgoingMessage, ticket: TransactionTicket) -> None:
        assert self._batch_id is not None
        headers = message.headers
        headers["Nats-Batch-Id"] = self._batch_id
        headers["Nats-Batch-Sequence"] = str(self._members + 1)
        headers["Nats-Batch-Commit"] = "1"
        batch = (self._members, self._member_bytes)
        self._batch_id = None
        self._members = self._member_bytes = 0
        self._checkpointer.published(ticket)
        await self._sink.publish(message.subject, message.body, headers, ticket, batch=batch)

    async def _single(self, message: OutgoingMessage, ticket: TransactionTicket) -> None:
        self._checkpointer.published(ticket)
        await self._sink.publish(message.subject, message.body, message.headers, ticket)
