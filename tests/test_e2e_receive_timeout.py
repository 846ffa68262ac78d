"""A replication connection that goes silent (no error, no data) is noticed and replaced."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.fixtures.bridge import BridgeProcess, read_stream, wait_for_messages, write_config
from tests.fixtures.proxy import TcpProxy

pytestmark = [pytest.mark.servers, pytest.mark.faults]


def test_a_silent_postgres_connection_is_given_up_after_receive_timeout(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    params = conninfo_to_dict(database)
    proxy = TcpProxy(str(params.get("host", "127.0.0.1")), int(str(params.get("port", 5432))))
    via_proxy = make_conninfo(database, host="127.0.0.1", port=str(proxy.port))
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=via_proxy,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
        extra={
            "postgres": {"status_interval": 0.5, "receive_timeout": 2, "connect_timeout": 2},
            "reconnect": {"initial_delay": 0.2, "max_delay": 0.5},
            "heartbeat": {"interval": 0},
        },
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        wait_for_messages(nats.url, stream_name, 1)
        with proxy.stalled():
            with psycopg.connect(database, autocommit=True) as conn:
                conn.execute("INSERT INTO t VALUES (2)")
            bridge.wait_for_log("nothing received from PostgreSQL for 2s", 10)
            started = time.monotonic()
            time.sleep(0.5)
        wait_for_messages(nats.url, stream_name, 2)  # by a new session, after the stall
        assert time.monotonic() - started < 15
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
        proxy.close()
    log = bridge.log_text()
    assert "(postgres.receive_timeout): the connection is presumed dead; reconnecting in" in log
    assert log.count("streaming slot cdc_bridge") == 2
    assert [m.body["after"]["id"] for m in read_stream(nats.url, stream_name)] == [1, 2]
