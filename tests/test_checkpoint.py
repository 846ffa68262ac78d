"""Tests for cdc_bridge.checkpoint: the confirmed LSN only covers fully acked transactions."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cdc_bridge.checkpoint import Checkpointer, TransactionTicket


class Calls:
    """Counts on_advance calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _checkpointer(start: int = 100) -> tuple[Checkpointer, Calls]:
    calls = Calls()
    return Checkpointer(start, on_advance=calls), calls


# --------------------------------------------------------------------------- examples


def test_initial_state() -> None:
    checkpointer, calls = _checkpointer(0x16B3748)
    assert checkpointer.confirmed_lsn == 0x16B3748
    assert checkpointer.idle is True
    assert calls.count == 0


def test_ticket_bookkeeping() -> None:
    checkpointer, _ = _checkpointer()
    ticket = checkpointer.begin()
    assert ticket == ticket
    assert (ticket.pending, ticket.end_lsn) == (0, None)
    checkpointer.published(ticket)
    checkpointer.published(ticket)
    assert (ticket.pending, ticket.end_lsn) == (2, None)
    checkpointer.commit(ticket, 300)
    assert (ticket.pending, ticket.end_lsn) == (2, 300)
    checkpointer.acked(ticket)
    assert (ticket.pending, ticket.end_lsn) == (1, 300)
    # Tickets compare by identity: two fresh ones are different.
    assert TransactionTicket() != TransactionTicket()


def test_commit_after_all_acks() -> None:
    checkpointer, calls = _checkpointer()
    ticket = checkpointer.begin()
    checkpointer.published(ticket)
    checkpointer.published(ticket)
    checkpointer.acked(ticket)
    checkpointer.acked(ticket)
    # Every message is acked but the transaction is still open: nothing to confirm.
    assert checkpointer.confirmed_lsn == 100
    assert checkpointer.idle is False
    assert calls.count == 0
    checkpointer.commit(ticket, 200)
    assert checkpointer.confirmed_lsn == 200
    assert checkpointer.idle is True
    assert calls.count == 1


def test_commit_before_acks() -> None:
    checkpointer, calls = _checkpointer()
    ticket = checkpointer.begin()
    for _ in range(3):
        checkpointer.published(ticket)
    checkpointer.commit(ticket, 200)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.acked(ticket)
    checkpointer.acked(ticket)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    assert checkpointer.idle is False
    checkpointer.acked(ticket)
    assert (checkpointer.confirmed_lsn, calls.count) == (200, 1)
    assert checkpointer.idle is True


def test_acks_interleaved_with_publishes() -> None:
    checkpointer, calls = _checkpointer()
    ticket = checkpointer.begin()
    checkpointer.published(ticket)
    checkpointer.acked(ticket)  # pending back to 0 while still open
    checkpointer.published(ticket)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.commit(ticket, 250)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.acked(ticket)
    assert (checkpointer.confirmed_lsn, calls.count) == (250, 1)


def test_later_transaction_acked_first_waits_for_the_earlier() -> None:
    checkpointer, calls = _checkpointer()
    first = checkpointer.begin()
    checkpointer.published(first)
    checkpointer.commit(first, 200)
    second = checkpointer.begin()
    checkpointer.published(second)
    checkpointer.commit(second, 300)

    checkpointer.acked(second)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    assert checkpointer.idle is False

    checkpointer.acked(first)
    # One move straight past both, one on_advance call.
    assert (checkpointer.confirmed_lsn, calls.count) == (300, 1)
    assert checkpointer.idle is True


def test_three_transactions_middle_blocks() -> None:
    checkpointer, calls = _checkpointer()
    tickets = []
    for end in (200, 300, 400):
        ticket = checkpointer.begin()
        checkpointer.published(ticket)
        checkpointer.commit(ticket, end)
        tickets.append(ticket)
    checkpointer.acked(tickets[0])
    assert (checkpointer.confirmed_lsn, calls.count) == (200, 1)
    checkpointer.acked(tickets[2])
    assert (checkpointer.confirmed_lsn, calls.count) == (200, 1)
    checkpointer.acked(tickets[1])
    assert (checkpointer.confirmed_lsn, calls.count) == (400, 2)


