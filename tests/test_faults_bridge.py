"""Bridge faults under a concurrent workload: SIGKILLs, an expired duplicate window, a
standby taking over, and a transaction larger than the atomic batch limit.

Every test runs a :class:`~tests.fixtures.workload.Workload` against a table while the
bridge is broken on purpose, stops the workload, waits for the stream to catch up, and
then requires the stream to hold exactly the committed history: nothing missing,
nothing twice, every key's changes in commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats as nats_client
import orjson
import psycopg
import pytest

from cdc_bridge.local_servers import free_port
from cdc_bridge.lsn import format_lsn, parse_lsn
from tests.fixtures.bridge import (
    BridgeProcess,
    StreamedMessage,
    read_stream,
    slot_state,
    wait_for_messages,
    wait_slot_inactive,
    write_config,
)
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.workload import (
    Workload,
    compare_stream_with_history,
    create_workload_table,
    read_history,
)

pytestmark = [pytest.mark.servers, pytest.mark.faults]

TABLE = "items"
SLOT = "cdc_bridge"
SKIP_LOG = "the stream already holds changes up to"


# --------------------------------------------------------------------------- helpers


def _config(
    path: Path,
    database: str,
    nats_url: str,
    stream: str,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "reconnect": {"initial_delay": 0.2, "max_delay": 1, "standby_interval": 0.5}
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    return write_config(
        path,
        dsn=database,
        nats_url=nats_url,
        stream=stream,
        tables={f"public.{TABLE}": {"subject": "items.{op}"}},
        slot=SLOT,
        extra=sections,
    )


def _stream_count(url: str, stream: str) -> int:
    """Messages in the stream now (0 while the stream does not exist yet)."""
    try:
        return wait_for_messages(url, stream, 0, timeout=5)
    except AssertionError:
        return 0


def _last_stored_commit(messages: list[StreamedMessage]) -> int | None:
    """The highest commit LSN among the stored messages (they are all of our slot)."""
    lsns = [parse_lsn(m.body["source"]["commit_lsn"]) for m in messages]
    return max(lsns) if lsns else None


async def _newest_commit_async(url: str, stream: str) -> int | None:
    nc = await nats_client.connect(url)
    try:
        js = nc.jetstream()
        last = (await js.stream_info(stream)).state.last_seq
        if not last:
            return None
        body = orjson.loads((await js.get_msg(stream, last)).data or b"{}")
        return parse_lsn(body["source"]["commit_lsn"])
    finally:
        await nc.close()


def _newest_commit(url: str, stream: str) -> int | None:
    """The commit LSN of the stream's last message (the stream is in commit order)."""
    return asyncio.run(_newest_commit_async(url, stream))


