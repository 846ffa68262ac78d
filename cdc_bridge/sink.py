"""JetStream sink: the only module that talks to NATS.

Publishing is pipelined: each message goes out with its own reply subject under one
wildcard inbox, and the PubAck comes back asynchronously. Up to ``max_in_flight``
messages may await their PubAck; past that, ``publish`` waits, which stops the pipeline
from reading more WAL (backpressure). A PubAck resolves its message's ticket through the
``on_ack`` callback given at construction, in whatever order acks arrive; an error reply
or a missing PubAck (``ack_timeout``) fails the sink, and nothing after the failure is
confirmed to PostgreSQL.

nats-py's ``publish_async`` is not used: its futures have no timeout, so a PubAck lost
in a server restart would hang the bridge forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from cdc_bridge.config import NatsSettings
from cdc_bridge.errors import PublishError, SetupError, SinkError, first_line
from cdc_bridge.metrics import BridgeMetrics, PublishErrorReason
from cdc_bridge.nats_connection import open_connection, redacted_url
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


@dataclass(slots=True)
class _Pending(Generic[Ticket]):
    ticket: Ticket
    deadline: float
    subject: str


class JetStreamSink(Generic[Ticket]):
    def __init__(
        self,
        client: NatsClient,
        *,
        on_ack: Callable[[Ticket, bool], None],
        max_in_flight: int,
        ack_timeout: float,
        metrics: BridgeMetrics | None = None,
    ) -> None:
        self._nc = client
        self._metrics = metrics or BridgeMetrics(max_in_flight=max_in_flight)
        self._on_ack = on_ack
        self._ack_timeout = ack_timeout
        self._window = asyncio.Semaphore(max_in_flight)
        self._pending: dict[str, _Pending[Ticket]] = {}
        self._next_id = 0
        self._inbox = client.new_inbox() + "."
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._all_acked = asyncio.Event()
        self._all_acked.set()
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
            metrics=metrics,
        )
        sinks.append(sink)
        sink._subscription = await client.subscribe(sink._inbox + "*", cb=sink._on_reply)
        sink._watchdog = asyncio.create_task(sink._watch_deadlines(), name="pubAck-watchdog")
        return sink

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected) and not self._failure.done()

    @property
    def published(self) -> int:
        return self._metrics.published

    @property
    def duplicates(self) -> int:
        return self._metrics.duplicates

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream, or check that the existing one captures our subjects."""
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
            return
        existing = info.config.subjects or []
        missing = [s for s in spec.subjects if not subject_is_covered(s, existing)]
        if missing:
            raise SetupError(
                f"stream {spec.name!r} captures {existing} but not {missing}: add those "
                "subjects to the stream, or change the table subject templates"
            )

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str], ticket: Ticket
    ) -> None:
        """Send one message; returns once it is written, not when it is acked."""
        self.raise_if_failed()
        if len(subject) > MAX_SUBJECT_BYTES and len(subject.encode()) > MAX_SUBJECT_BYTES:
            # nats-server would drop the connection (its protocol line is 4 KB at most).
            self._metrics.publish_failed("too_large")
            raise PublishError(
                f"the subject {subject[:60]}… is {len(subject.encode())} bytes, over the "
                f"{MAX_SUBJECT_BYTES} bytes a NATS subject may have here: route by a column "
                "with shorter values",
                subject=subject[:60],
            )
        size = len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 14
        if size > self._nc.max_payload:
            # Raised before anything is sent; the slot stays at the change before it.
            self._metrics.publish_failed("too_large")
            raise PublishError(
                f"the message for {subject} is {size} bytes, over the NATS server's "
                f"max_payload of {self._nc.max_payload} bytes: raise max_payload in the "
                "nats-server configuration",
                subject=subject,
            )
        await self._window.acquire()
        self.raise_if_failed()
        self._next_id += 1
        token = str(self._next_id)
        self._pending[token] = _Pending(ticket, time.monotonic() + self._ack_timeout, subject)
        self._all_acked.clear()
        try:
            await self._nc.publish(subject, body, reply=self._inbox + token, headers=headers)
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
        self._metrics.published += 1

    def _forget(self, token: str) -> None:
        if self._pending.pop(token, None) is not None:
            self._window.release()
            if not self._pending:
                self._all_acked.set()

    def _on_reply_sync(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) :]
        pending = self._pending.get(token)
        if pending is None:
            return  # a late ack after a timeout already failed the sink
        self._forget(token)
        try:
            reply = orjson.loads(msg.data) if msg.data else {}
        except orjson.JSONDecodeError:
            reply = {"error": {"description": f"unreadable PubAck {msg.data[:200]!r}"}}
        error = reply.get("error") if isinstance(reply, dict) else None
        if error is not None or not isinstance(reply, dict) or "seq" not in reply:
            status = msg.headers.get("Status") if msg.headers else None
            reason = (error.get("description", error) if isinstance(error, dict) else error) or (
                f"status {status}" if status else "no PubAck"
            )
            if status == "503":
                reason = "no stream captures this subject (503 no responders)"
            self._fail(
                PublishError(
                    f"JetStream refused {pending.subject}: {reason}", subject=pending.subject
                ),
                "refused",
            )
            return
        metrics = self._metrics
        now = time.monotonic()
        metrics.last_progress = now
        metrics.publish_duration.observe(now - pending.deadline + self._ack_timeout)
        duplicate = bool(reply.get("duplicate"))
        if duplicate:
            metrics.duplicates += 1
        self._on_ack(pending.ticket, duplicate)

    async def _on_reply(self, msg: Msg) -> None:
        self._on_reply_sync(msg)

    async def _watch_deadlines(self) -> None:
        interval = min(1.0, self._ack_timeout / 4)
        while not self._failure.done():
            await asyncio.sleep(interval)
            now = time.monotonic()
            # Dicts keep insertion order: the oldest pending message comes first.
            for pending in self._pending.values():
                if pending.deadline < now:
                    self._fail(
                        PublishError(
                            f"no PubAck for {pending.subject} within {self._ack_timeout:g}s "
                            "(is JetStream healthy? raise nats.ack_timeout if it is just slow)",
                            subject=pending.subject,
                        ),
                        "timeout",
                    )
                break

    def _fail(self, error: SinkError, reason: PublishErrorReason) -> None:
        if not self._failure.done() and not self._closing:
            self._metrics.publish_failed(reason)
            self._failure.set_exception(error)

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