def test_open_transaction_blocks_later_ones() -> None:
    checkpointer, calls = _checkpointer()
    first = checkpointer.begin()
    checkpointer.published(first)
    checkpointer.acked(first)  # acked, not yet committed
    # (pgoutput never interleaves, but the bookkeeping must not depend on it)
    second = checkpointer.begin()
    checkpointer.commit(second, 300)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.commit(first, 200)
    assert (checkpointer.confirmed_lsn, calls.count) == (300, 1)


def test_empty_transaction_at_the_head_advances_at_commit() -> None:
    checkpointer, calls = _checkpointer()
    ticket = checkpointer.begin()
    assert checkpointer.idle is False
    checkpointer.commit(ticket, 150)
    assert (checkpointer.confirmed_lsn, calls.count) == (150, 1)
    assert checkpointer.idle is True


def test_empty_transaction_behind_a_pending_one_waits() -> None:
    checkpointer, calls = _checkpointer()
    busy = checkpointer.begin()
    checkpointer.published(busy)
    checkpointer.commit(busy, 200)
    empty = checkpointer.begin()
    checkpointer.commit(empty, 250)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.acked(busy)
    assert (checkpointer.confirmed_lsn, calls.count) == (250, 1)


def test_transaction_ending_at_or_before_confirmed_does_not_move() -> None:
    checkpointer, calls = _checkpointer(500)
    ticket = checkpointer.begin()
    checkpointer.commit(ticket, 400)  # replayed from before the confirmed position
    assert (checkpointer.confirmed_lsn, calls.count) == (500, 0)
    assert checkpointer.idle is True
    ticket = checkpointer.begin()
    checkpointer.commit(ticket, 500)
    assert (checkpointer.confirmed_lsn, calls.count) == (500, 0)
    assert checkpointer.idle is True


def test_keepalive_when_idle() -> None:
    checkpointer, calls = _checkpointer()
    checkpointer.keepalive(180)
    assert (checkpointer.confirmed_lsn, calls.count) == (180, 1)
    checkpointer.keepalive(180)  # same position: no move, no call
    assert (checkpointer.confirmed_lsn, calls.count) == (180, 1)
    checkpointer.keepalive(150)  # never backwards
    assert (checkpointer.confirmed_lsn, calls.count) == (180, 1)
    checkpointer.keepalive(0)
    assert (checkpointer.confirmed_lsn, calls.count) == (180, 1)
    checkpointer.keepalive(190)
    assert (checkpointer.confirmed_lsn, calls.count) == (190, 2)


def test_keepalive_ignored_while_a_transaction_is_open() -> None:
    checkpointer, calls = _checkpointer()
    ticket = checkpointer.begin()
    checkpointer.keepalive(500)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.published(ticket)
    checkpointer.commit(ticket, 200)
    checkpointer.keepalive(500)  # committed but awaiting its PubAck
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.acked(ticket)
    assert (checkpointer.confirmed_lsn, calls.count) == (200, 1)
    checkpointer.keepalive(500)
    assert (checkpointer.confirmed_lsn, calls.count) == (500, 2)


def test_transaction_after_keepalive_never_moves_backwards() -> None:
    checkpointer, calls = _checkpointer()
    checkpointer.keepalive(1000)
    ticket = checkpointer.begin()
    checkpointer.published(ticket)
    checkpointer.commit(ticket, 900)
    checkpointer.acked(ticket)
    assert (checkpointer.confirmed_lsn, calls.count) == (1000, 1)
    assert checkpointer.idle is True


def test_standalone_ticket() -> None:
    checkpointer, calls = _checkpointer()
    ticket = checkpointer.standalone(300)
    assert (ticket.pending, ticket.end_lsn) == (0, 300)
    checkpointer.published(ticket)
    assert checkpointer.idle is False
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.acked(ticket)
    assert (checkpointer.confirmed_lsn, calls.count) == (300, 1)
    assert checkpointer.idle is True


