"""JetStream sink: the only module that talks to NATS.

Publishing is pipelined: each message goes out with its own reply subject under one
wildcard inbox, and the PubAck comes back asynchronously. Up to ``max_in_flight``
messages and ``max_in_flight_bytes`` bytes may await their PubAck; past that,
``publish`` waits, which stops the pipeline from reading more WAL (backpressure, and
bounded memory). A PubAck resolves its message's ticket through the ``on_ack`` callback
given at construction, in whatever order acks arrive; an error reply or a missing PubAck
(``ack_timeout``) fails the sink, and nothing after the failure is confirmed to
PostgreSQL.

Atomic batches (ADR-50): ``open_batch`` reserves one of the stream's in-flight batches,
``encode_member`` / ``send_members`` send messages without a reply subject (the server
answers only the commit), many in one write, and the commit is an ordinary ``publish``
that also carries the members' size, so the window is released when the whole batch is
acked. A re-sent batch that JetStream rejects as containing a duplicate message id
(10201) counts as acked only once ``is_stored`` confirms that its last message is in the
stream.

nats-py's ``publish_async`` is not used: its futures have no timeout, so a PubAck lost
in a server restart would hang the bridge forever. Nor, on the hot path, is its
``publish``: the sink builds each HPUB frame itself (one string join, byte for byte what
nats-py would send) and hands a batch's members to nats-py's outgoing buffer in one go
(:class:`~cdc_bridge.nats_connection.FrameWriter`): publishing went from ~22 to ~9 µs
of CPU per change (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from cdc_bridge.config import NatsSettings
from cdc_bridge.errors import PublishError, SetupError, SinkError, first_line
from cdc_bridge.metrics import BridgeMetrics, PublishErrorReason
from cdc_bridge.nats_connection import (
    FrameWriter,
    encode_hpub,
    frame_payload_size,
    open_connection,
    redacted_url,
)
from cdc_bridge.routing import subject_is_covered

__all__ = ["JetStreamSink", "StreamSpec"]

log = logging.getLogger(__name__)

Ticket = TypeVar("Ticket")

#: nats-server's protocol line (HPUB subject reply sizes) is at most 4096 bytes by default
#: (max_control_line); this leaves room for the reply subject and the sizes.
MAX_SUBJECT_BYTES = 3800


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """The stream the bridge publishes into, as configured."""

    name: str
    subjects: tuple[str, ...]  # what the stream must capture
    create: bool
    storage: str = "file"
    replicas: int = 1
    max_age: float = 0
    max_bytes: int = -1
    duplicate_window: float = 120.0


#: Atomic batches open or awaiting their PubAck at most. JetStream allows 50 per stream,
#: but commits them one at a time (each with a sync of the stream's store: ~7 ms on this
#: machine's disk): more in flight only queue there, while waiting here lets the next
#: batch grow (the publisher groups transactions). So small batches (under half the batch
#: size: a live trickle) get :data:`MAX_SMALL_BATCHES`; large ones (a backlog) keep
#: :data:`MAX_OPEN_BATCHES` going, so the server always has the next one at hand.
#: Measured at 2,000 changes/s in 10-change transactions: p99 commit→PubAck 63 ms with
#: 2, 354 ms with 40; on a 100k-change backlog in 1,000-change transactions,
#: 14.6k rows/s with 2 and 19.5k with 4.
MAX_OPEN_BATCHES = 4
MAX_SMALL_BATCHES = 2
#: Bytes the batch headers add to a message at most (id, sequence, commit).
BATCH_HEADER_BYTES = 128
#: JetStream error codes after which a new attempt may succeed.
_RETRIABLE_CODES = frozenset(
    {
        10176,  # atomic batch incomplete (abandoned while we were stalled)
        10210,  # too many atomic batches in flight
    }
)
_DUPLICATE_IN_BATCH = 10201


@dataclass(slots=True)
class _Single:
    subject: str
    body: bytes
    headers: dict[str, str]


@dataclass(slots=True)
class _Pending(Generic[Ticket]):
    ticket: Ticket
    deadline: float
    subject: str
    messages: int  # this message plus, for a batch commit, the members before it
    size: int  # their bytes
    batch: bool
    small: bool  # a small batch's commit
    headers: dict[str, str]


StoredCheck = Callable[[str, dict[str, str]], Awaitable[bool]]


class Message(Protocol):
    """What :meth:`JetStreamSink.send_members` needs of a message (a router's
    ``OutgoingMessage``)."""

    @property
    def subject(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> dict[str, str]: ...


class JetStreamSink(Generic[Ticket]):
    def __init__(
        self,
        client: NatsClient,
        *,
        on_ack: Callable[[Ticket, bool], None],
        max_in_flight: int,
        ack_timeout: float,
        max_in_flight_bytes: int = 64 * 1024 * 1024,
        metrics: BridgeMetrics | None = None,
    ) -> None:
        self._nc = client
        self._writer = FrameWriter(client)
        self._max_payload = int(client.max_payload)  # told at connect (no reconnects)
        self._metrics = metrics or BridgeMetrics(max_in_flight=max_in_flight)
        self._on_ack = on_ack
        self._ack_timeout = ack_timeout
        self._max_messages = max_in_flight
        self._max_bytes = max_in_flight_bytes
        self._messages = 0  # sent and not yet acked, batch members included
        self._bytes = 0
        self._open_batches = 0
        self._small_batches = 0  # small batches committed, awaiting their PubAck
        self._room = asyncio.Event()  # set whenever an ack frees window space
        self._pending: dict[str, _Pending[Ticket]] = {}
        #: Set by the owner to verify a batch rejected as a duplicate (10201).
        self.is_stored: StoredCheck | None = None
        #: Whether transactions go out as atomic batches (decided by ensure_stream).
        self.atomic_batches = False
        self._next_id = 0
        self._inbox = client.new_inbox() + "."
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._verifications: set[asyncio.Task[None]] = set()
        self._blocked_since: float | None = None  # while a write to NATS waits
        self._subscription: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def connect(
        cls,
        settings: NatsSettings,
        *,
        on_ack: Callable[[Ticket, bool], None],
        max_in_flight: int,
        ack_timeout: float,
        max_in_flight_bytes: int = 64 * 1024 * 1024,
        name: str = "cdc-bridge",
        metrics: BridgeMetrics | None = None,
    ) -> JetStreamSink[Ticket]:
        """Connect with ``settings`` (URL, timeout, authentication, TLS); no reconnects."""
        sinks: list[JetStreamSink[Ticket]] = []
        url = redacted_url(settings.url)

        async def closed() -> None:
            for sink in sinks:
                sink._fail(SinkError(f"connection to NATS at {url} was lost"), "connection")

        async def record_error(exc: BaseException) -> None:
            for sink in sinks:  # after connect: e.g. a publish permission violation
                sink._fail(SinkError(f"NATS reported an error: {first_line(exc)}"), "refused")

        client = await open_connection(settings, name=name, closed_cb=closed, error_cb=record_error)
        sink = cls(
            client,
            on_ack=on_ack,
            max_in_flight=max_in_flight,
            ack_timeout=ack_timeout,
            max_in_flight_bytes=max_in_flight_bytes,
            metrics=metrics,
        )
        sinks.append(sink)
        sink._subscription = await client.subscribe(sink._inbox + "*", cb=sink._on_reply)
        sink._watchdog = asyncio.create_task(sink._watch_deadlines(), name="pubAck-watchdog")
        return sink

    @property
    def in_flight(self) -> int:
        return self._messages

    @property
    def in_flight_bytes(self) -> int:
        return self._bytes

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (told at connect), headers included."""
        return self._max_payload

    @property
    def server_version(self) -> tuple[int, int]:
        version = self._nc.connected_server_version
        return (version.major, version.minor)

    @property
    def client(self) -> NatsClient:
        return self._nc

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected) and not self._failure.done()

    @property
    def published(self) -> int:
        return self._metrics.published

    @property
    def duplicates(self) -> int:
        return self._metrics.duplicates

    async def ensure_stream(self, spec: StreamSpec, *, atomic_batches: bool = False) -> None:
        """Create the stream, or check that the existing one captures our subjects.

        With ``atomic_batches``, a stream created here allows them when the server does
        (2.12 or newer); :attr:`atomic_batches` says whether they will be used.
        """
        server_atomic = self.server_version >= (2, 12)
        js = self._nc.jetstream()
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            info = None
        except Exception as exc:
            raise SetupError(
                f"JetStream is not available on the NATS server: {exc or type(exc).__name__} "
                "(start nats-server with -js / jetstream {} in its config)"
            ) from None
        if info is None:
            if not spec.create:
                raise SetupError(
                    f"stream {spec.name!r} does not exist and nats.create_stream is false "
                    "(create it, or set nats.create_stream: true)"
                )
            config = StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                storage=StorageType(spec.storage),
                num_replicas=spec.replicas,
                max_age=spec.max_age or None,
                max_bytes=spec.max_bytes,
                duplicate_window=spec.duplicate_window,
                allow_atomic=True if atomic_batches and server_atomic else None,
            )
            try:
                await js.add_stream(config)
            except Exception as exc:
                raise SetupError(f"cannot create stream {spec.name!r}: {exc}") from None
            log.info(
                "created stream %s for subjects %s",
                spec.name,
                ", ".join(spec.subjects),
                extra={"stream": spec.name},
            )
            self.atomic_batches = atomic_batches and server_atomic
            self._log_batch_mode(spec.name, atomic_batches, server_atomic, allowed=True)
            return
        existing = info.config.subjects or []
        missing = [s for s in spec.subjects if not subject_is_covered(s, existing)]
        if missing:
            raise SetupError(
                f"stream {spec.name!r} captures {existing} but not {missing}: add those "
                "subjects to the stream, or change the table subject templates"
            )
        allowed = bool(info.config.allow_atomic)
        self.atomic_batches = atomic_batches and server_atomic and allowed
        self._log_batch_mode(spec.name, atomic_batches, server_atomic, allowed)

    def _log_batch_mode(self, stream: str, wanted: bool, server: bool, allowed: bool) -> None:
        if not wanted:
            log.info("atomic batches are off (nats.atomic_batches): one message at a time")
        elif not server:
            version = ".".join(map(str, self.server_version))
            log.warning(
                "nats-server %s has no atomic batches (2.12+): a transaction's messages "
                "are published one by one, so consumers may see part of one for a moment",
                version,
            )
        elif not allowed:
            log.warning(
                "stream %s does not allow atomic batches: transactions are published "
                "message by message (set allow_atomic: true in the stream's configuration "
                "to have each transaction stored as a whole)",
                stream,
            )
        else:
            log.info("publishing each transaction as an atomic batch")

    def message_size(self, subject: str, body: bytes, headers: dict[str, str]) -> int:
        """Bytes the server counts against max_payload (body plus headers), estimated up."""
        keys, values = sum(map(len, headers)), sum(map(len, headers.values()))
        return len(body) + keys + values + 4 * len(headers) + 14

    def _check_subject(self, subject: str) -> None:
        if len(subject) > MAX_SUBJECT_BYTES and len(subject.encode()) > MAX_SUBJECT_BYTES:
            # nats-server would drop the connection (its protocol line is 4 KB at most).
            self._metrics.publish_failed("too_large")
            raise PublishError(
                f"the subject {subject[:60]}… is {len(subject.encode())} bytes, over the "
                f"{MAX_SUBJECT_BYTES} bytes a NATS subject may have here: route by a column "
                "with shorter values",
                subject=subject[:60],
            )

    def _check_size(self, subject: str, size: int) -> None:
        if size > self._max_payload:
            # Raised before anything is sent; the slot stays at the change before it.
            self._metrics.publish_failed("too_large")
            raise PublishError(
                f"the message for {subject} is {size} bytes, over the NATS server's "
                f"max_payload of {self._max_payload} bytes: raise max_payload in the "
                "nats-server configuration, or set nats.oversized: dead-letter",
                subject=subject,
            )

    async def _admit(self, subject: str, body: bytes, headers: dict[str, str]) -> int:
        """Check a message and wait until the window has room for it; return its size."""
        self.raise_if_failed()
        self._check_subject(subject)
        size = self.message_size(subject, body, headers)
        self._check_size(subject, size)
        await self._wait_for_room(size)
        self.raise_if_failed()
        return size

    async def _wait_for_room(self, size: int, count: int = 1) -> None:
        # Something in flight must make room; a message larger than the byte window
        # alone still goes out once the window is empty.
        while self._messages and (
            self._messages + count > self._max_messages or self._bytes + size > self._max_bytes
        ):
            self._room.clear()
            await self._room.wait()
            self.raise_if_failed()

    async def open_batch(self) -> None:
        """Reserve one of the stream's in-flight atomic batches (wait for one if needed)."""
        while self._open_batches >= MAX_OPEN_BATCHES or self._small_batches >= MAX_SMALL_BATCHES:
            self._room.clear()
            await self._room.wait()
            self.raise_if_failed()
        self._open_batches += 1

    def encode_member(
        self, subject: str, body: bytes, headers: dict[str, str]
    ) -> tuple[bytes, int]:
        """The frame of one message of an open batch (no reply subject: the server answers
        only the commit) and its size (header and body bytes), checked as :meth:`publish`
        checks a message; :meth:`send_members` sends it.
        """
        if len(subject) > MAX_SUBJECT_BYTES:
            self._check_subject(subject)
        try:
            frame = encode_hpub(subject, headers, body)
        except ValueError as exc:
            self._fail(SinkError(f"publish to {subject} failed: {exc}"), "connection")
            self.raise_if_failed()
            raise
        size = frame_payload_size(frame)
        if size > self._max_payload:
            self._check_size(subject, size)
        return frame, size

    async def send_members(
        self, frames: list[bytes], size: int, messages: Sequence[Message]
    ) -> None:
        """Send frames from :meth:`encode_member` (``size`` bytes by its count) in one
        write, once the window has room for all of them.

        ``messages`` are the same messages: what goes out through ``Client.publish``
        instead if this nats-py lacks what :class:`FrameWriter` needs.
        """
        self.raise_if_failed()
        await self._wait_for_room(size, len(frames))
        self.raise_if_failed()
        self._messages += len(frames)
        self._bytes += size
        self._blocked_since = time.monotonic()
        try:
            if self._writer.available:
                await self._writer.write(frames, sum(map(len, frames)))
            else:
                for message in messages:
                    await self._nc.publish(message.subject, message.body, headers=message.headers)
        except Exception as exc:
            self._fail(
                SinkError(f"publish to {messages[0].subject} failed: {exc or type(exc).__name__}"),
                "connection",
            )
            self.raise_if_failed()
        finally:
            self._blocked_since = None
        self.raise_if_failed()  # failed while the write waited (a frozen server)
        self._metrics.published += len(frames)

    async def publish_batch_member(self, subject: str, body: bytes, headers: dict[str, str]) -> int:
        """Send one message of an open batch (no reply); return its size for the commit."""
        frame, size = self.encode_member(subject, body, headers)
        await self.send_members([frame], size, [_Single(subject, body, headers)])
        return size

    async def publish(
        self,
        subject: str,
        body: bytes,
        headers: dict[str, str],
        ticket: Ticket,
        *,
        batch: tuple[int, int] | None = None,
        small: bool = False,
    ) -> None:
        """Send one message; returns once it is written, not when it is acked.

        ``batch`` is (members, bytes) of the batch this message commits; ``small`` when
        that batch is small (see :data:`MAX_SMALL_BATCHES`).
        """
        size = await self._admit(subject, body, headers)
        self._next_id += 1
        token = str(self._next_id)
        members, member_bytes = batch or (0, 0)
        self._pending[token] = _Pending(
            ticket,
            time.monotonic() + self._ack_timeout,
            subject,
            members + 1,
            member_bytes + size,
            batch is not None,
            batch is not None and small,
            headers,
        )
        if batch is not None and small:
            self._small_batches += 1
        self._messages += 1
        self._bytes += size
        self._all_acked.clear()
        self._blocked_since = time.monotonic()
        reply = self._inbox + token
        try:
            if self._writer.available:
                frame = encode_hpub(subject, headers, body, reply)
                await self._writer.write([frame], len(frame))
            else:
                await self._nc.publish(subject, body, reply=reply, headers=headers)
        except BaseException as exc:
            # Not sent (or not known to be): forget it so drain() does not wait for it.
            # Its ticket keeps the count, so its transaction is never confirmed.
            self._forget(token)
            if isinstance(exc, Exception):
                self._fail(
                    SinkError(f"publish to {subject} failed: {exc or type(exc).__name__}"),
                    "connection",
                )
                self.raise_if_failed()
            raise
        finally:
            self._blocked_since = None
        self._metrics.published += 1

    def _forget(self, token: str) -> _Pending[Ticket] | None:
        pending = self._pending.pop(token, None)
        if pending is not None:
            self._messages -= pending.messages
            self._bytes -= pending.size
            if pending.batch:
                self._open_batches -= 1
                if pending.small:
                    self._small_batches -= 1
            self._room.set()
            if not self._pending:
                self._all_acked.set()
        return pending

    def _on_reply_sync(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) :]
        pending = self._pending.get(token)
        if pending is None:
            return  # a late ack after a timeout already failed the sink
        try:
            reply = orjson.loads(msg.data) if msg.data else {}
        except orjson.JSONDecodeError:
            reply = {"error": {"description": f"unreadable PubAck {msg.data[:200]!r}"}}
        error = reply.get("error") if isinstance(reply, dict) else None
        if isinstance(error, dict) and error.get("err_code") == _DUPLICATE_IN_BATCH:
            # A re-sent batch: trust it only once its last message is seen in the stream.
            task = asyncio.create_task(self._verify_duplicate_batch(token, pending))
            self._verifications.add(task)
            task.add_done_callback(self._verifications.discard)
            return
        self._forget(token)
        if error is not None or not isinstance(reply, dict) or "seq" not in reply:
            status = msg.headers.get("Status") if msg.headers else None
            reason = (error.get("description", error) if isinstance(error, dict) else error) or (
                f"status {status}" if status else "no PubAck"
            )
            code = error.get("err_code") if isinstance(error, dict) else None
            http = error.get("code") if isinstance(error, dict) else None
            retriable = (
                status == "503"
                or code in _RETRIABLE_CODES
                or (isinstance(http, int) and http >= 500)
            )
            if status == "503":
                reason = "no stream captures this subject, or JetStream is not ready (503)"
            self._fail(
                PublishError(
                    f"JetStream refused {pending.subject}: {reason}",
                    subject=pending.subject,
                    retriable=retriable,
                ),
                "refused",
            )
            return
        self._acked(pending, bool(reply.get("duplicate")))

    def _acked(self, pending: _Pending[Ticket], duplicate: bool) -> None:
        metrics = self._metrics
        now = time.monotonic()
        metrics.last_progress = now
        metrics.publish_duration.observe(now - pending.deadline + self._ack_timeout)
        if duplicate:
            metrics.duplicates += pending.messages
        self._on_ack(pending.ticket, duplicate)

    async def _verify_duplicate_batch(self, token: str, pending: _Pending[Ticket]) -> None:
        stored = False
        if self.is_stored is not None:
            try:
                stored = await self.is_stored(pending.subject, pending.headers)
            except Exception as exc:
                log.warning("cannot check a batch rejected as a duplicate: %s", first_line(exc))
        if self._forget(token) is None:
            return  # the sink failed meanwhile
        if stored:
            self._acked(pending, True)
            return
        self._fail(
            PublishError(
                f"JetStream rejected a batch ending with {pending.subject} as containing a "
                "duplicate message id, but its last message is not in the stream: the batch "
                "was not stored as a whole (was nats.atomic_batch_size changed between runs?)",
                subject=pending.subject,
            ),
            "refused",
        )

    async def _on_reply(self, msg: Msg) -> None:
        self._on_reply_sync(msg)

    async def _watch_deadlines(self) -> None:
        interval = min(1.0, self._ack_timeout / 4)
        while not self._failure.done():
            await asyncio.sleep(interval)
            now = time.monotonic()
            blocked = self._blocked_since
            if blocked is not None and now - blocked > self._ack_timeout:
                # The socket towards NATS takes nothing (a frozen server, a stalled
                # network): batch members have no PubAck to wait for, so watch this too.
                self._fail(
                    PublishError(
                        f"NATS has not taken a message for {now - blocked:.0f}s "
                        f"(over nats.ack_timeout {self._ack_timeout:g}s)",
                        retriable=True,
                    ),
                    "timeout",
                )
                break
            # Dicts keep insertion order: the oldest pending message comes first.
            for pending in self._pending.values():
                if pending.deadline < now:
                    self._fail(
                        PublishError(
                            f"no PubAck for {pending.subject} within {self._ack_timeout:g}s "
                            "(is JetStream healthy? raise nats.ack_timeout if it is just slow)",
                            subject=pending.subject,
                            retriable=True,
                        ),
                        "timeout",
                    )
                break

    def _fail(self, error: SinkError, reason: PublishErrorReason) -> None:
        if not self._failure.done() and not self._closing:
            self._metrics.publish_failed(reason)
            self._failure.set_exception(error)
            self._room.set()  # wake a publisher waiting for room: it raises

    def raise_if_failed(self) -> None:
        if self._failure.done():
            self._failure.result()

    async def wait_failed(self) -> None:
        """Return never; raise the sink's error as soon as it fails."""
        await asyncio.shield(self._failure)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bounded wait is the point
        """Wait for every in-flight PubAck; True if all arrived in time and none failed."""
        acked: asyncio.Future[object] = asyncio.ensure_future(self._all_acked.wait())
        failed: asyncio.Future[object] = asyncio.ensure_future(asyncio.shield(self._failure))
        try:
            await asyncio.wait(
                {acked, failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in (acked, failed):
                waiter.cancel()
                with contextlib.suppress(BaseException):
                    await waiter
        return self._all_acked.is_set() and not self._failure.done()

    async def close(self) -> None:
        self._closing = True
        for task in self._verifications:
            task.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._failure.done():
            self._failure.exception()  # mark retrieved: the caller has seen it already
        # nats-py's close waits for the socket to drain, forever if the server stopped
        # reading: bounded, so a failed bridge always exits.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._nc.close()


def stream_subjects(filters: Iterable[str]) -> tuple[str, ...]:
    """Deduplicated stream subjects, dropping ones another already covers."""
    unique = list(dict.fromkeys(filters))
    kept = [s for s in unique if not any(o != s and subject_is_covered(s, [o]) for o in unique)]
    return tuple(kept)
