"""One very large transaction through the real bridge: time and the bridge's peak RSS.

    .venv/bin/python benchmarks/big_transaction.py [ROWS]     (default 2,000,000)

Starts a throwaway PostgreSQL and nats-server, runs ``cdc-bridge run`` as a separate
process, inserts ROWS ``conversations`` rows in ONE transaction, and waits until the
stream holds all of them. Prints the time from commit to the last message in the stream
and the bridge process's peak resident memory (VmHWM from /proc).

The bridge never holds a transaction in memory: pgoutput (protocol 1) sends a
transaction after its commit, PostgreSQL spilling it to disk beyond
logical_decoding_work_mem, and the bridge publishes each change as it is decoded, so
its memory is bounded by the in-flight window (nats.max_in_flight / _bytes).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import psycopg
import yaml

from cdc_bridge.local_servers import start_nats, start_postgres

STREAM = "big"


async def _count(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(STREAM)).state.messages)
    except Exception:
        return 0
    finally:
        await nc.close()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main(rows: int) -> None:
    postgres = start_postgres()
    server = start_nats()
    workdir = Path(tempfile.mkdtemp(prefix="cdc-bridge-bench-"))
    try:
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE conversations (id bigserial PRIMARY KEY, conversation_uuid uuid "
                "NOT NULL, role text, content text, metadata jsonb, created_at timestamptz "
                "DEFAULT now())"
            )
            conn.execute("ALTER TABLE conversations REPLICA IDENTITY FULL")
        config = {
            "postgres": {"dsn": postgres.dsn()},
            "nats": {"url": server.url, "stream": STREAM},
            "tables": {"public.conversations": {"subject": "messages.{conversation_uuid}"}},
            "metrics": {"enabled": False},
            "heartbeat": {"interval": 0},
            "log_level": "WARNING",
        }
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        with (workdir / "bridge.log").open("w") as log:
            bridge = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cdc_bridge",
                    "run",
                    "--config",
                    str(workdir / "config.yaml"),
                ],
                stderr=log,
            )
        try:
            time.sleep(3)  # streaming by then (a failed start shows in the log)
            started = time.monotonic()
            with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO conversations (conversation_uuid, role, content, metadata) "
                    "SELECT gen_random_uuid(), 'user', 'message ' || g || repeat('x', 100), "
                    "jsonb_build_object('n', g) FROM generate_series(1, %s) g",
                    (rows,),
                )
            committed = time.monotonic()
            print(f"{rows:,} rows written in one transaction in {committed - started:.1f}s")
            peak = 0
            while asyncio.run(_count(server.url)) < rows:
                if bridge.poll() is not None:
                    raise SystemExit((workdir / "bridge.log").read_text())
                peak = max(peak, _peak_rss_kib(bridge.pid))
                time.sleep(1)
            peak = max(peak, _peak_rss_kib(bridge.pid))
            elapsed = time.monotonic() - committed
            print(
                f"all in the stream {elapsed:.1f}s after the commit ({rows / elapsed:,.0f} rows/s);"
                f" bridge peak RSS {peak / 1024:.0f} MiB"
            )
        finally:
            bridge.terminate()
            bridge.wait(60)
    finally:
        server.cleanup()
        postgres.cleanup()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000)