def test_standalone_waits_for_earlier_transaction() -> None:
    checkpointer, calls = _checkpointer()
    transaction = checkpointer.begin()
    checkpointer.published(transaction)
    checkpointer.commit(transaction, 200)
    message = checkpointer.standalone(250)
    checkpointer.published(message)
    checkpointer.acked(message)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.acked(transaction)
    assert (checkpointer.confirmed_lsn, calls.count) == (250, 1)


def test_standalone_blocks_later_transaction() -> None:
    checkpointer, calls = _checkpointer()
    message = checkpointer.standalone(150)
    checkpointer.published(message)
    transaction = checkpointer.begin()
    checkpointer.published(transaction)
    checkpointer.commit(transaction, 200)
    checkpointer.acked(transaction)
    assert (checkpointer.confirmed_lsn, calls.count) == (100, 0)
    checkpointer.acked(message)
    assert (checkpointer.confirmed_lsn, calls.count) == (200, 1)


def test_without_on_advance() -> None:
    checkpointer = Checkpointer(10)
    ticket = checkpointer.begin()
    checkpointer.published(ticket)
    checkpointer.commit(ticket, 20)
    checkpointer.acked(ticket)
    assert checkpointer.confirmed_lsn == 20
    checkpointer.keepalive(30)
    assert checkpointer.confirmed_lsn == 30


# --------------------------------------------------------------------------- random interleavings


@dataclass
class _Tx:
    ticket: TransactionTicket
    end_lsn: int
    to_publish: int
    published: int = 0
    acked: int = 0
    committed: bool = False

    @property
    def done(self) -> bool:
        return self.committed and self.acked == self.published


@dataclass
class _Model:
    initial: int
    transactions: list[_Tx] = field(default_factory=list)

    def expected(self) -> int:
        """End of the longest committed and fully acked prefix, else the initial LSN."""
        confirmed = self.initial
        for tx in self.transactions:
            if not tx.done:
                break
            confirmed = max(confirmed, tx.end_lsn)
        return confirmed


@settings(max_examples=300)
@given(
    initial=st.integers(min_value=0, max_value=10**6),
    publish_counts=st.lists(st.integers(min_value=0, max_value=4), max_size=8),
    data=st.data(),
)
def test_random_ack_order(initial: int, publish_counts: list[int], data: st.DataObject) -> None:
    """The WAL reader runs through the transactions in order (begin, publish each
    message, commit) while PubAcks for any published message arrive at random moments."""
    checkpointer, calls = _checkpointer(initial)
    model = _Model(initial)
    next_end = initial
    reader = 0  # index of the transaction the reader is in (or about to begin)
    previous = initial
    previous_calls = 0

    while True:
        current = model.transactions[reader] if reader < len(model.transactions) else None
        reader_can_move = reader < len(publish_counts)
        unacked = [tx for tx in model.transactions if tx.acked < tx.published]
        if not reader_can_move and not unacked:
            break
        if unacked and (not reader_can_move or data.draw(st.booleans(), label="ack?")):
            tx = data.draw(st.sampled_from(unacked), label="ack which")
            checkpointer.acked(tx.ticket)
            tx.acked += 1
        elif current is None:
            next_end += data.draw(st.integers(min_value=1, max_value=1000), label="tx size")
            model.transactions.append(_Tx(checkpointer.begin(), next_end, publish_counts[reader]))
        elif current.published < current.to_publish:
            checkpointer.published(current.ticket)
            current.published += 1
        else:
            checkpointer.commit(current.ticket, current.end_lsn)
            current.committed = True
            reader += 1

        expected = model.expected()
        assert checkpointer.confirmed_lsn == expected
        assert checkpointer.confirmed_lsn >= previous
        assert checkpointer.idle == all(tx.done for tx in model.transactions)
        # on_advance fires exactly when this one call moved the confirmed LSN.
        moved = checkpointer.confirmed_lsn != previous
        assert calls.count == previous_calls + (1 if moved else 0)
        previous = checkpointer.confirmed_lsn
        previous_calls = calls.count

    assert checkpointer.confirmed_lsn == (
        model.transactions[-1].end_lsn if publish_counts else initial
    )
    assert checkpointer.idle is True


