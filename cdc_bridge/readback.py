"""Read-back: where in the WAL the last message this bridge stored in its stream came from.

Every message carries ``Nats-Msg-Id: <slot>:<commit_lsn>:<index>`` (``<slot>:<lsn>:m``
for a non-transactional logical message). Messages reach the stream in WAL order, so
the newest message of our slot names the last change already stored: after a crash or
a reconnect everything at or before it is skipped, which keeps exactly-once beyond
JetStream's duplicate window.

Several bridges (other slots) may share a stream. The read-back asks the server for the
newest message on *our* subjects (an ephemeral consumer with ``deliver_policy: last``
and our subject filters), then, if that one belongs to another slot (subjects shared
between bridges), walks back message by message, at most ``scan_limit`` messages.
Bridges that share a stream should use disjoint subject prefixes: then the first answer
is always ours.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import NotFoundError

from cdc_bridge.errors import SinkError, first_line
from cdc_bridge.lsn import format_lsn, parse_lsn
from cdc_bridge.routing import subject_is_covered

__all__ = ["Position", "ReadBack", "is_stored", "last_published", "position_of", "read_back"]

log = logging.getLogger(__name__)

#: Messages walked back at most when the newest message on our subjects is another
#: slot's; past that, the duplicate window alone protects against re-sends.
SCAN_LIMIT = 10_000


#: Positions of wal2json's transaction markers (``<slot>:<commit_lsn>:B`` and ``:C``):
#: B before everything of its transaction, C after its last change.
BEGIN_MARKER_INDEX = -2
COMMIT_MARKER_INDEX = 1 << 62
_SPECIAL_INDEXES = {"m": -1, "B": BEGIN_MARKER_INDEX, "C": COMMIT_MARKER_INDEX}


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A message's place in the WAL order: (commit LSN, index in the transaction).

    A non-transactional logical message has index -1: it is sent when decoded, before
    the transaction that may be open around it, whose commit LSN is not smaller.
    """

    lsn: int
    index: int

    def __str__(self) -> str:
        names = {-1: "m", BEGIN_MARKER_INDEX: "B", COMMIT_MARKER_INDEX: "C"}
        return f"{format_lsn(self.lsn)}#{names.get(self.index, self.index)}"


def position_of(msg_id: str, slot: str) -> Position | None:
    """The position in a ``Nats-Msg-Id`` written for ``slot``; None if another's or not ours."""
    prefix, _, rest = msg_id.partition(":")
    if prefix != slot:
        return None
    lsn_text, _, index_text = rest.partition(":")
    try:
        lsn = parse_lsn(lsn_text)
    except ValueError:
        return None
    index = _SPECIAL_INDEXES.get(index_text)
    if index is None:
        if not (index_text.isascii() and index_text.isdigit()):
            return None  # not a change position (e.g. a schema-change event)
        index = int(index_text)
    return Position(lsn, index)


@dataclass(frozen=True, slots=True)
class ReadBack:
    """What the stream holds of this slot's recent messages.

    ``stored`` has every position of ours found between the newest message and
    ``since_lsn``. Normally that is every position up to ``newest``; but JetStream may
    have refused a message (a size limit, a permission) and stored the ones published
    right after it, and such a gap must be re-sent rather than skipped.
    """

    newest: Position
    stored: frozenset[Position]
    #: Oldest position walked back to; older ones were not looked at.
    oldest: Position
    complete: bool  # the walk reached since_lsn (or the start of the stream)

    def holds(self, position: Position) -> bool | None:
        """True/False if known; None for a position after ``newest`` (not published)."""
        if position > self.newest:
            return None
        if position in self.stored:
            return True
        # Older than the walk reached: the order of the stream says it is there.
        return not self.complete and position < self.oldest


