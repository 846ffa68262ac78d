"""Pure parts of resuming: read-back positions and the reconnect backoff."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from cdc_bridge.config import ReconnectSettings
from cdc_bridge.lsn import format_lsn
from cdc_bridge.pipeline import Backoff
from cdc_bridge.readback import Position, position_of

lsns = st.integers(min_value=0, max_value=(1 << 64) - 1)
indexes = st.integers(min_value=0, max_value=10**7)


@given(lsns, indexes)
def test_a_message_id_gives_back_its_position(lsn: int, index: int) -> None:
    assert position_of(f"slot_1:{format_lsn(lsn)}:{index}", "slot_1") == Position(lsn, index)
    assert position_of(f"slot_1:{format_lsn(lsn)}:m", "slot_1") == Position(lsn, -1)


def test_ids_of_other_slots_and_foreign_ids_have_no_position() -> None:
    assert position_of("slot_2:0/10:0", "slot_1") is None
    assert position_of("slot_10:0/10:0", "slot_1") is None  # a prefix is not the slot
    for foreign in ["", "slot_1", "slot_1:", "slot_1:0/10", "slot_1:xyz:0", "slot_1:0/10:-2"]:
        assert position_of(foreign, "slot_1") is None, foreign
    assert position_of("slot_1:0/10:x", "slot_1") is None


@given(lsns, st.integers(min_value=-1, max_value=10**6), lsns, st.integers(-1, 10**6))
def test_positions_order_like_the_wal(lsn_a: int, index_a: int, lsn_b: int, index_b: int) -> None:
    a, b = Position(lsn_a, index_a), Position(lsn_b, index_b)
    assert (a < b) == ((lsn_a, index_a) < (lsn_b, index_b))


def test_a_standalone_message_sorts_before_a_transaction_committing_at_its_lsn() -> None:
    # Sent when decoded, so before any transaction whose commit comes at or after it.
    assert Position(0x10, -1) < Position(0x10, 0) < Position(0x10, 1) < Position(0x11, -1)
    assert str(Position(0x10, -1)) == "0/10#m"
    assert str(Position(0x1_0000_0010, 3)) == "1/10#3"


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(ReconnectSettings(initial_delay=0.5, max_delay=4), random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 4, 4, 4, 4]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered, not a fixed ladder
    backoff.reset()
    assert 0.25 <= backoff.next_delay() <= 0.5


def test_backoff_never_overflows_after_many_attempts() -> None:
    backoff = Backoff(ReconnectSettings(initial_delay=0.1, max_delay=30))
    for _ in range(10_000):
        assert 0 < backoff.next_delay() <= 30


def test_transaction_markers_frame_their_transaction_in_position_order() -> None:
    begin = position_of("s:0/20:B", "s")
    commit = position_of("s:0/20:C", "s")
    assert begin is not None
    assert commit is not None
    # A standalone message decoded at the same LSN, the changes, then C; then the next
    # transaction.
    assert begin < Position(0x20, -1) < Position(0x20, 0) < Position(0x20, 10**9) < commit
    assert commit < Position(0x21, -2) < Position(0x21, -1)
    assert (str(begin), str(commit)) == ("0/20#B", "0/20#C")
    assert position_of("s:0/20:schema-16384-0", "s") is None  # events have no position
