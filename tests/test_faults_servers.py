"""Server faults mid-stream: the bridge recovers by itself and the stream stays exact.

Every test streams a table that a concurrent :class:`~tests.fixtures.workload.Workload`
keeps writing while a server fault happens: nats-server or PostgreSQL killed or
restarted, the bridge's connection to either cut or silently stalled, NATS down for
longer than the stream's duplicate window, a walsender dropped by
``wal_sender_timeout``. The bridge process must survive (reconnecting on its own, as
its log says) and the stream must hold every committed change exactly once, in order
per key.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc_bridge.local_servers import LocalNats, LocalPostgres, start_nats, start_postgres
from tests.fixtures.bridge import BridgeProcess, read_stream, wait_for_messages, write_config
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.servers import NatsServer
from tests.fixtures.workload import (
    Workload,
    compare_stream_with_history,
    create_workload_table,
    read_history,
)

pytestmark = [pytest.mark.servers, pytest.mark.faults]

TABLE = "items"
TABLES = {f"public.{TABLE}": {"subject": "items.{op}"}}
STREAMING = "streaming slot"
RECONNECTING = "reconnecting in"

#: How the first reconnect after each kind of fault must explain itself.
NATS_LOST = r"(?i)\bnats\b|PubAck"  # "NATS reported ...", "publish to x failed: nats: ..."
NO_PUBACK = r"no PubAck for \S+ within 2s|NATS has not taken a message for \d+s"
PG_LOST = r"replication|PostgreSQL"

#: Short timeouts, so that a fault is noticed and recovered from within seconds.
FAST: dict[str, dict[str, Any]] = {
    "nats": {"ack_timeout": 2, "connect_timeout": 1},
    "postgres": {"connect_timeout": 2, "status_interval": 1},
    "reconnect": {"initial_delay": 0.2, "max_delay": 1},
}


@dataclass
class Outcome:
    """What one fault run did, for the assertions and the -s report line."""

    changes: int  # committed history rows
    committed: int  # committed workload transactions
    workload_errors: int
    reconnects: int
    sessions: int  # "streaming slot" lines: 1 + the sessions after reconnects
    during_fault: int  # workload transactions committed while the fault lasted
    recovery: float  # seconds from the end of the fault to the next "streaming slot"
    catch_up: float  # seconds from the workload's end until the stream held everything
    log: str = field(repr=False, default="")

    def reconnect_reasons(self) -> list[str]:
        return [line for line in self.log.splitlines() if RECONNECTING in line]


def _extra(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    merged = {name: dict(values) for name, values in FAST.items()}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return merged


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    return host, int(port)


def _pg_target(dsn: str) -> tuple[str, int]:
    params = conninfo_to_dict(dsn)
    return str(params.get("host") or "127.0.0.1"), int(str(params.get("port") or 5432))


def _via(dsn: str, proxy: TcpProxy) -> str:
    """`dsn` pointed at the proxy instead of the server."""
    return make_conninfo(dsn, host="127.0.0.1", port=str(proxy.port))


@contextlib.contextmanager
def _private_database(server: LocalPostgres) -> Iterator[str]:
    """DSN of a new database on a private server (the server's cleanup removes it)."""
    name = f"cdc_faults_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield server.dsn(name)


@contextlib.contextmanager
def _private_postgres(settings: dict[str, str] | None = None) -> Iterator[LocalPostgres]:
    server = start_postgres(settings=settings)
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def _private_nats() -> Iterator[LocalNats]:
    server = start_nats()
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def _proxy(host: str, port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(host, port)
    try:
        yield proxy
    finally:
        proxy.close()


def _alive(bridge: BridgeProcess) -> bool:
    return bridge.process is not None and bridge.process.poll() is None


def _wait_for_sessions(bridge: BridgeProcess, count: int, timeout: float) -> float:
    """Wait until the log has `count` "streaming slot" lines; return when that was."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bridge.log_text().count(STREAMING) >= count:
            return time.monotonic()
        assert _alive(bridge), f"the bridge exited:\n{bridge.log_text()}"
        time.sleep(0.05)
    raise AssertionError(
        f"the bridge did not stream again within {timeout}s of the fault's end:\n"
        f"{bridge.log_text()}"
    )


def _run_fault(
    tmp_path: Path,
    *,
    dsn: str,
    nats_url: str,
    stream: str,
    fault: Callable[[], None],
    bridge_dsn: str | None = None,
    bridge_nats_url: str | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    workers: int = 3,
    rate: float = 12.0,
    seed: int = 1,
) -> Outcome:
    """Stream `TABLE` while a workload writes and `fault()` happens; check exactness.

    `dsn`/`nats_url` reach the servers directly (workload, checks); the bridge uses
    `bridge_dsn`/`bridge_nats_url` (a proxy) when given. `fault()` returns once the
    fault is over (server back, link restored).
    """
    create_workload_table(dsn, TABLE)
    config = write_config(
        tmp_path / "config.yaml",
        dsn=bridge_dsn or dsn,
        nats_url=bridge_nats_url or nats_url,
        stream=stream,
        tables=TABLES,
        extra=extra if extra is not None else _extra(),
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    workload = Workload(
        dsn,
        TABLE,
        workers=workers,
        rate=rate,
        large_ops=(50, 300),
        large_every=25,
        seed=seed,
    )
    try:
        bridge.start()
        workload.start_background()
        # Streaming real changes for a while, so that the fault hits a busy pipeline.
        time.sleep(1.5)
        wait_for_messages(nats_url, stream, 100, timeout=30)
        sessions_before = bridge.log_text().count(STREAMING)
        assert sessions_before == 1, bridge.log_text()
        committed_before = workload.committed
        fault()
        healed = time.monotonic()
        during_fault = workload.committed - committed_before
        streaming_again = _wait_for_sessions(bridge, sessions_before + 1, timeout=45)
        recovery = streaming_again - healed
        # Keep writing for a while with the new session, then let the bridge catch up.
        time.sleep(1.5)
        workload.stop_background()
        assert workload.committed > committed_before + during_fault, (
            "the workload wrote nothing after the fault"
        )
        stopped = time.monotonic()
        history = read_history(dsn, TABLE)
        wait_for_messages(nats_url, stream, len(history), timeout=90)
        catch_up = time.monotonic() - stopped
        # It recovered by itself: still the same process, which never gave up.
        assert _alive(bridge), f"the bridge exited:\n{bridge.log_text()}"
        log = bridge.log_text()
        comparison = compare_stream_with_history(
            read_stream(nats_url, stream), history, table=TABLE
        )
        assert comparison.exact, (
            "stream differs from the committed history\n"
            + comparison.summary()
            + f"\n--- bridge log ---\n{log}"
        )
        outcome = Outcome(
            changes=len(history),
            committed=workload.committed,
            workload_errors=workload.errors,
            reconnects=log.count(RECONNECTING),
            sessions=log.count(STREAMING),
            during_fault=during_fault,
            recovery=recovery,
            catch_up=catch_up,
            log=log,
        )
        assert bridge.terminate() == 0, bridge.log_text()
        # Nothing more arrived after the comparison (a late re-send, say).
        again = compare_stream_with_history(read_stream(nats_url, stream), history, table=TABLE)
        assert again.exact, "changed after the bridge stopped\n" + again.summary()
    finally:
        with contextlib.suppress(Exception):
            workload.stop_background()
        bridge.stop_quietly()
    print(f"\n{stream}: {outcome}")
    return outcome


def _assert_reconnected(outcome: Outcome, reason: str | None = None) -> None:
    """The bridge noticed the fault (because of `reason`, a regex) and streamed again."""
    assert outcome.reconnects >= 1, f"no reconnect logged:\n{outcome.log}"
    assert outcome.sessions >= 2, f"the bridge never streamed again:\n{outcome.log}"
    if reason is not None:
        first = outcome.reconnect_reasons()[0]
        assert re.search(reason, first), f"first reconnect not for {reason!r}: {first}"


# --------------------------------------------------------------------------- NATS


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_nats_server_killed_and_restarted_mid_stream(
    database: str, tmp_path: Path, how: str
) -> None:
    with _private_nats() as server:

        def fault() -> None:
            if how == "kill":
                server.kill()  # SIGKILL: a crash; JetStream's file store survives
            else:
                server.stop()  # SIGTERM: a graceful shutdown
            time.sleep(2)
            server.start()

        outcome = _run_fault(
            tmp_path, dsn=database, nats_url=server.url, stream=f"nats_{how}", fault=fault
        )
    _assert_reconnected(outcome, NATS_LOST)
    assert outcome.during_fault > 0, "nothing was written while NATS was down"


def test_nats_connection_cut_and_restored(
    database: str, nats: NatsServer, stream_name: str, tmp_path: Path
) -> None:
    with _proxy(*_host_port(nats.url)) as proxy:

        def fault() -> None:
            proxy.cut()
            time.sleep(2)
            proxy.restore()

        outcome = _run_fault(
            tmp_path,
            dsn=database,
            nats_url=nats.url,
            bridge_nats_url=proxy.url,
            stream=stream_name,
            fault=fault,
            seed=3,
        )
    _assert_reconnected(outcome, NATS_LOST)
    assert outcome.during_fault > 0


def test_nats_down_longer_than_the_duplicate_window(database: str, tmp_path: Path) -> None:
    """JetStream has forgotten the Msg-Ids: only the read-back keeps re-sends out."""
    with _private_nats() as server:

        def fault() -> None:
            server.kill()
            time.sleep(3.5)  # > duplicate_window 1s, with the workload still writing
            server.start()

        outcome = _run_fault(
            tmp_path,
            dsn=database,
            nats_url=server.url,
            stream="dupwindow_kill",
            fault=fault,
            extra=_extra(nats={"duplicate_window": 1}),
            seed=4,
        )
    _assert_reconnected(outcome, NATS_LOST)
    assert outcome.during_fault > 0, "nothing was written while NATS was down"


@pytest.mark.parametrize(
    "hold",
    [
        "stalled",  # nothing either way: no PubAck within ack_timeout
        pytest.param("holding_replies", marks=pytest.mark.long_faults),  # stored, acks held
    ],
)
def test_nats_link_stalled_longer_than_the_duplicate_window(
    database: str, nats: NatsServer, stream_name: str, tmp_path: Path, hold: str
) -> None:
    """No PubAck within ack_timeout → reconnect; then the held data arrives late."""
    with _proxy(*_host_port(nats.url)) as proxy:

        def fault() -> None:
            with getattr(proxy, hold)():
                time.sleep(4.5)  # > ack_timeout 2s and > duplicate_window 1s

        outcome = _run_fault(
            tmp_path,
            dsn=database,
            nats_url=nats.url,
            bridge_nats_url=proxy.url,
            stream=stream_name,
            fault=fault,
            extra=_extra(nats={"duplicate_window": 1}),
            seed=5 if hold == "stalled" else 9,
        )
    _assert_reconnected(outcome, NO_PUBACK)
    assert outcome.during_fault > 0


# --------------------------------------------------------------------------- PostgreSQL


@pytest.mark.parametrize(
    "mode", ["fast", "immediate", pytest.param("kill", marks=pytest.mark.long_faults)]
)
def test_postgres_restarted_mid_stream(
    nats: NatsServer, stream_name: str, tmp_path: Path, mode: str
) -> None:
    with _private_postgres() as server, _private_database(server) as dsn:

        def fault() -> None:
            if mode == "kill":
                server.kill()  # SIGKILL of the postmaster and its children: a crash
            else:
                server.stop(mode)
            time.sleep(1.5)
            server.start()

        outcome = _run_fault(
            tmp_path, dsn=dsn, nats_url=nats.url, stream=stream_name, fault=fault, seed=6
        )
    _assert_reconnected(outcome, PG_LOST)


def test_postgres_connection_cut_and_restored(
    database: str, nats: NatsServer, stream_name: str, tmp_path: Path
) -> None:
    with _proxy(*_pg_target(database)) as proxy:

        def fault() -> None:
            proxy.cut()
            time.sleep(2)
            proxy.restore()

        outcome = _run_fault(
            tmp_path,
            dsn=database,
            nats_url=nats.url,
            bridge_dsn=_via(database, proxy),
            stream=stream_name,
            fault=fault,
            seed=7,
        )
    _assert_reconnected(outcome, PG_LOST)
    assert outcome.during_fault > 0


def test_postgres_wal_sender_timeout(nats: NatsServer, stream_name: str, tmp_path: Path) -> None:
    """The link stalls; the server drops the silent walsender after 2s."""
    with (
        _private_postgres({"wal_sender_timeout": "2s"}) as server,
        _private_database(server) as dsn,
        _proxy(server.host, server.port) as proxy,
    ):

        def fault() -> None:
            with proxy.stalled():
                time.sleep(4)

        outcome = _run_fault(
            tmp_path,
            dsn=dsn,
            nats_url=nats.url,
            bridge_dsn=_via(dsn, proxy),
            stream=stream_name,
            fault=fault,
            seed=8,
        )
        assert "replication timeout" in server.log_file.read_text(errors="replace"), (
            "the server did not drop the walsender: the fault did not happen"
        )
    _assert_reconnected(outcome, r"replication (connection lost|stream ended)")
    assert outcome.during_fault > 0
