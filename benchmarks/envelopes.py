"""Throughput of each envelope: encode N changes of a realistic ``conversations`` row.

    .venv/bin/python benchmarks/envelopes.py [N]

Measures only the body encoding (the router's call per change), with a row as the
bridge holds it after value conversion: bigint id, uuid, role, a 400-character message,
jsonb metadata, a timestamptz. Prints changes per second and bytes per body, per format.
"""

from __future__ import annotations

import sys
import time

from cdc_bridge.changes import Change, TableInfo
from cdc_bridge.envelopes import encoder_for
from cdc_bridge.values import JsonValue, converter_for

COLUMNS = (
    ("id", 20),
    ("conversation_uuid", 2950),
    ("role", 25),
    ("content", 25),
    ("metadata", 3802),
    ("created_at", 1184),
)
TABLE = TableInfo(
    oid=16385,
    schema="public",
    table="conversations",
    column_names=tuple(name for name, _ in COLUMNS),
    converters=tuple(converter_for(oid) for _, oid in COLUMNS),
    type_oids=tuple(oid for _, oid in COLUMNS),
    key_names=("id",),
    identity_names=frozenset({"id"}),
    replica_identity="d",
)


def _row(i: int) -> dict[str, JsonValue]:
    return {
        "id": i,
        "conversation_uuid": "9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b",
        "role": "user" if i % 2 else "assistant",
        "content": ("Hello, how do I reset my password? " * 12)[:400],
        "metadata": {"tags": ["a", "b"], "model": "gpt-x", "tokens": 42, "nested": {"k": None}},
        "created_at": "2026-11-27T09:32:10.437029Z",
    }


def _changes(n: int) -> list[Change]:
    return [
        Change(
            op="insert",
            table=TABLE,
            key={"id": i},
            after=_row(i),
            before=None,
            unchanged_toast=[],
            lsn=0x1528830 + i * 64,
            commit_lsn=0x15289C8 + (i // 100) * 0x10000,  # 100 changes per transaction
            xid=725 + i // 100,
            commit_ts=849_087_130_437_557 + i,
            index=i % 100,
        )
        for i in range(n)
    ]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    changes = _changes(n)
    options = {
        "native": {},
        "wal2json": {},
        "wal2json+all-options": {
            "include_xids": True,
            "include_timestamp": True,
            "include_lsn": True,
            "include_type_oids": True,
        },
        "debezium": {},
        "debezium+transaction": {"transaction_block": True},
    }
    print(f"{'envelope':<24}{'changes/s':>12}{'bytes/body':>12}")
    for label, extra in options.items():
        encoder = encoder_for(label.split("+")[0], **extra)  # type: ignore[arg-type]
        for change in changes[:1000]:  # warm up caches
            encoder(change, "cdc_bridge")
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            for change in changes:
                encoder(change, "cdc_bridge")
            best = max(best, n / (time.perf_counter() - start))
        size = len(encoder(changes[0], "cdc_bridge"))
        print(f"{label:<24}{best:>12,.0f}{size:>12}")


if __name__ == "__main__":
    main()
