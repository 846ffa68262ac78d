"""The stream side of verify: read the tables' messages once and fold them per key.

Owns everything that touches the JetStream stream while verifying: the subject filters
of the tables, whether retention may have dropped part of the history
(:func:`history_note`), counting the messages to read, a fast header parser, and
:func:`fold_stream`, which reads them in stream order and applies those of this slot
committed at or before L (and seen by the snapshot) to each table's
:class:`~cdc_bridge.verify.fold.TableFold`. Separate from :mod:`.table`, the other
side of the comparison; the folding rules themselves are pure, in :mod:`.fold`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo

from cdc_bridge.admin import jetstream
from cdc_bridge.config import Settings
from cdc_bridge.errors import SinkError, first_line
from cdc_bridge.lsn import parse_lsn
from cdc_bridge.routing import SubjectTemplate
from cdc_bridge.sink import stream_subjects
from cdc_bridge.verify.fold import ROW_OPS, SnapshotVisibility, decode_op, decode_row
from cdc_bridge.verify.table import Target

__all__ = ["fold_stream", "history_note"]

#: Bytes of WAL before L in which a message's transaction is checked against the snapshot.
_VISIBILITY_WINDOW = 16 * 1024 * 1024


def _subject_filter(template: str, name: str) -> str:
    schema, table = name.split(".", 1)
    return SubjectTemplate(template).partial({"schema": schema, "table": table}).stream_filter


def history_note(info: StreamInfo) -> str | None:
    """Why the stream may no longer hold every message it was given, or None.

    Only streams with a limit (max_age, max_msgs, max_bytes, max_msgs_per_subject) drop
    messages by themselves; in a stream without one a missing message is a loss.
    """
    config, state = info.config, info.state
    limits = [
        f"{name} {value}"
        for name, value in (
            ("max_age", config.max_age),
            ("max_msgs", config.max_msgs),
            ("max_bytes", config.max_bytes),
            ("max_msgs_per_subject", config.max_msgs_per_subject),
        )
        if value is not None and value > 0
    ]
    if not limits:
        return None
    first = int(state.first_seq or 0)
    deleted = int(getattr(state, "num_deleted", 0) or 0)
    if first <= 1 and not deleted:
        return None
    dropped = f"its first {first - 1} messages" if first > 1 else "some messages"
    return (
        f"stream {config.name} no longer holds {dropped} ({', '.join(limits)}; first "
        f"sequence {first}): only keys whose state the stream still fully knows are "
        "compared; table rows without a message in it are counted as not comparable"
    )


def _fast_header_lines(raw: bytes) -> dict[str, str]:
    """``Name: Value`` lines of a header block: nats-py's own parser checks every
    character of every name, a third of the time verify spends reading the stream."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().decode("ascii", "replace")] = value.strip().decode("utf-8", "replace")
    return out


async def _count_matching(nc: NatsClient, stream: str, filters: Sequence[str]) -> int:
    """How many messages of ``stream`` are on ``filters`` now (a consumer's num_pending)."""
    js = nc.jetstream(timeout=10.0)
    name = f"cdc-bridge-verify-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=60.0,
        mem_storage=True,
        num_replicas=1,
        filter_subjects=list(filters),
    )
    try:
        await js.add_consumer(stream, config)
        try:
            info = await js.consumer_info(stream, name)
        finally:
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, name)
    except Exception as exc:
        raise SinkError(f"cannot read stream {stream!r}: {first_line(exc)}") from None
    return int(info.num_pending or 0)


async def fold_stream(
    nc: NatsClient,
    settings: Settings,
    tables: Mapping[str, Target],
    lsn: int,
    visibility: SnapshotVisibility,
) -> int:
    """Fold the tables' messages (commit LSN <= ``lsn``) into their folds; return how many
    messages were read.

    One ordered push consumer (flow-controlled, no acks) on the tables' subjects, from
    the start; the messages present when it starts are read, later ones are not needed
    (they are past L: the bridge had confirmed L before).
    """
    stream = settings.nats.stream
    slot_prefix = f"{settings.postgres.slot}:"
    envelope = settings.envelope.format
    # Only a transaction that commits while the snapshot is taken can be below L and not
    # in it: its commit LSN is within microseconds of L. Older messages are not checked,
    # so a 32-bit xid from before a wraparound can never be mistaken for a newer one.
    visibility_floor = max(0, lsn - _VISIBILITY_WINDOW)
    filters = list(stream_subjects(_subject_filter(settings.tables[n].subject, n) for n in tables))
    pending = await _count_matching(nc, stream, filters)
    if not pending:
        return 0

    def fold(msg: Msg) -> None:
        headers = msg.headers or {}
        if not headers.get("Nats-Msg-Id", "").startswith(slot_prefix):
            return  # another bridge's (or no bridge's) message
        target = tables.get(headers.get("Cdc-Table", ""))
        if target is None or headers.get("Cdc-Dead-Letter"):
            return
        commit = headers.get("Cdc-Commit-Lsn")
        if commit is None:
            return
        commit_lsn = parse_lsn(commit)
        if commit_lsn > lsn:
            return
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(body, dict):
            return
        op = headers.get("Cdc-Op") or decode_op(envelope, body)
        if op not in ROW_OPS:
            return
        event = decode_row(envelope, op, body, target.key_names)
        if (
            event.xid is not None
            and commit_lsn >= visibility_floor
            and not visibility.visible(event.xid)
        ):
            return  # committed while the snapshot was taken, not in it
        target.fold.apply(event)

    read = 0
    done = asyncio.Event()
    last: Msg | None = None

    async def on_message(msg: Msg) -> None:
        nonlocal read, last
        if done.is_set():
            return
        read += 1
        last = msg
        fold(msg)
        if read >= pending:
            done.set()

    if hasattr(nc, "_parse_header_lines"):
        nc._parse_header_lines = _fast_header_lines  # type: ignore[method-assign]
    try:
        sub = await jetstream.subscribe_ordered(nc, stream, filters, on_message, from_start=True)
    except Exception as exc:
        raise SinkError(f"cannot read stream {stream!r}: {first_line(exc)}") from None
    try:
        seen = -1
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await done.wait()
            if done.is_set():
                break
            if read == seen:
                # Nothing for 5 s: messages deleted (retention) since they were counted?
                if last is None or (last.metadata.num_pending or 0) == 0:
                    break
                raise SinkError(
                    f"reading stream {stream!r} stalled after {read} of {pending} messages"
                )
            seen = read
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return read
