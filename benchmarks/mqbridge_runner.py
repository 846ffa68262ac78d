"""Runs one mq-bridge route (PostgreSQL CDC → JetStream) until SIGTERM.

    python benchmarks/mqbridge_runner.py CONFIG_JSON

A separate process so that the harness measures mq-bridge's CPU and memory alone.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any


def main(config_json: str) -> None:
    import mq_bridge

    config: dict[str, Any] = json.loads(config_json)
    route = mq_bridge.Route.from_config(config)
    signal.signal(signal.SIGTERM, lambda *_: mq_bridge.request_shutdown())
    route.run()


if __name__ == "__main__":
    main(sys.argv[1])
