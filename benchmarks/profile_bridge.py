"""Where cdc-bridge's time per row goes on the backlog case (py-spy, sampling).

    .venv/bin/python -m benchmarks.profile_bridge [--rows 200000] [--tx-size 1000]

Writes the workload behind a slot, starts ``cdc-bridge run`` on it, attaches
``py-spy record`` (collapsed stacks, kept in the temporary work directory) and stops
it when the stream holds every change.

Each sample is charged to the innermost cdc_bridge module on its stack (so orjson
called by the envelope counts as *serialize*, nats-py called by the sink as
*publish*). Samples without a cdc_bridge frame below the CLI that starts the event
loop go to the library on their stack (nats-py's reader and flusher tasks, which
write the publishes and read the PubAcks: *publish*; psycopg: *read*) or to the
*event loop*. Prints and writes the table of stages with µs per row.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import yaml

from benchmarks.contenders import Target, _until_stream_full, cdc_bridge_argv, cdc_bridge_config
from benchmarks.workload import Mix, Workload, create_schema
from cdc_bridge.local_servers import start_nats, start_postgres

_CATEGORIES = (  # (substring of the file path, category), first match wins
    ("cdc_bridge/pgoutput/", "decode (pgoutput)"),
    ("cdc_bridge/source.py", "read (replication stream)"),
    ("cdc_bridge/reader.py", "read loop (reader.py: frames → changes → sink)"),
    ("cdc_bridge/values.py", "convert (values)"),
    ("cdc_bridge/pgtypes.py", "convert (values)"),
    ("cdc_bridge/changes.py", "convert (values)"),
    ("cdc_bridge/router.py", "route"),
    ("cdc_bridge/routing.py", "route"),
    ("cdc_bridge/filters.py", "route"),
    ("cdc_bridge/envelope", "serialize (envelope, msg ids)"),
    ("cdc_bridge/lsn.py", "serialize (envelope, msg ids)"),
    ("cdc_bridge/sink.py", "publish (sink, nats-py)"),
    ("cdc_bridge/batching.py", "publish (sink, nats-py)"),
    ("cdc_bridge/nats_connection.py", "publish (sink, nats-py)"),
    ("cdc_bridge/checkpoint.py", "ack bookkeeping (checkpoint)"),
    ("cdc_bridge/metrics.py", "metrics"),
    ("cdc_bridge/pipeline.py", "pipeline (glue)"),
    ("cdc_bridge/config.py", "start-up (imports, config, provisioning)"),
    ("cdc_bridge/provisioning.py", "start-up (imports, config, provisioning)"),
    ("cdc_bridge/readback.py", "start-up (imports, config, provisioning)"),
    ("cdc_bridge/__init__.py", "start-up (imports, config, provisioning)"),
    ("<module> (cdc_bridge/", "start-up (imports, config, provisioning)"),
)
# Frames that only start the event loop: a sample whose innermost cdc_bridge frame is
# one of these is in asyncio or a library, not in a stage of ours.
_OUTER = ("(cdc_bridge/cli.py", "(cdc_bridge/__main__.py")
_LIBRARIES = (
    ("(nats/", "publish (sink, nats-py)"),
    ("(psycopg/", "read (replication stream)"),
    ("(asyncio/", "event loop, sockets"),
    ("(selectors.py", "event loop, sockets"),
    ("(<frozen importlib", "start-up (imports, config, provisioning)"),
)


def categorize(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # leaf first
        if "cdc_bridge/" in frame and not any(outer in frame for outer in _OUTER):
            for needle, category in _CATEGORIES:
                if needle in frame:
                    return category
            return "other cdc_bridge"
    for needle, category in _LIBRARIES:  # a library anywhere on the stack, in this order
        if any(needle in frame for frame in frames):
            return category
    return "other"


def breakdown(raw: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[categorize(stack)] += int(n)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--tx-size", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy not found: pip install '.[bench]'")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cdc-bridge-profile-"))
    postgres = start_postgres(settings={"max_wal_size": "4GB"})
    server = start_nats()
    try:
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            create_schema(conn)
            conn.execute("SELECT pg_create_logical_replication_slot('profile', 'pgoutput')")
        workload = Workload(postgres.dsn(), mix=Mix())
        try:
            workload.write(args.rows, args.tx_size)
        finally:
            workload.close()
        target = Target(
            dsn=postgres.dsn(),
            nats_url=server.url,
            pg_bin=postgres.bin_dir,
            slot="profile",
            end_lsn="",
            expected=args.rows,
            workdir=workdir,
        )
        stream = "PROFILE"
        config_file = workdir / "profile.yaml"
        config_file.write_text(yaml.safe_dump(cdc_bridge_config(target, stream)))
        log = workdir / "bridge.log"
        raw = workdir / "profile-stacks.txt"
        with log.open("wb") as log_file:
            started = time.monotonic()
            bridge = subprocess.Popen(
                cdc_bridge_argv(config_file), stdout=log_file, stderr=log_file
            )
        spy_argv = [py_spy, "record", "-p", str(bridge.pid), "-r", str(args.rate)]
        spy = subprocess.Popen(
            [*spy_argv, "-f", "raw", "-o", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            end, _, _ = asyncio.run(_until_stream_full(bridge, target, stream, started, log))
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            bridge.terminate()
            bridge.wait(60)
    finally:
        server.cleanup()
        postgres.cleanup()
    seconds = end - started
    counts = breakdown(raw)
    total = sum(counts.values())
    lines = [
        f"# cdc-bridge profile, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{args.rows:,} changes in {args.tx_size:,}-change transactions, "
        f"{args.rows / seconds:,.0f} rows/s under py-spy ({seconds:.1f}s, start-up included); "
        f"{total} non-idle samples at {args.rate}/s.",
        "",
        "| stage | share of samples | µs per row |",
        "|---|---:|---:|",
    ]
    for category, n in counts.most_common():
        lines.append(f"| {category} | {n / total:.1%} | {n / args.rate / args.rows * 1e6:.1f} |")
    summary = args.out / f"profile-{dt.datetime.now(dt.UTC):%Y-%m-%dT%H%M}.md"
    summary.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {summary}; raw stacks (py-spy collapsed format): {raw}")


if __name__ == "__main__":
    main()
