"""The bridge's per-change CPU path, in process, stage by stage (no network).

    .venv/bin/python -m benchmarks.hotpath [--rows 50000] [--tx-size 1000] [--repeat 5]

Writes the workload behind a slot once, takes the slot's pgoutput messages with
``pg_logical_slot_peek_binary_changes`` (the same bytes a walsender streams), and then
runs them through the reader's steps, cumulatively, each chain ``--repeat`` times
(the fastest run counts):

1. decode: ``decode_message``;
2. + assemble and convert: ``ChangeAssembler.feed`` (rows to JSON values);
3. + route and serialize: ``Router.route_change`` (subject, headers, envelope body);
4. + frame: the HPUB frame of an atomic batch member (``encode_hpub``), as the sink
   builds it;
5. the whole reader instead (``WalReader.run``): the same steps plus the loop itself,
   the transactions' tickets, the atomic batches (``TransactionPublisher``) and the
   checkpoint, with the replication stream replayed from memory and a sink that
   encodes every frame as the real one does but sends nothing (each PubAck is
   immediate).

Each stage's figure is the difference between two chains, in µs per change. The
end-to-end benchmark (``bench.py``) is what counts; this one is steady enough (a few
percent run to run) to tell whether a change to the hot path helps. The socket reads
and writes, nats-py and the PubAcks' parsing are not in it. With ``--tx-size 1`` the
reader stage shows what each transaction costs besides its change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from benchmarks.workload import PUBLICATION, TABLE, Mix, Workload, create_schema
from cdc_bridge.batching import TransactionPublisher
from cdc_bridge.changes import Change, ChangeAssembler
from cdc_bridge.checkpoint import Checkpointer, TransactionTicket
from cdc_bridge.config import Settings
from cdc_bridge.envelopes import encoder_from_settings
from cdc_bridge.local_servers import start_postgres
from cdc_bridge.metrics import BridgeMetrics
from cdc_bridge.nats_connection import encode_hpub, frame_payload_size
from cdc_bridge.pgoutput import XLogData, decode_message
from cdc_bridge.pipeline import BridgeStats
from cdc_bridge.reader import WalReader
from cdc_bridge.router import Router
from cdc_bridge.sink import JetStreamSink

_SLOT = "hotpath"


def capture(rows: int, tx_size: int) -> list[tuple[int, bytes]]:
    """(LSN, pgoutput message) of a fresh workload of `rows` changes."""
    postgres = start_postgres(settings={"max_wal_size": "4GB"})
    try:
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            create_schema(conn)
            conn.execute(f"SELECT pg_create_logical_replication_slot('{_SLOT}', 'pgoutput')")
        workload = Workload(postgres.dsn(), mix=Mix())
        try:
            workload.write(rows, tx_size)
        finally:
            workload.close()
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            cursor = conn.execute(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
                f"'{_SLOT}', NULL, NULL, 'proto_version', '1', "
                f"'publication_names', '{PUBLICATION}')"
            )
            return [(_lsn(text), bytes(data)) for text, data in cursor]
    finally:
        postgres.cleanup()


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def _settings() -> Settings:
    stream = "HOTPATH"
    return Settings.model_validate(
        {
            "postgres": {"dsn": "postgresql://unused/db", "slot": _SLOT},
            "nats": {"stream": stream, "subjects": [f"{stream}.>"]},
            "tables": {f"public.{TABLE}": {"subject": f"{stream}.{{op}}"}},
        }
    )


def chains(messages: list[tuple[int, bytes]]) -> dict[str, Callable[[], int]]:
    """Each cumulative chain of stages: a function that runs it over `messages`."""
    settings = _settings()
    table = f"public.{TABLE}"

    def assembler() -> ChangeAssembler:
        return ChangeAssembler(key_columns={}, type_aliases={}, default_keys=frozenset({table}))

    def router() -> Router:
        return Router(
            slot=_SLOT,
            table_subjects={table: settings.tables[table].subject},
            message_subject=None,
            encoder=encoder_from_settings(settings),
        )

    def decode() -> int:
        for _, payload in messages:
            decode_message(payload)
        return 0

    def assemble() -> int:
        feed, changes = assembler().feed, 0
        for lsn, payload in messages:
            for event in feed(decode_message(payload), lsn):
                changes += type(event) is Change
        return changes

    def route() -> int:
        feed, route_change, changes = assembler().feed, router().route_change, 0
        for lsn, payload in messages:
            for event in feed(decode_message(payload), lsn):
                if type(event) is Change:
                    route_change(event)
                    changes += 1
        return changes

    def frame() -> int:
        feed, route_change, changes = assembler().feed, router().route_change, 0
        batch_id = "0" * 32
        for lsn, payload in messages:
            for event in feed(decode_message(payload), lsn):
                if type(event) is Change:
                    out: Any = route_change(event)
                    changes += 1
                    headers = out.headers
                    headers["Nats-Batch-Id"] = batch_id
                    headers["Nats-Batch-Sequence"] = str(changes)
                    encode_hpub(out.subject, headers, out.body)
        return changes

    def reader() -> int:
        return asyncio.run(_read_all(settings, messages, assembler(), router()))

    return {
        "decode": decode,
        "assemble": assemble,
        "route": route,
        "frame": frame,
        "reader": reader,
    }


class _End(Exception):
    """The replayed stream is over."""


class _ReplayedSource:
    """The replication stream, replayed from memory, one XLogData frame per message."""

    def __init__(self, messages: list[tuple[int, bytes]]) -> None:
        self._frames = iter([XLogData(lsn, lsn, 0, payload) for lsn, payload in messages])
        self.idle_calls = 0

    async def read_frame(self, on_idle: Any = None) -> XLogData:
        frame = next(self._frames, None)
        if frame is None:
            if on_idle is not None:
                await on_idle()  # the last batch's commit
            raise _End
        return frame


class _NullSink:
    """What the publisher and the reader need of :class:`JetStreamSink`: frames are
    encoded as the real sink does and dropped; every publish is acknowledged at once."""

    atomic_batches = True
    max_payload = 1024 * 1024

    def __init__(self, on_ack: Callable[[TransactionTicket], None]) -> None:
        self._on_ack = on_ack
        self.frames = 0

    def message_size(self, subject: str, body: bytes, headers: dict[str, str]) -> int:
        return JetStreamSink.message_size(self, subject, body, headers)  # type: ignore[arg-type]

    async def open_batch(self) -> None:
        pass

    def encode_member(
        self, subject: str, body: bytes, headers: dict[str, str]
    ) -> tuple[bytes, int]:
        frame = encode_hpub(subject, headers, body)
        return frame, frame_payload_size(frame)

    async def send_members(self, frames: list[bytes], size: int, messages: Sequence[Any]) -> None:
        self.frames += len(frames)

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str], ticket: Any, **_: Any
    ) -> None:
        encode_hpub(subject, headers, body, "_INBOX.x")
        self.frames += 1
        self._on_ack(ticket)


async def _read_all(
    settings: Settings,
    messages: list[tuple[int, bytes]],
    assembler: ChangeAssembler,
    router: Router,
) -> int:
    checkpointer = Checkpointer(0)
    sink: Any = _NullSink(checkpointer.acked)
    publisher = TransactionPublisher(
        sink, checkpointer, atomic=True, batch_size=1000, batch_bytes=32 * 1024 * 1024
    )
    stats = BridgeStats()
    reader = WalReader(
        settings,
        _ReplayedSource(messages),  # type: ignore[arg-type]
        sink,
        checkpointer,
        publisher,
        assembler,
        router,
        None,
        stats,
        BridgeMetrics(),
        None,
    )
    with contextlib.suppress(_End):
        await reader.run()
    if sink.frames != stats.changes or checkpointer.confirmed_lsn != messages[-1][0]:
        raise SystemExit(
            f"reader: {sink.frames} frames for {stats.changes} changes, "
            f"confirmed {checkpointer.confirmed_lsn:X} of {messages[-1][0]:X}"
        )
    return stats.changes


def fastest(run: Callable[[], int], repeat: int) -> tuple[float, int]:
    """The fastest of `repeat` runs (seconds) and what the run returned."""
    best, result = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--tx-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    messages = capture(args.rows, args.tx_size)
    timings = {name: fastest(run, args.repeat) for name, run in chains(messages).items()}
    changes = timings["frame"][1]
    if changes != args.rows:
        raise SystemExit(f"{changes} changes decoded, expected {args.rows}")
    print(f"{len(messages):,} pgoutput messages, {changes:,} changes; µs per change:")
    previous = 0.0
    labels = {
        "decode": "decode",
        "assemble": "assemble + convert",
        "route": "route + serialize",
        "frame": "HPUB frame",
    }
    for name, label in labels.items():
        per_change = timings[name][0] / changes * 1e6
        print(f"  {label:<20} {per_change - previous:6.2f}")
        previous = per_change
    print(f"  {'total':<20} {previous:6.2f}")
    reader_seconds, reader_changes = timings["reader"]
    if reader_changes != changes:
        raise SystemExit(f"reader: {reader_changes} changes, expected {changes}")
    print(
        f"  {'whole reader':<20} {reader_seconds / changes * 1e6:6.2f}"
        "  (the same, plus loop, tickets, batches, checkpoint)"
    )


if __name__ == "__main__":
    main()
