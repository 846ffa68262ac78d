"""cdc-bridge against pg_recvlogical and mq-bridge on identical WAL (``make bench``).

    .venv/bin/python -m benchmarks.bench [--rows 200000] [--tx-size 1000] [--runs 3] ...

Starts a throwaway PostgreSQL and nats-server (cdc_bridge.local_servers), then:

1. **backlog cases** — for each case (default: 200,000 changes in 1,000-change
   transactions, and 20,000 changes in 1-change transactions) a template slot is
   created, the workload is written once (benchmarks/workload.py), and for every run
   each contender gets ``pg_copy_logical_replication_slot(template, ...)``, so all read
   the identical WAL. Contender order rotates from run to run.
2. **latency** — a steady rate (default 2,000 changes/s for 60 s, 10-change
   transactions) through cdc-bridge; commit → PubAck percentiles from the bridge's
   ``cdc_bridge_commit_to_ack_seconds`` histogram and, exactly, from each stored
   message's JetStream timestamp minus its ``source.commit_ts``. Once per variant
   (``--latency-variants``): atomic batches on (the default configuration), off, and
   on with the JetStream store on tmpfs (where a disk sync costs nothing: an atomic
   batch commit syncs the stream's file store, which dominates the latency here).
3. **big transaction** — benchmarks/big_transaction.py (one transaction of
   2,000,000 changes by default).

Writes benchmarks/results/<date>.json and .md (and .png charts with matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats as nats_client
import psycopg
import yaml

from benchmarks.contenders import (
    CONTENDERS,
    Outcome,
    Target,
    cdc_bridge_argv,
    cdc_bridge_config,
    run_contender,
)
from benchmarks.procstats import TreeSampler
from benchmarks.profile_bridge import breakdown
from benchmarks.report import write_reports
from benchmarks.workload import Mix, Workload, create_schema
from cdc_bridge.local_servers import LocalNats, LocalPostgres, free_port, start_nats, start_postgres

_HERE = Path(__file__).resolve().parent


def _lsn(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    good = [o for o in outcomes if o.ok]
    if not good:
        return {"ok": False, "error": outcomes[0].error if outcomes else "not run"}
    rates = [o.rows_per_s for o in good]
    nats = [o.nats_cpu_s for o in good if o.nats_cpu_s is not None]
    return {
        "ok": True,
        "runs": len(good),
        "rows_per_s": statistics.median(rates),
        "rows_per_s_min": min(rates),
        "rows_per_s_max": max(rates),
        # A run over before the second look at the stream has no warm span: its rows/s.
        "warm_rows_per_s": statistics.median(
            o.delivered / o.warm_seconds if o.warm_seconds > 0 else o.rows_per_s for o in good
        ),
        "seconds": statistics.median(o.seconds for o in good),
        "cpu_s": statistics.median(o.cpu_s for o in good),
        "peak_rss_mib": max(o.peak_rss_mib for o in good),
        "walsender_cpu_s": statistics.median(o.walsender_cpu_s for o in good),
        "nats_cpu_s": statistics.median(nats) if nats else None,  # None: no NATS in it
        "errors": [o.error for o in outcomes if not o.ok],
    }


def _ratios(runs: list[dict[str, Outcome]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Throughput ratio a/b, computed within each run, then median/min/max."""
    out: dict[str, dict[str, Any]] = {}
    for a in names:
        for b in names:
            if a == b:
                continue
            values = [
                run[a].rows_per_s / run[b].rows_per_s
                for run in runs
                if a in run and b in run and run[a].ok and run[b].ok
            ]
            if values:
                out[f"{a}/{b}"] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
    return out


