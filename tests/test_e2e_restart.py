"""Restarts: SIGTERM and SIGKILL mid-stream lose nothing and duplicate nothing.

A writer commits small transactions continuously while the bridge is stopped with
SIGTERM, started, killed with SIGKILL, and started again. The stream must then hold
every committed change exactly once, in commit order, and the slot's confirmed position
must never have been ahead of what JetStream acknowledged.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_bridge.local_servers import start_nats
from cdc_bridge.lsn import parse_lsn
from cdc_bridge.pgoutput import Commit, decode_message
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

pytestmark = pytest.mark.servers


@dataclass(frozen=True)
class Committed:
    ids: tuple[int, ...]
    upper_lsn: int  # WAL insert position right after the commit: >= the commit's end


class Writer:
    """Commits transactions of 1-3 inserts (and an update every 4th), remembering each."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.committed: list[Committed] = []
        self.changes = 0

    def write(self, transactions: int) -> None:
        for _ in range(transactions):
            number = len(self.committed)
            with self.conn.transaction():
                ids = []
                for position in range(number % 3 + 1):
                    row = self.conn.execute(
                        "INSERT INTO items (tx, position) VALUES (%s, %s) RETURNING id",
                        (number, position),
                    ).fetchone()
                    assert row is not None
                    ids.append(int(row[0]))
                self.changes += len(ids)
                if number % 4 == 3:
                    self.conn.execute("UPDATE items SET touched = true WHERE id = %s", (ids[0],))
                    self.changes += 1
            lsn = self.conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert lsn is not None
            self.committed.append(Committed(tuple(ids), parse_lsn(str(lsn[0]))))

    def write_in_background(self, transactions: int) -> threading.Thread:
        thread = threading.Thread(target=self.write, args=(transactions,))
        thread.start()
        return thread


def _assert_confirmed_not_ahead(dsn: str, url: str, stream: str, writer: Writer) -> None:
    """Every transaction that ended at or before the confirmed LSN is fully in the stream."""
    confirmed, _ = slot_state(dsn, "cdc_bridge")
    in_stream = {
        m.body["after"]["id"] for m in read_stream(url, stream) if m.body["op"] == "insert"
    }
    for transaction in writer.committed:
        if transaction.upper_lsn <= confirmed:
            missing = set(transaction.ids) - in_stream
            assert not missing, f"slot confirmed past rows {missing} that are not in the stream"


def _identity(message: StreamedMessage) -> tuple[str, int]:
    row = message.body["after"] or message.body["before"]
    return message.body["op"], int(row["id"])


def test_sigterm_and_sigkill_mid_stream_keep_every_change_exactly_once(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE items (id bigserial PRIMARY KEY, tx int, position int, "
            "touched boolean NOT NULL DEFAULT false)"
        )
        # An observer slot sees the same transactions, to learn their exact end LSNs.
        conn.execute("CREATE PUBLICATION observer FOR TABLE items")
        conn.execute("SELECT pg_create_logical_replication_slot('observer', 'pgoutput')")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.items": {"subject": "items.{op}"}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    writer = Writer(database)
    try:
        bridge.start()
        thread = writer.write_in_background(300)
        wait_for_messages(nats.url, stream_name, 100)
        assert bridge.terminate() == 0
        thread.join()
        wait_slot_inactive(database, "cdc_bridge")
        _assert_confirmed_not_ahead(database, nats.url, stream_name, writer)

        bridge.start()
        thread = writer.write_in_background(300)
        wait_for_messages(nats.url, stream_name, writer.changes - 200)
        bridge.kill()
        thread.join()
        wait_slot_inactive(database, "cdc_bridge")
        _assert_confirmed_not_ahead(database, nats.url, stream_name, writer)

        writer.write(50)
        bridge.start()
        writer.write(50)
        wait_for_messages(nats.url, stream_name, writer.changes, timeout=60)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()

    messages = read_stream(nats.url, stream_name)
    ids = [m.headers["Nats-Msg-Id"] for m in messages]
    assert len(ids) == len(set(ids)), "a change was published twice"
    assert len(messages) == writer.changes, bridge.log_text()

    expected: list[tuple[str, int]] = []
    for transaction in writer.committed:
        expected += [("insert", row_id) for row_id in transaction.ids]
    assert sorted(i for op, i in map(_identity, messages) if op == "insert") == sorted(
        i for _, i in expected
    )
    order = [
        (parse_lsn(m.body["source"]["commit_lsn"]), m.body["source"]["index"]) for m in messages
    ]
    assert order == sorted(order), "messages are not in commit order"

    # The slot confirms exactly the end of the last transaction it published.
    with psycopg.connect(database, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('observer', NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'observer')"
        ).fetchall()
        pending = conn.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('cdc_bridge', NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'cdc_bridge')"
        ).fetchone()
    ends = [m.end_lsn for m in (decode_message(bytes(r[0])) for r in rows) if isinstance(m, Commit)]
    assert len(ends) == len(writer.committed)
    confirmed, _ = slot_state(database, "cdc_bridge")
    assert confirmed >= ends[-1]
    assert pending == (0,), "the slot would send already-published changes again"