class CheckpointerMachine(RuleBasedStateMachine):
    """Begin/publish/commit in WAL order, acks in any order, keepalives and standalone
    messages in between. The model: the confirmed LSN is the largest of the initial
    position, the end of the committed-and-acked prefix and every keepalive received
    while idle; on_advance fires exactly when the confirmed LSN changes."""

    @initialize(start=st.integers(min_value=0, max_value=10**9))
    def start(self, start: int) -> None:
        self.calls = Calls()
        self.checkpointer = Checkpointer(start, on_advance=self.calls)
        self.model = _Model(start)
        self.floor = start  # the largest keepalive confirmed while idle, or the start
        self.position = start  # WAL position of the reader
        self.open: _Tx | None = None
        self.last_confirmed = start
        self.last_calls = 0

    def _expected(self) -> int:
        return max(self.floor, self.model.expected())

    def _wal(self, size: int) -> int:
        self.position += size
        return self.position

    @precondition(lambda self: self.open is None)
    @rule()
    def begin(self) -> None:
        self.open = _Tx(self.checkpointer.begin(), end_lsn=0, to_publish=0)
        self.model.transactions.append(self.open)

    @precondition(lambda self: self.open is not None)
    @rule()
    def publish(self) -> None:
        assert self.open is not None
        self.checkpointer.published(self.open.ticket)
        self.open.published += 1

    @precondition(lambda self: self.open is not None)
    @rule(size=st.integers(min_value=1, max_value=5000))
    def commit(self, size: int) -> None:
        assert self.open is not None
        self.open.end_lsn = self._wal(size)
        self.open.committed = True
        self.checkpointer.commit(self.open.ticket, self.open.end_lsn)
        self.open = None

    @precondition(lambda self: self.open is None)
    @rule(size=st.integers(min_value=1, max_value=5000))
    def standalone_message(self, size: int) -> None:
        lsn = self._wal(size)
        ticket = self.checkpointer.standalone(lsn)
        tx = _Tx(ticket, end_lsn=lsn, to_publish=1, committed=True)
        self.model.transactions.append(tx)
        self.checkpointer.published(ticket)
        tx.published = 1

    @precondition(lambda self: any(tx.acked < tx.published for tx in self.model.transactions))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        unacked = [tx for tx in self.model.transactions if tx.acked < tx.published]
        tx = data.draw(st.sampled_from(unacked))
        self.checkpointer.acked(tx.ticket)
        tx.acked += 1

    @rule(size=st.integers(min_value=0, max_value=5000))
    def keepalive(self, size: int) -> None:
        wal_end = self._wal(size) if self.open is None else self.position
        idle = all(tx.done for tx in self.model.transactions)
        self.checkpointer.keepalive(wal_end)
        if idle:
            self.floor = max(self.floor, wal_end)

    @rule(back=st.integers(min_value=1, max_value=10**9))
    def stale_keepalive(self, back: int) -> None:
        # A keepalive behind the confirmed position must not move it backwards.
        self.checkpointer.keepalive(max(0, self.checkpointer.confirmed_lsn - back))

    @invariant()
    def confirmed_matches_model(self) -> None:
        confirmed = self.checkpointer.confirmed_lsn
        assert confirmed == self._expected()
        assert confirmed >= self.last_confirmed
        moved = confirmed != self.last_confirmed
        assert self.calls.count == self.last_calls + (1 if moved else 0)
        assert self.checkpointer.idle == all(tx.done for tx in self.model.transactions)
        self.last_confirmed = confirmed
        self.last_calls = self.calls.count


CheckpointerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
TestCheckpointerMachine = CheckpointerMachine.TestCase