def backlog_case(
    name: str,
    postgres: LocalPostgres,
    server: LocalNats,
    args: argparse.Namespace,
    *,
    changes: int,
    tx_size: int,
    workdir: Path,
) -> dict[str, Any]:
    template = f"tpl_{name}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (template,))
    workload = Workload(postgres.dsn(), mix=args.mix, toast_share=args.toast_share)
    try:
        write_s = workload.write(changes, tx_size)
    finally:
        workload.close()
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        end_lsn = _lsn(conn)
    print(f"[{name}] wrote {changes:,} changes ({tx_size}/tx) in {write_s:.1f}s", flush=True)
    contenders: list[str] = args.contenders
    assert postgres.process is not None  # started
    runs: list[dict[str, Outcome]] = []
    for run in range(args.runs):
        results: dict[str, Outcome] = {}
        order = contenders[run % len(contenders) :] + contenders[: run % len(contenders)]
        for contender in order:
            slot = f"{name}_{contender.replace('-', '_')}_{run}"
            with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
                conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", (template, slot))
            target = Target(
                dsn=postgres.dsn(),
                nats_url=server.url,
                pg_bin=postgres.bin_dir,
                slot=slot,
                end_lsn=end_lsn,
                expected=changes,
                workdir=workdir,
                postmaster_pid=postgres.process.pid,
                nats_server_pid=server.process.pid,
            )
            outcome = run_contender(contender, target)
            results[contender] = outcome
            nats = "" if outcome.nats_cpu_s is None else f", nats-server {outcome.nats_cpu_s:.2f}s"
            status = (
                f"{outcome.rows_per_s:,.0f} rows/s in {outcome.seconds:.2f}s, "
                f"cpu {outcome.cpu_s:.2f}s, peak RSS {outcome.peak_rss_mib:.0f} MiB; "
                f"servers' cpu: walsender {outcome.walsender_cpu_s:.2f}s{nats}"
                if outcome.ok
                else f"FAILED: {outcome.error[:300]}"
            )
            print(f"[{name}] run {run + 1} {contender}: {status}", flush=True)
            with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE slot_name = %s AND NOT active",
                    (slot,),
                )
            if outcome.error.startswith("skipped"):
                break
        runs.append(results)
        if all(o.error.startswith("skipped") for o in results.values() if not o.ok) and all(
            not o.ok for o in results.values()
        ):
            break
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (template,))
    per = {c: _summary([r[c] for r in runs if c in r]) for c in contenders}
    return {
        "case": name,
        "changes": changes,
        "tx_size": tx_size,
        "mix": str(args.mix),
        "write_seconds": write_s,
        "contenders": per,
        "ratios": _ratios(runs, contenders),
        "runs": [{c: vars(o) | {"rows_per_s": o.rows_per_s} for c, o in r.items()} for r in runs],
    }


# ------------------------------------------------------------------------ latency


def _histogram_quantiles(metrics_text: str, name: str, qs: list[float]) -> dict[str, float]:
    """Quantiles from a Prometheus histogram, linear inside a bucket (as histogram_quantile)."""
    buckets: list[tuple[float, float]] = []
    pattern = re.compile(rf'^{name}_bucket\{{.*le="([^"]+)".*\}} ([0-9.e+]+)$')
    for line in metrics_text.splitlines():
        m = pattern.match(line)
        if m:
            buckets.append((float(m.group(1)), float(m.group(2))))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    out: dict[str, float] = {"count": total}
    for q in qs:
        rank, low, low_count = q * total, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                if upper == float("inf"):
                    out[f"p{q * 100:g}"] = low
                else:
                    share = (rank - low_count) / (count - low_count) if count > low_count else 0
                    out[f"p{q * 100:g}"] = low + (upper - low) * share
                break
            low, low_count = upper, count
    return out


async def _stored_latencies(url: str, stream: str) -> list[float]:
    """Per message: JetStream's store time minus the change's commit_ts (seconds)."""
    nc = await nats_client.connect(url)
    out: list[float] = []
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(f"{stream}.>", stream=stream)
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=2)
            except nats_client.errors.TimeoutError:
                break
            for msg in msgs:
                body = json.loads(msg.data)
                commit = dt.datetime.fromisoformat(body["source"]["commit_ts"])
                out.append((msg.metadata.timestamp - commit).total_seconds())
            await asyncio.gather(*(m.ack() for m in msgs))
    finally:
        await nc.close()
    return out