def test_slot_is_not_confirmed_before_the_pubacks_arrive(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    """JetStream stores the messages but their PubAcks are held back: no confirmation."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE items (id bigserial PRIMARY KEY, tx int, position int, "
            "touched boolean NOT NULL DEFAULT false)"
        )
    host, port = nats.url.removeprefix("nats://").rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=proxy.url,
        stream=stream_name,
        tables={"public.items": {"subject": "items.{op}"}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    writer = Writer(database)
    try:
        bridge.start()
        writer.write(1)
        wait_for_messages(nats.url, stream_name, 1)
        with proxy.holding_replies():
            writer.write(2)
            wait_for_messages(nats.url, stream_name, writer.changes)  # stored in JetStream
            held = [m for m in read_stream(nats.url, stream_name) if m.body["source"]["index"] == 0]
            last_commit = max(parse_lsn(m.body["source"]["commit_lsn"]) for m in held)
            time.sleep(2.5)  # > status_interval (1 s) + coalescing: an update would be out
            confirmed, _ = slot_state(database, "cdc_bridge")
            assert confirmed < last_commit, "slot confirmed changes whose PubAck never came"
        deadline = time.monotonic() + 15
        while slot_state(database, "cdc_bridge")[0] <= last_commit:
            assert time.monotonic() < deadline, "slot did not advance once the PubAcks came"
            time.sleep(0.1)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
        proxy.close()


def test_frozen_nats_server_makes_the_bridge_reconnect_and_lose_nothing(
    database: str, tmp_path: Path
) -> None:
    """nats-server stops answering (SIGSTOP): no PubAck within ack_timeout → reconnect."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE items (id bigserial PRIMARY KEY, tx int, position int, "
            "touched boolean NOT NULL DEFAULT false, pad text)"
        )
    server = start_nats()
    try:
        config = write_config(
            tmp_path / "config.yaml",
            dsn=database,
            nats_url=server.url,
            stream="frozen",
            tables={"public.items": {"subject": "items.{op}"}},
            extra={
                "nats": {"ack_timeout": 2, "connect_timeout": 1},
                "reconnect": {"initial_delay": 0.2, "max_delay": 1},
            },
        )
        bridge = BridgeProcess(config, tmp_path / "bridge.log")
        writer = Writer(database)
        try:
            bridge.start()
            writer.write(5)
            wait_for_messages(server.url, "frozen", writer.changes)
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                # Enough data to fill the socket buffers towards the frozen server.
                big = 2000
                writer.conn.execute(
                    "INSERT INTO items (tx, position, pad) "
                    "SELECT -1, g, repeat('x', 6000) FROM generate_series(1, %s) g",
                    (big,),
                )
                writer.changes += big
                deadline = time.monotonic() + 20
                while "reconnecting in" not in bridge.log_text():
                    assert time.monotonic() < deadline, bridge.log_text()
                    assert bridge.process is not None
                    assert bridge.process.poll() is None
                    time.sleep(0.1)
                assert re.search(
                    r"(no PubAck for items.insert within 2s|NATS has not taken a message for "
                    r"\d+s \(over nats.ack_timeout 2s\)); reconnecting in",
                    bridge.log_text(),
                ), bridge.log_text()
                time.sleep(2)  # a few failed attempts against the frozen server
                assert bridge.process is not None
                assert bridge.process.poll() is None
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            wait_for_messages(server.url, "frozen", writer.changes)
            assert bridge.terminate() == 0
        finally:
            bridge.stop_quietly()
        messages = read_stream(server.url, "frozen")
        ids = [m.headers["Nats-Msg-Id"] for m in messages]
        assert len(ids) == len(set(ids)) == writer.changes
        assert sum(1 for m in messages if m.body["after"]["tx"] == -1) == big
    finally:
        server.cleanup()