def _log_tail(*bridges: BridgeProcess, lines: int = 60) -> str:
    parts = []
    for bridge in bridges:
        text = bridge.log_text().splitlines()[-lines:]
        parts.append(f"--- {bridge.log_path.name} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(parts)


def _finish(
    database: str,
    nats_url: str,
    stream: str,
    workload: Workload,
    bridge: BridgeProcess,
    context: str,
    *others: BridgeProcess,
) -> int:
    """Stop the workload, let the running bridge catch up, and require exactness.

    Also requires the slot, once the bridge has caught up, to confirm at least every
    transaction whose messages are in the stream (not behind what was acknowledged).
    Returns the number of committed changes.
    """
    workload.stop_background()
    history = read_history(database, TABLE)
    with contextlib.suppress(AssertionError):  # the comparison says precisely what is missing
        wait_for_messages(nats_url, stream, len(history), timeout=60)
    messages = read_stream(nats_url, stream)
    comparison = compare_stream_with_history(messages, history, table=TABLE)
    assert comparison.exact, f"{context}\n{comparison.summary()}\n{_log_tail(bridge, *others)}"
    assert comparison.stream_count == len(messages), "the stream holds foreign messages"

    last = _last_stored_commit(messages)
    assert last is not None
    deadline = time.monotonic() + 15
    confirmed, _ = slot_state(database, SLOT)
    while confirmed <= last:
        assert time.monotonic() < deadline, (
            f"{context}: the slot confirms {format_lsn(confirmed)}, behind the last "
            f"published commit {format_lsn(last)}\n{_log_tail(bridge)}"
        )
        time.sleep(0.1)
        confirmed, _ = slot_state(database, SLOT)
    assert bridge.terminate() == 0, _log_tail(bridge)
    return len(history)


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


def _gauge(port: int, name: str) -> float:
    """The value of an unlabelled gauge on a bridge's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        metric, _, value = line.partition(" ")
        if metric == name:
            return float(value)
    raise AssertionError(f"no {name} on /metrics:\n{text}")


def _wait_readyz(port: int, status: int, timeout: float = 10.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = _readyz(port)
        except OSError:
            got = (-1, "no answer")
        if got[0] == status or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _restart_after_kill(
    bridge: BridgeProcess, database: str, nats_url: str, stream: str, context: str
) -> tuple[bool, bool]:
    """Restart a killed bridge; return (the stream was ahead of the slot, skip logged).

    When the stream holds a commit at or past the slot's confirmed LSN (published but
    not confirmed before the kill), the bridge must say that it will not re-send it.
    """
    wait_slot_inactive(database, SLOT, timeout=15)
    confirmed, _ = slot_state(database, SLOT)
    last = _newest_commit(nats_url, stream)
    ahead = last is not None and last >= confirmed
    offset = len(bridge.log_path.read_bytes())
    try:
        bridge.start(timeout=30)
    except AssertionError as error:
        raise AssertionError(f"{context}: the bridge did not restart: {error}") from None
    new_log = bridge.log_path.read_bytes()[offset:].decode(errors="replace")
    logged = SKIP_LOG in new_log
    if ahead:
        assert logged, (
            f"{context}: the stream holds commit {format_lsn(last or 0)} past the "
            f"slot's confirmed {format_lsn(confirmed)} but the restarted bridge did not "
            f"read it back:\n{new_log}"
        )
    return ahead, logged


# --------------------------------------------------------------------------- 1. SIGKILL


@pytest.mark.parametrize(
    ("kills", "workers", "rate", "large_ops"),
    [
        pytest.param(5, 3, 20.0, (100, 400), id="ci"),
        pytest.param(15, 4, 15.0, (300, 1200), id="long", marks=[pytest.mark.long_faults]),
    ],
)
def test_bridge_sigkilled_repeatedly_loses_and_duplicates_nothing(
    database: str,
    nats: Any,
    stream_name: str,
    tmp_path: Path,
    cleanup: list[Any],
    kills: int,
    workers: int,
    rate: float,
    large_ops: tuple[int, int],
) -> None:
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    context = f"seed {seed}, {kills} kills"
    print(context)  # shown with the captured output of a failure
    create_workload_table(database, TABLE)
    bridge = BridgeProcess(
        _config(tmp_path / "config.yaml", database, nats.url, stream_name),
        tmp_path / "bridge.log",
    )
    cleanup.append(bridge)
    bridge.start()
    workload = Workload(
        database,
        TABLE,
        workers=workers,
        rate=rate,
        large_every=20,
        large_ops=large_ops,
        seed=seed,
    )
    cleanup.append(workload)
    workload.start_background()

    ahead_count = skipped = 0
    for number in range(1, kills + 1):
        time.sleep(rng.uniform(0.2, 2.0))
        bridge.kill()
        ahead, logged = _restart_after_kill(
            bridge, database, nats.url, stream_name, f"{context}, kill {number}"
        )
        ahead_count += ahead
        skipped += logged
    time.sleep(rng.uniform(0.5, 1.5))  # the last restarted bridge streams under load

    changes = _finish(database, nats.url, stream_name, workload, bridge, context)
    assert workload.committed > 0
    print(
        f"{context}: {changes} changes in {workload.committed} transactions, "
        f"stream ahead of the slot at {ahead_count} kills, read-back skip logged "
        f"{skipped} times, workload errors {workload.errors}"
    )


# --------------------------------------------------------------------------- 2. window


def test_bridge_restarted_after_the_duplicate_window_duplicates_nothing(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    """Without the read-back, re-sent changes past the 1 s window would be duplicated."""
    create_workload_table(database, TABLE)
    host, port = nats.url.removeprefix("nats://").rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    cleanup.append(proxy)
    bridge = BridgeProcess(
        _config(
            tmp_path / "config.yaml",
            database,
            proxy.url,
            stream_name,
            {"nats": {"duplicate_window": 1}},
        ),
        tmp_path / "bridge.log",
    )
    cleanup.append(bridge)
    bridge.start()
    workload = Workload(
        database, TABLE, workers=3, rate=25, large_every=15, large_ops=(50, 200), seed=7
    )
    cleanup.append(workload)
    workload.start_background()

    # Round 1: kill right after the bridge published something.
    before = _stream_count(nats.url, stream_name)
    wait_for_messages(nats.url, stream_name, before + 20, timeout=20)
    bridge.kill()
    time.sleep(2.5)  # the duplicate window (1 s) has long expired
    _restart_after_kill(bridge, database, nats.url, stream_name, "kill 1")

    # Round 2, deterministic: JetStream stores the messages but the PubAcks are held,
    # so the slot cannot have confirmed them when the bridge dies.
    time.sleep(1)
    with proxy.holding_replies():
        before = _stream_count(nats.url, stream_name)
        # Stored while their PubAcks are held: new messages, or the batches that were
        # already in flight when the hold began (then the bridge may open no more: at
        # most 2 small batches await a PubAck, sink.py). `ahead` below proves that the
        # stream got ahead of the slot either way.
        _wait_for_count(nats.url, stream_name, before + 2, timeout=5)
        bridge.kill()
    time.sleep(2.5)
    ahead, logged = _restart_after_kill(bridge, database, nats.url, stream_name, "kill 2")
    assert ahead, "the slot confirmed changes whose PubAcks were held back"
    assert logged

    time.sleep(1)
    changes = _finish(
        database, nats.url, stream_name, workload, bridge, "duplicate window 1 s, 2 kills"
    )
    print(f"{changes} changes, {workload.committed} transactions")


# --------------------------------------------------------------------------- 3. standby


def test_standby_takes_over_when_the_active_bridge_dies(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    create_workload_table(database, TABLE)
    ports = free_port(), free_port()
    bridges = []
    for name, port in zip(("active", "standby"), ports, strict=True):
        config = _config(
            tmp_path / f"{name}.yaml",
            database,
            nats.url,
            stream_name,
            {"metrics": {"host": "127.0.0.1", "port": port}},
        )
        bridges.append(BridgeProcess(config, tmp_path / f"{name}.log"))
    active, standby = bridges
    cleanup.extend(bridges)
    active.start()
    workload = Workload(
        database, TABLE, workers=3, rate=25, large_every=20, large_ops=(50, 300), seed=11
    )
    cleanup.append(workload)
    workload.start_background()

    standby.start(wait_streaming=False)
    standby.wait_for_log("standing by:", 30)
    assert _gauge(ports[1], "cdc_bridge_standby") == 1
    assert _gauge(ports[0], "cdc_bridge_standby") == 0
    status, body = _wait_readyz(ports[0], 200)
    assert (status, body.strip()) == (200, "ready"), body
    # A standby is ready in its role (docs/operations.md, commit bf95765): 200, and the
    # text (with cdc_bridge_standby above) tells the roles apart.
    status, body = _wait_readyz(ports[1], 200)
    assert status == 200, f"the standby's /readyz: {status} {body}"
    assert body.startswith("ready, standing by: "), body
    assert "in use by another process" in body, body
    time.sleep(1.5)  # the standby retries a few times (every 0.5 s) while load runs
    assert "streaming slot" not in standby.log_text(), _log_tail(standby)

    wait_for_messages(nats.url, stream_name, _stream_count(nats.url, stream_name) + 10, 20)
    active.kill()
    killed = time.monotonic()
    standby.wait_for_log("streaming slot", 10)
    takeover = time.monotonic() - killed
    assert "took over slot" in standby.log_text(), _log_tail(standby)
    status, body = _wait_readyz(ports[1], 200)
    assert (status, body.strip()) == (200, "ready"), body
    assert _gauge(ports[1], "cdc_bridge_standby") == 0
    assert takeover < 10

    time.sleep(2)  # the workload goes on against the new active bridge
    changes = _finish(
        database, nats.url, stream_name, workload, standby, "standby takeover", active
    )
    print(f"takeover after {takeover:.2f}s; {changes} changes")


# --------------------------------------------------------------------------- 4. chunks


def test_transaction_larger_than_the_batch_limit_killed_midway(
    database: str, nats: Any, stream_name: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    big, chunk = 5000, 100
    create_workload_table(database, TABLE)
    bridge = BridgeProcess(
        _config(
            tmp_path / "config.yaml",
            database,
            nats.url,
            stream_name,
            {"nats": {"atomic_batch_size": chunk}},
        ),
        tmp_path / "bridge.log",
    )
    cleanup.append(bridge)
    bridge.start()
    workload = Workload(database, TABLE, workers=2, rate=10, large_every=None, seed=3)
    cleanup.append(workload)
    workload.start_background()
    time.sleep(0.5)

    def stored_big() -> list[StreamedMessage]:
        return [m for m in read_stream(nats.url, stream_name) if _row_id(m) < 0]

    with psycopg.connect(database) as conn:
        conn.execute(
            "INSERT INTO items (id, version, body) "
            "SELECT -g, 1, 'big-' || g FROM generate_series(1, %s) g",
            (big,),
        )
    assert _wait_last_row_negative(nats.url, stream_name, timeout=30), _log_tail(bridge)
    bridge.kill()
    # The server may still be storing a batch whose commit it got before the kill: a
    # reader can see a batch's first messages a moment before the rest. Read once the
    # stream holds still.
    _wait_stable_count(nats.url, stream_name)
    at_kill = stored_big()
    assert 0 < len(at_kill) < big, (
        f"{len(at_kill)} of {big} messages stored when killed: not midway"
    )
    assert len(at_kill) % chunk == 0, (
        f"{len(at_kill)} messages of the transaction stored: a chunk is not atomic"
    )
    ahead, logged = _restart_after_kill(bridge, database, nats.url, stream_name, "big kill")
    assert ahead, "the slot confirmed a transaction that is only partly in the stream"
    assert logged
    time.sleep(1)

    changes = _finish(database, nats.url, stream_name, workload, bridge, "big transaction")

    messages = stored_big()
    assert len(messages) == big
    assert len({m.body["source"]["commit_lsn"] for m in messages}) == 1
    assert [m.body["source"]["index"] for m in messages] == sorted(
        m.body["source"]["index"] for m in messages
    )
    batches: dict[str, list[StreamedMessage]] = defaultdict(list)
    for message in messages:
        batch_id = message.headers.get("Nats-Batch-Id")
        assert batch_id, f"seq {message.seq} has no Nats-Batch-Id: {message.headers}"
        batches[batch_id].append(message)
    for batch_id, members in batches.items():
        assert len(members) <= chunk, f"batch {batch_id}: {len(members)} messages"
        sequences = [int(m.headers["Nats-Batch-Sequence"]) for m in members]
        assert sequences == list(range(1, len(members) + 1)), (batch_id, sequences)
        commits = [m.headers.get("Nats-Batch-Commit") for m in members]
        assert commits == [None] * (len(members) - 1) + ["1"], (batch_id, commits)
        seqs = [m.seq for m in members]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a chunk is interleaved"
    assert len(batches) == big // chunk, sorted(len(m) for m in batches.values())
    print(f"{changes} changes; killed with {len(at_kill)} of {big} stored, {len(batches)} chunks")


async def _poll_last_row_negative(url: str, stream: str, within: float) -> bool:
    """Whether the stream's last message came to carry a negative row id in time."""
    nc = await nats_client.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            last = (await js.stream_info(stream)).state.last_seq
            if last:
                body = orjson.loads((await js.get_msg(stream, last)).data or b"{}")
                row = body.get("after") or body.get("before") or {}
                if int(row.get("id", 0)) < 0:
                    return True
            await asyncio.sleep(0.005)
        return False
    finally:
        await nc.close()


def _wait_last_row_negative(url: str, stream: str, timeout: float) -> bool:
    return asyncio.run(_poll_last_row_negative(url, stream, timeout))


def _wait_stable_count(url: str, stream: str, quiet: float = 1.0, timeout: float = 15.0) -> None:
    """Wait until the stream's message count has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = _stream_count(url, stream), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _stream_count(url, stream)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError(f"stream {stream} kept changing for {timeout}s after the kill")


def _wait_for_count(url: str, stream: str, count: int, timeout: float) -> bool:
    """Whether the stream holds ``count`` messages within ``timeout`` (no failure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _stream_count(url, stream) >= count:
            return True
        time.sleep(0.1)
    return False


def _row_id(message: StreamedMessage) -> int:
    row = message.body.get("after") or message.body.get("before") or {}
    return int(row.get("id", 0))