def _percentiles(values: list[float], qs: list[float]) -> dict[str, float]:
    values = sorted(values)
    out: dict[str, float] = {"count": float(len(values))}
    for q in qs:
        out[f"p{q * 100:g}"] = values[min(len(values) - 1, int(q * len(values)))] if values else 0
    return out


#: --latency-variants: name → (nats.atomic_batches, JetStream store on tmpfs).
LATENCY_VARIANTS = {
    "batches": (True, False),
    "no-batches": (False, False),
    "batches-tmpfs": (True, True),
}
_TMPFS = Path("/dev/shm")


def latency_variant(
    postgres: LocalPostgres, args: argparse.Namespace, workdir: Path, variant: str
) -> dict[str, Any]:
    """One latency run with its own nats-server (its store on tmpfs for *-tmpfs)."""
    atomic, tmpfs = LATENCY_VARIANTS[variant]
    if tmpfs and not _TMPFS.is_dir():
        return {"variant": variant, "skipped": "no /dev/shm here"}
    server = start_nats(base_dir=_TMPFS / "cdc-bridge-bench") if tmpfs else start_nats()
    try:
        slot = f"latency_{variant.replace('-', '_')}"
        result = latency_mode(
            postgres, server, args, workdir, slot=slot, nats={"atomic_batches": atomic}
        )
    finally:
        server.cleanup()
    return {"variant": variant, "atomic_batches": atomic, "tmpfs_store": tmpfs, **result}


