"""Replication source: the only module that speaks the replication protocol to PostgreSQL.

It opens a ``replication=database`` connection with psycopg 3, runs ``START_REPLICATION``
and then drives the CopyBoth stream through the raw libpq connection (``conn.pgconn``)
on the asyncio loop: the socket is watched with ``loop.add_reader``, frames are pulled
with ``get_copy_data`` and standby status updates are pushed with ``put_copy_data``.
I/O only: frames go out parsed (``cdc_bridge.pgoutput.frames``), decoding happens
elsewhere.

The session runs with fixed output settings (ISO dates, UTC, full float precision, hex
bytea) because pgoutput formats values with the walsender's settings, and the value
converters rely on those formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import pq, sql

from cdc_bridge.errors import SetupError, SlotBusyError, SourceError, first_line
from cdc_bridge.lsn import format_lsn
from cdc_bridge.metrics import BridgeMetrics
from cdc_bridge.pgoutput import (
    PrimaryKeepalive,
    XLogData,
    encode_standby_status,
    parse_copy_frame,
    pg_now_micros,
)
from cdc_bridge.pgsecurity import connect_error_hint

__all__ = ["SESSION_OPTIONS", "ReplicationSource"]

log = logging.getLogger(__name__)

#: Output settings for the walsender session (see the module docstring).
SESSION_OPTIONS = (
    "-c datestyle=ISO -c intervalstyle=postgres -c timezone=UTC "
    "-c extra_float_digits=3 -c bytea_output=hex -c client_encoding=UTF8"
)


class ReplicationSource:
    def __init__(
        self,
        conn: psycopg.AsyncConnection[tuple[object, ...]],
        slot: str,
        metrics: BridgeMetrics | None = None,
        receive_timeout: float = 60.0,
    ) -> None:
        self._conn = conn
        self._receive_timeout = receive_timeout
        self._metrics = metrics or BridgeMetrics()
        self._pgconn = conn.pgconn
        self._slot = slot
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        # The reader (answering a keepalive) and the status task both send updates.
        self._send_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._socket = self._pgconn.socket
        self._closed = False
        self.received_lsn = 0  # highest WAL position seen in the stream
        self.status_updates = 0

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        slot: str,
        publication: str,
        start_lsn: int = 0,
        messages: bool = True,
        connect_timeout: float = 10.0,
        receive_timeout: float = 60.0,
        metrics: BridgeMetrics | None = None,
    ) -> ReplicationSource:
        try:
            conn = await psycopg.AsyncConnection.connect(
                conninfo,
                replication="database",
                autocommit=True,
                options=SESSION_OPTIONS,
                connect_timeout=max(1, math.ceil(connect_timeout)),
                application_name="cdc-bridge",
            )
        except psycopg.Error as exc:
            reason = first_line(exc)
            hint = connect_error_hint(reason)
            raise SourceError(
                f"cannot open a replication connection: {reason}" + (f" ({hint})" if hint else "")
            ) from None
        command = sql.SQL(
            "START_REPLICATION SLOT {slot} LOGICAL {lsn} "
            "(proto_version '1', publication_names {publications}, messages {messages})"
        ).format(
            slot=sql.Identifier(slot),
            lsn=sql.SQL(format_lsn(start_lsn)),
            publications=sql.Literal(sql.Identifier(publication).as_string(conn)),
            messages=sql.Literal("true" if messages else "false"),
        )
        try:
            await conn.execute(command)
        except psycopg.Error as exc:
            await _close_quietly(conn)
            if exc.sqlstate == "55006":  # object_in_use: another process streams from it
                raise SlotBusyError(
                    f"replication slot {slot!r} is in use by another process: {first_line(exc)}"
                ) from None
            if exc.sqlstate == "42704":  # undefined_object: dropped under our feet
                raise SetupError(
                    f"replication slot {slot!r} does not exist (any more): {first_line(exc)}"
                ) from None
            raise SourceError(
                f"cannot start replication from slot {slot!r}: {first_line(exc)}"
            ) from None
        if conn.pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            await _close_quietly(conn)
            raise SourceError(f"START_REPLICATION on slot {slot!r} did not enter COPY mode")
        conn.pgconn.nonblocking = 1
        log.info(
            "replication started on slot %s from %s",
            slot,
            format_lsn(start_lsn),
            extra={"lsn": format_lsn(start_lsn)},
        )
        return cls(conn, slot, metrics, receive_timeout)

    @property
    def connected(self) -> bool:
        """True while the replication stream is open."""
        return not self._closed and self._pgconn.status == pq.ConnStatus.OK

    async def read_frame(
        self, on_idle: Callable[[], Awaitable[None]] | None = None
    ) -> XLogData | PrimaryKeepalive:
        """The next CopyBoth frame; raises :class:`SourceError` when the stream ends.

        ``on_idle`` is awaited once before waiting for the network, when no frame is
        buffered: the moment to send what was being collected.
        """
        pgconn = self._pgconn
        while True:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                # A view of libpq's buffer (kept alive by it): the decoder makes the one
                # copy of the payload it needs.
                frame = parse_copy_frame(data)
                if frame.wal_end > self.received_lsn:
                    self.received_lsn = frame.wal_end
                return frame
            if nbytes == 0:
                if on_idle is not None:
                    await on_idle()
                    on_idle = None
                    continue  # data may have come in meanwhile
                try:
                    # The server answers our status requests with keepalives, so silence
                    # this long means a dead network that no TCP error will report soon.
                    async with asyncio.timeout(self._receive_timeout):
                        await self._wait_readable()
                except TimeoutError:
                    raise SourceError(
                        f"nothing received from PostgreSQL for {self._receive_timeout:g}s "
                        "(postgres.receive_timeout): the connection is presumed dead"
                    ) from None
                try:
                    pgconn.consume_input()
                except psycopg.Error:
                    raise SourceError(f"replication connection lost: {_pq_error(pgconn)}") from None
                continue
            raise SourceError(f"replication stream ended: {self._stream_end_reason()}")

    async def _wait_readable(self) -> None:
        """Wait until the socket has data.

        The socket is watched only during this wait: a reader registered for good would
        wake the event loop on every iteration while data waits unread (the pipeline
        paused by backpressure), and spin it at 100% CPU.
        """
        self._readable.clear()
        self._loop.add_reader(self._socket, self._readable.set)
        try:
            await self._readable.wait()
        finally:
            self._loop.remove_reader(self._socket)

    def _stream_end_reason(self) -> str:
        result = self._pgconn.get_result()
        if result is not None and result.error_message:
            return result.error_message.decode(errors="replace").strip().splitlines()[0]
        return _pq_error(self._pgconn) or "the server closed the stream"

    async def send_status(self, *, flush_lsn: int, reply_requested: bool = False) -> None:
        """Send a standby status update confirming ``flush_lsn``."""
        async with self._send_lock:
            await self._send_status(flush_lsn, reply_requested)

    async def _send_status(self, flush_lsn: int, reply_requested: bool) -> None:
        frame = encode_standby_status(
            write_lsn=max(self.received_lsn, flush_lsn),
            flush_lsn=flush_lsn,
            apply_lsn=flush_lsn,
            now_micros=pg_now_micros(),
            reply_requested=reply_requested,
        )
        pgconn = self._pgconn
        if pgconn.put_copy_data(frame) != 1:
            raise SourceError(f"cannot send standby status update: {_pq_error(pgconn)}")
        await self._flush()
        self.status_updates += 1
        self._metrics.status_updates += 1

    async def _flush(self) -> None:
        pgconn = self._pgconn
        while True:
            try:
                pending = pgconn.flush()
            except psycopg.Error:
                pending = -1
            if pending == 0:
                return
            if pending < 0:
                raise SourceError(
                    f"cannot write to the replication connection: {_pq_error(pgconn)}"
                )
            # The socket buffer is full: wait until it drains.
            self._writable.clear()
            self._loop.add_writer(self._socket, self._writable.set)
            try:
                await self._writable.wait()
            finally:
                self._loop.remove_writer(self._socket)

    async def finish(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109 - bounded on purpose
        """End the stream the polite way: CopyDone, then wait for the server's own end.

        Closing the socket while server data sits unread makes the kernel send a reset,
        and the walsender may then lose the last status update still in its receive
        buffer: the slot would not record the final confirmed position. After CopyDone,
        the server processes everything we sent before answering, so once its end of the
        stream arrives the final position is safely recorded. Returns False if the
        server did not answer in time (the position may then be older; nothing is lost).
        """
        if self._closed:
            return False
        pgconn = self._pgconn
        try:
            if pgconn.put_copy_end() != 1:
                return False
            await self._flush()
            async with asyncio.timeout(timeout):
                while True:
                    nbytes, _ = pgconn.get_copy_data(1)
                    if nbytes > 0:
                        continue  # WAL sent before the server saw CopyDone: not confirmed
                    if nbytes < 0:
                        break
                    await self._wait_readable()
                    pgconn.consume_input()
                while (result := pgconn.get_result()) is not None:
                    if result.status == pq.ExecStatus.COPY_BOTH:
                        continue
        except (TimeoutError, psycopg.Error):
            return False
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing explicitly: leaving a `with` block would try to commit, which fails
        # while the connection is in COPY_BOTH.
        await _close_quietly(self._conn)


async def _close_quietly(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


def _pq_error(pgconn: pq.abc.PGconn) -> str:
    text = pgconn.error_message.decode(errors="replace").strip()
    return text.splitlines()[0] if text else ""
