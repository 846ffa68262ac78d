"""`cdc-bridge demo`: the quickstart works, shows the stream live, and cleans up after itself."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.servers

MESSAGE_LINE = re.compile(
    r"^messages\.[0-9a-f-]{36} +(insert|update|delete) +key=\{\"id\":\d+\} +\d+\.\d ms$"
)


def _demo(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_BRIDGE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "cdc_bridge", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _ports(output: str) -> list[int]:
    return [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output)]


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_demo_streams_chat_traffic_and_removes_everything() -> None:
    demo = _demo("--duration", "4", "--rate", "25", "--burst", "2000")
    output, _ = demo.communicate(timeout=120)
    assert demo.returncode == 0, output
    lines = output.splitlines()
    burst = [line for line in lines if line.startswith("burst: 2000 rows written")]
    assert len(burst) == 1, output
    assert re.search(r"-> [\d,]+ rows/s end to end$", burst[0])
    shown = [line for line in lines if MESSAGE_LINE.match(line)]
    assert len(shown) >= 20, output
    assert {"insert"} <= {line.split()[1] for line in shown}
    summary = next(line for line in lines if "messages received from JetStream" in line)
    received, published = re.findall(r"(\d+) (?:messages received|changes in)", summary)
    assert received == published  # every published change came back from the stream
    assert int(received) == 2000 + len(shown)
    assert lines[-1] == "removing the temporary servers and their data ..."
    ports = _ports(output)
    assert len(ports) == 3  # PostgreSQL, NATS, the metrics port
    assert all(_refused(port) for port in ports)


def test_ctrl_c_stops_the_demo_cleanly() -> None:
    demo = _demo("--rate", "20")
    assert demo.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = demo.stdout.readline()
        seen.append(line.rstrip("\n"))
        if MESSAGE_LINE.match(seen[-1]):
            break
    else:
        demo.kill()
        pytest.fail("no message shown:\n" + "\n".join(seen))
    demo.send_signal(signal.SIGINT)
    rest, _ = demo.communicate(timeout=60)
    output = "\n".join(seen) + "\n" + rest
    assert demo.returncode == 0, output
    assert "Traceback" not in output
    assert output.rstrip().endswith("removing the temporary servers and their data ...")
    assert all(_refused(port) for port in _ports(output))