def latency_mode(
    postgres: LocalPostgres,
    server: LocalNats,
    args: argparse.Namespace,
    workdir: Path,
    *,
    slot: str = "latency",
    nats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    stream = slot.upper()
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    port = free_port()
    target = Target(
        dsn=postgres.dsn(),
        nats_url=server.url,
        pg_bin=postgres.bin_dir,
        slot=slot,
        end_lsn="",
        expected=0,
        workdir=workdir,
        extra_config={
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": port},
            "nats": nats or {},
        },
    )
    config_file = workdir / f"{slot}.yaml"
    config_file.write_text(yaml.safe_dump(cdc_bridge_config(target, stream)))
    log = workdir / f"{slot}.log"
    with log.open("wb") as log_file:
        bridge = subprocess.Popen(cdc_bridge_argv(config_file), stderr=log_file, stdout=log_file)
    sampler = TreeSampler(bridge.pid)
    qs = [0.5, 0.99, 0.999]
    spy: subprocess.Popen[bytes] | None = None
    stacks = workdir / f"{slot}-stacks.txt"
    try:
        deadline = time.monotonic() + 60
        while True:  # ready = streaming from the slot
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if bridge.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bridge not ready: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        if args.profile_latency:
            py_spy = str(Path(sys.executable).parent / "py-spy")
            spy_argv = [py_spy, "record", "-p", str(bridge.pid), "-r", "100", "-f", "raw"]
            spy = subprocess.Popen(
                [*spy_argv, "-o", str(stacks), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        workload = Workload(postgres.dsn(), mix=args.mix, toast_share=args.toast_share)
        try:
            written = workload.steady(args.latency_rate, args.latency_seconds, args.latency_tx)
        finally:
            workload.close()

        async def count() -> int:
            nc = await nats_client.connect(server.url)
            try:
                return int((await nc.jetstream().stream_info(stream)).state.messages)
            finally:
                await nc.close()

        while asyncio.run(count()) < written:
            if bridge.poll() is not None:
                raise RuntimeError(f"bridge exited: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        sampler.stop()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics_text = r.read().decode()
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        if bridge.poll() is None:
            bridge.terminate()
            bridge.wait(60)
    stored = asyncio.run(_stored_latencies(server.url, stream))
    result = {
        "rate": args.latency_rate,
        "seconds": args.latency_seconds,
        "tx_size": args.latency_tx,
        "changes": written,
        "histogram": _histogram_quantiles(metrics_text, "cdc_bridge_commit_to_ack_seconds", qs),
        "stored": _percentiles(stored, qs),
        "cpu_s": sampler.cpu_s,
        "peak_rss_mib": sampler.peak_rss_mib,
    }
    if spy is not None and stacks.exists():
        counts = breakdown(stacks)
        total = sum(counts.values()) or 1
        result["profile"] = {k: n / total for k, n in counts.most_common()}
        result["profile_us_per_change"] = {
            k: n / 100 / written * 1e6 for k, n in counts.most_common()
        }
    print(f"[latency] {json.dumps(result)}", flush=True)
    return result


def big_transaction(rows: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(_HERE / "big_transaction.py"), str(rows)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    text = proc.stdout + proc.stderr
    print(f"[big] {text.strip()}", flush=True)
    m = re.search(r"after the commit \(([\d,]+) rows/s\); bridge peak RSS (\d+) MiB", text)
    t = re.search(r"all in the stream ([\d.]+)s after the commit", text)
    if proc.returncode != 0 or not m or not t:
        return {"ok": False, "rows": rows, "error": text[-2000:]}
    return {
        "ok": True,
        "rows": rows,
        "seconds_after_commit": float(t.group(1)),
        "rows_per_s": int(m.group(1).replace(",", "")),
        "peak_rss_mib": int(m.group(2)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="backlog changes")
    parser.add_argument("--tx-size", type=int, default=1000, help="changes per transaction")
    parser.add_argument(
        "--single-rows", type=int, default=20_000, help="changes of the 1-change-tx case; 0 skips"
    )
    parser.add_argument("--mix", type=Mix.parse, default=Mix(), help="insert/update/delete")
    parser.add_argument("--toast-share", type=float, default=0.02, help="rows > 8 kB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--contenders",
        type=lambda s: s.split(","),
        default=list(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    parser.add_argument("--latency-rate", type=float, default=2000.0, help="changes/s")
    parser.add_argument("--latency-seconds", type=float, default=60.0, help="0 skips")
    parser.add_argument("--latency-tx", type=int, default=10, help="changes per transaction")
    parser.add_argument(
        "--latency-variants",
        type=lambda s: s.split(","),
        default=list(LATENCY_VARIANTS),
        help=f"comma-separated subset of {','.join(LATENCY_VARIANTS)}",
    )
    parser.add_argument(
        "--profile-latency", action="store_true", help="py-spy the bridge in latency mode"
    )
    parser.add_argument("--big-rows", type=int, default=2_000_000, help="0 skips")
    parser.add_argument("--out", type=Path, default=_HERE / "results")
    args = parser.parse_args(argv)
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {CONTENDERS}")
    unknown = set(args.latency_variants) - set(LATENCY_VARIANTS)
    if unknown:
        parser.error(f"unknown latency variants {sorted(unknown)}; known: {list(LATENCY_VARIANTS)}")

    started = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "cases": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="cdc-bridge-bench-"))
    postgres = start_postgres(settings={"max_wal_size": "4GB", "wal_sender_timeout": "0"})
    server = start_nats()
    try:
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            create_schema(conn)
        report["postgres"] = postgres.server_version_num
        cases = [("backlog", args.rows, args.tx_size)]
        if args.single_rows:
            cases.append(("single", args.single_rows, 1))
        for name, changes, tx_size in cases:
            report["cases"].append(
                backlog_case(
                    name, postgres, server, args, changes=changes, tx_size=tx_size, workdir=workdir
                )
            )
        if args.latency_seconds > 0:
            variants = [
                latency_variant(postgres, args, workdir, variant)
                for variant in args.latency_variants
            ]
            report["latency_variants"] = variants
            ran = [v for v in variants if "skipped" not in v]
            if ran:
                report["latency"] = ran[0]
    finally:
        server.cleanup()
        postgres.cleanup()
    if args.big_rows:
        report["big_transaction"] = big_transaction(args.big_rows)
    report["seconds"] = (dt.datetime.now(dt.UTC) - started).total_seconds()
    paths = write_reports(report, args.out, started.strftime("%Y-%m-%dT%H%M"))
    print("\n" + paths["md"].read_text())
    for path in paths.values():
        print(f"wrote {path}")


def _machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import os

    return {"cpus": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0]}


if __name__ == "__main__":
    main()