async def read_back(
    nc: NatsClient,
    stream: str,
    subjects: Sequence[str],
    slot: str,
    *,
    since_lsn: int | None = None,
    scan_limit: int = SCAN_LIMIT,
    timeout: float = 5.0,  # noqa: ASYNC109 - each request is bounded
) -> ReadBack | None:
    """This slot's messages in ``stream``, walking back from the newest to ``since_lsn``.

    With ``since_lsn`` None only the newest is looked for. None if the stream holds no
    message of ``slot`` (among the last ``scan_limit`` on its subjects).
    """
    js = nc.jetstream(timeout=timeout)
    stored: set[Position] = set()
    newest: Position | None = None
    oldest: Position | None = None
    complete = False
    floor = False  # reached this slot's initial snapshot: nothing of it is older
    snapshot_prefix = f"{slot}:snapshot:"
    try:
        top = await _newest_sequence(nc, stream, subjects, timeout)
        if top is None:
            return None
        bottom = max(0, top - scan_limit)
        for seq in range(top, bottom, -1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue  # deleted or expired
            if not subject_is_covered(msg.subject or "", subjects):
                continue
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            position = position_of(msg_id, slot)
            if position is None:
                if msg_id.startswith(snapshot_prefix):
                    # The slot streams only after its snapshot is complete: every change
                    # of it in the stream is newer than its snapshot rows.
                    floor = complete = True
                    break
                continue
            if since_lsn is None or position.lsn < since_lsn:
                complete = since_lsn is not None
                if newest is None:
                    newest = oldest = position
                    stored.add(position)
                break
            newest = newest or position
            oldest = position
            stored.add(position)
        else:
            complete = bottom == 0
    except SinkError:
        raise
    except Exception as exc:
        raise SinkError(f"cannot read back the stream {stream!r}: {first_line(exc)}") from None
    if newest is None or oldest is None:
        if floor:
            return None
        log.warning(
            "no message of slot %s among the last %d messages on its subjects in stream %s: "
            "relying on the duplicate window alone (give each bridge its own subjects)",
            slot,
            scan_limit,
            stream,
        )
        return None
    return ReadBack(newest, frozenset(stored), oldest, complete)


async def last_published(
    nc: NatsClient,
    stream: str,
    subjects: Sequence[str],
    slot: str,
    *,
    scan_limit: int = SCAN_LIMIT,
) -> Position | None:
    """The position of the newest message of ``slot`` in ``stream``; None if it has none."""
    found = await read_back(nc, stream, subjects, slot, scan_limit=scan_limit)
    return None if found is None else found.newest


async def _newest_sequence(
    nc: NatsClient,
    stream: str,
    subjects: Sequence[str],
    timeout: float,  # noqa: ASYNC109
) -> int | None:
    """Stream sequence of the newest message on ``subjects``, asked of the server."""
    js = nc.jetstream(timeout=timeout)
    name = f"cdc-bridge-readback-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.LAST,
        ack_policy=AckPolicy.NONE,
        filter_subjects=list(subjects),
        inactive_threshold=60.0,
        mem_storage=True,
        num_replicas=1,
    )
    await js.add_consumer(stream, config)
    try:
        info = await js.consumer_info(stream, name)
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
    if not info.num_pending or info.delivered is None:
        return None
    # A new consumer with deliver_policy "last" starts at the newest matching message
    # and reports the sequence just before it as delivered.
    return int(info.delivered.stream_seq or 0) + 1


async def is_stored(
    nc: NatsClient,
    stream: str,
    subject: str,
    position: Position,
    slot: str,
    timeout: float = 5.0,  # noqa: ASYNC109
    scan_limit: int = SCAN_LIMIT,
) -> bool:
    """Whether the message at ``position`` (published to ``subject``) is in the stream.

    Used when JetStream rejects a re-sent atomic batch as a duplicate: the batch's last
    message, or a later one of ours on its subject, proves that the batch was committed.
    """
    js = nc.jetstream(timeout=timeout)
    try:
        last = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return False
    # Walk back over messages on the subject that are not positions of ours (another
    # slot's, a verify repair) to the newest one that is.
    msg: RawStreamMsg | None = last
    seq = last.seq or 0
    for _ in range(scan_limit):
        if msg is not None and msg.subject == subject:
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            found = position_of(msg_id, slot)
            if found is not None:
                return found >= position
            if msg_id.startswith(f"{slot}:snapshot:"):
                return False  # its snapshot: every change of the slot is newer
        seq -= 1
        if seq < 1:
            return False
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            msg = None  # deleted or expired
    return False
