"""The bridge's stderr: JSON lines when not a terminal, and never a password."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
import pytest

from cdc_bridge.local_servers import free_port
from tests.fixtures.bridge import BridgeProcess, wait_for_messages, write_config

pytestmark = pytest.mark.servers

FAKE_PASSWORD = "Top-Secret-Pa55word"


def _with_password(dsn: str) -> tuple[str, str]:
    """(dsn with a password in it, that password). A local trust server ignores it."""
    parts = urlsplit(dsn)
    if parts.password:
        return dsn, parts.password
    userinfo, host = (
        parts.netloc.rsplit("@", 1) if "@" in parts.netloc else ("postgres", parts.netloc)
    )
    netloc = f"{userinfo}:{FAKE_PASSWORD}@{host}"
    return urlunsplit(parts._replace(netloc=netloc)), FAKE_PASSWORD


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "cdc_bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_password_in_dsn_never_appears_in_output(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    dsn, password = _with_password(database)
    if password != FAKE_PASSWORD and len(password) < 6:
        pytest.skip("the server's own password is too short to search for reliably")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=dsn,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
        extra={"log_level": "DEBUG"},
    )
    outputs: list[str] = []
    for command in (["check"], ["setup"], ["status"], ["config", "show"], ["status", "--json"]):
        result = _cli(*command, "-c", str(config))
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        outputs.append(result.stdout + result.stderr)

    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1, 'hello')")
        wait_for_messages(nats.url, stream_name, 1)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    log = bridge.log_text()
    outputs.append(log)

    # Non-TTY stderr, log_format auto: every line is a JSON record.
    records = [orjson.loads(line) for line in log.splitlines() if line.strip()]
    assert records
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
    streaming = [r for r in records if r["message"].startswith("streaming slot")]
    assert len(streaming) == 1
    assert streaming[0]["slot"] == "cdc_bridge"
    assert streaming[0]["level"] == "INFO"
    # LSN (and stream) travel as fields too, not only inside the message text.
    assert streaming[0]["message"].endswith(
        f"from {streaming[0]['lsn']} to stream {streaming[0]['stream']}"
    )
    started = [r for r in records if r["message"].startswith("replication started")]
    assert started[0]["lsn"] == streaming[0]["lsn"]

    # A failure: the final line stays plain text, still without the password.
    broken = write_config(
        tmp_path / "broken.yaml",
        dsn=dsn,
        nats_url=f"nats://127.0.0.1:{free_port()}",
        stream=stream_name,
        tables={"public.t": {}},
        extra={"nats": {"connect_timeout": 1}, "log_level": "DEBUG"},
    )
    failed = _cli("run", "-c", str(broken))
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("cdc-bridge: error: cannot connect")
    outputs.append(failed.stdout + failed.stderr)

    for output in outputs:
        assert password not in output


def test_log_format_text_is_plain(
    database: str, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
        extra={"log_format": "text"},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    lines = [line for line in bridge.log_text().splitlines() if "streaming slot" in line]
    assert len(lines) == 1
    assert " INFO cdc_bridge.pipeline: streaming slot cdc_bridge from " in lines[0]
    context = r" \[slot=cdc_bridge lsn=[0-9A-F]+/[0-9A-F]+ stream=\S+\]$"
    assert re.search(context, lines[0]), lines[0]
