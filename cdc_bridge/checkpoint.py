"""Checkpointer: which LSN may be confirmed to PostgreSQL.

The confirmed (flush) LSN is a promise to PostgreSQL that everything before it is safe
and may be discarded. It therefore advances only to the end of the newest transaction
whose every message has a PubAck, and only contiguously: a later transaction acked
before an earlier one does not move it. When nothing is open or in flight, the server's
keepalive position may be confirmed, so a slot whose tables are idle does not pin WAL.

Pure bookkeeping: the pipeline tells it what was published and acked; the source asks
it what to confirm.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Checkpointer", "TicketGroup", "TransactionTicket"]


@dataclass(slots=True, eq=False)
class TransactionTicket:
    """One transaction's outstanding PubAcks; handed to the sink with each message."""

    pending: int = 0
    end_lsn: int | None = None  # set at commit; None while the transaction is open
    commit_time: float = 0.0  # unix time of the commit (for metrics); 0 if unknown


@dataclass(slots=True, eq=False)
class TicketGroup(TransactionTicket):
    """Several transactions published as one atomic batch: one PubAck acks them all."""

    members: tuple[TransactionTicket, ...] = ()


class Checkpointer:
    def __init__(self, confirmed_lsn: int, on_advance: Callable[[], None] | None = None) -> None:
        self._confirmed = confirmed_lsn
        self._open: deque[TransactionTicket] = deque()
        self._on_advance = on_advance

    @property
    def confirmed_lsn(self) -> int:
        return self._confirmed

    @property
    def idle(self) -> bool:
        """True when no transaction is open or awaiting acks."""
        return not self._open

    def begin(self) -> TransactionTicket:
        ticket = TransactionTicket()
        self._open.append(ticket)
        return ticket

    def published(self, ticket: TransactionTicket) -> None:
        ticket.pending += 1

    def acked(self, ticket: TransactionTicket) -> None:
        if type(ticket) is TicketGroup:
            for member in ticket.members:
                self.acked(member)
            return
        ticket.pending -= 1
        if ticket.pending == 0 and ticket.end_lsn is not None:
            self._advance()

    def commit(self, ticket: TransactionTicket, end_lsn: int) -> None:
        ticket.end_lsn = end_lsn
        if ticket.pending == 0:
            self._advance()

    def standalone(self, lsn: int) -> TransactionTicket:
        """A ticket for something outside any transaction (a non-transactional message)."""
        ticket = self.begin()
        ticket.end_lsn = lsn
        return ticket

    def keepalive(self, wal_end: int) -> None:
        """The server has sent everything before ``wal_end``; confirm it if nothing is open."""
        if not self._open and wal_end > self._confirmed:
            self._confirmed = wal_end
            if self._on_advance is not None:
                self._on_advance()

    def _advance(self) -> None:
        queue = self._open
        moved = False
        while queue and queue[0].pending == 0 and queue[0].end_lsn is not None:
            end_lsn = queue.popleft().end_lsn
            assert end_lsn is not None
            if end_lsn > self._confirmed:
                self._confirmed = end_lsn
                moved = True
        if moved and self._on_advance is not None:
            self._on_advance()
