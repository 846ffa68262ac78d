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
   builds it.

Each stage's figure is the difference between two chains, in µs per change. The
end-to-end benchmark (``bench.py``) is what counts; this one is steady enough (a few
percent run to run) to tell whether a change to the hot path helps. The socket read,
the event loop, the batch bookkeeping and the PubAcks are not in it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import psycopg

from benchmarks.workload import PUBLICATION, TABLE, Mix, Workload, create_schema
from cdc_bridge.changes import Change, ChangeAssembler
from cdc_bridge.config import Settings
from cdc_bridge.envelopes import encoder_from_settings
from cdc_bridge.local_servers import start_postgres
from cdc_bridge.nats_connection import encode_hpub
from cdc_bridge.pgoutput import decode_message
from cdc_bridge.router import Router

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

    return {"decode": decode, "assemble": assemble, "route": route, "frame": frame}


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
    for name, (seconds, _) in timings.items():
        per_change = seconds / changes * 1e6
        print(f"  {labels[name]:<20} {per_change - previous:6.2f}")
        previous = per_change
    print(f"  {'total':<20} {previous:6.2f}")


if __name__ == "__main__":
    main()
