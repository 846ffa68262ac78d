"""End to end: committed changes of `conversations` reach JetStream exactly, in commit order.

Real PostgreSQL, real nats-server, the bridge as a real process. The workload mixes
inserts, updates (including the TOAST case: a >8 kB content, then an update of another
column), deletes, multi-row transactions and a rolled-back transaction; the test keeps
its own model of what each committed change must look like and compares the stream
against it message by message.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cdc_bridge.lsn import format_lsn, parse_lsn
from tests.fixtures.bridge import BridgeProcess, read_stream, wait_for_messages, write_config

pytestmark = pytest.mark.servers

CREATED_AT = "2026-11-27 09:32:10.437029+00"
CREATED_AT_ISO = "2026-11-27T09:32:10.437029Z"

DDL = """
CREATE TABLE conversations (
    id bigserial PRIMARY KEY,
    conversation_uuid uuid,
    role text,
    content text,
    metadata jsonb,
    created_at timestamptz
)
"""


@dataclass
class Expected:
    op: str
    key: dict[str, Any]
    after: dict[str, Any] | None
    before: dict[str, Any] | None
    unchanged_toast: list[str]
    xid: int
    index: int


@dataclass
class Transaction:
    xid: int
    lower_lsn: int  # WAL insert position before the transaction
    upper_lsn: int  # WAL insert position after its commit
    changes: list[Expected] = field(default_factory=list)


class Workload:
    """Runs statements and records what each committed change must look like."""

    def __init__(self, dsn: str, full_identity: bool) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.full = full_identity
        self.rows: dict[int, dict[str, Any]] = {}
        self.committed: list[Transaction] = []

    def _lsn(self) -> int:
        row = self.conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return parse_lsn(str(row[0]))

    def transaction(self, steps: list[tuple[str, Any]], *, rollback: bool = False) -> None:
        lower = self._lsn()
        changes: list[Expected] = []
        shadow = {k: dict(v) for k, v in self.rows.items()}
        with self.conn.transaction(force_rollback=rollback):
            xid_row = self.conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            assert xid_row is not None
            xid = int(xid_row[0])
            for kind, args in steps:
                changes.append(getattr(self, f"_{kind}")(shadow, xid, len(changes), *args))
        if rollback:
            return
        self.rows = shadow
        self.committed.append(Transaction(xid, lower, self._lsn(), changes))

    def _insert(
        self,
        shadow: dict[int, dict[str, Any]],
        xid: int,
        index: int,
        conversation: uuid.UUID,
        role: str,
        content: str,
        metadata: Any,
    ) -> Expected:
        row = self.conn.execute(
            "INSERT INTO conversations (conversation_uuid, role, content, metadata, created_at) "
            "VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (conversation, role, content, Jsonb(metadata), CREATED_AT),
        ).fetchone()
        assert row is not None
        values = {
            "id": int(row[0]),
            "conversation_uuid": str(conversation),
            "role": role,
            "content": content,
            "metadata": metadata,
            "created_at": CREATED_AT_ISO,
        }
        shadow[values["id"]] = values
        return Expected("insert", {"id": values["id"]}, dict(values), None, [], xid, index)

    def _update(
        self,
        shadow: dict[int, dict[str, Any]],
        xid: int,
        index: int,
        row_id: int,
        column: str,
        value: Any,
    ) -> Expected:
        old = dict(shadow[row_id])
        sql_value = Jsonb(value) if column == "metadata" else value
        self.conn.execute(
            f"UPDATE conversations SET {column} = %s WHERE id = %s",  # column is a test literal
            (sql_value, row_id),
        )
        new = dict(old)
        new[column] = value
        shadow[row_id] = new
        after = dict(new)
        toast: list[str] = []
        big = len(old["content"]) > 8000
        if not self.full and big and column != "content":
            # DEFAULT identity: the unchanged, out-of-line content is not in the WAL.
            del after["content"]
            toast = ["content"]
        before = old if self.full else None
        return Expected("update", {"id": row_id}, after, before, toast, xid, index)

    def _delete(
        self, shadow: dict[int, dict[str, Any]], xid: int, index: int, row_id: int
    ) -> Expected:
        old = shadow.pop(row_id)
        self.conn.execute("DELETE FROM conversations WHERE id = %s", (row_id,))
        before = dict(old) if self.full else {"id": row_id}
        return Expected("delete", {"id": row_id}, None, before, [], xid, index)


def _big_text(size: int) -> str:
    # Random letters do not compress, so the value is stored out of line (TOASTed).
    rng = random.Random(7)
    return "".join(rng.choices(string.ascii_letters + string.digits, k=size))


@pytest.mark.parametrize(
    "full_identity", [True, False], ids=["replica-identity-full", "replica-identity-default"]
)
def test_committed_changes_reach_the_stream_exactly(
    database: str, nats: Any, stream_name: str, tmp_path: Path, full_identity: bool
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(DDL)
        if full_identity:
            conn.execute("ALTER TABLE conversations REPLICA IDENTITY FULL")
    subject = "messages.{conversation_uuid}" if full_identity else "cdc.{schema}.{table}.{op}"
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.conversations": {"subject": subject}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        c1, c2 = uuid.UUID(int=1), uuid.UUID(int=2)
        big = _big_text(20_000)
        work = Workload(database, full_identity)
        meta = {"tags": ["a", "b"], "model": "gpt-x", "nested": {"k": None}, "tokens": 42}
        work.transaction([("insert", (c1, "user", 'Hello, "quoted" text: é ü 日本', meta))])
        a = max(work.rows)
        work.transaction(
            [
                ("insert", (c1, "assistant", "second", None)),
                ("insert", (c2, "user", "third", {"n": 3})),
                ("update", (a, "content", "hello (edited)")),
            ]
        )
        b, c = sorted(work.rows)[1:3]
        work.transaction([("insert", (c2, "user", "never committed", None))], rollback=True)
        work.transaction([("insert", (c2, "user", big, {"big": True}))])
        e = max(work.rows)
        work.transaction([("update", (e, "metadata", {"big": True, "edited": True}))])
        work.transaction([("delete", (b,))])
        work.transaction([("update", (c, "role", "system")), ("delete", (a,))])
        expected_count = sum(len(t.changes) for t in work.committed)
        wait_for_messages(nats.url, stream_name, expected_count)
        bridge.terminate()
        messages = read_stream(nats.url, stream_name)
    finally:
        bridge.stop_quietly()

    expected = [(t, change) for t in work.committed for change in t.changes]
    assert len(messages) == len(expected), bridge.log_text()
    previous_commit = 0
    batches: list[tuple[int, dict[str, str]]] = []  # (xid, batch headers) per message
    for message, (transaction, change) in zip(messages, expected, strict=True):
        body = message.body
        source = body["source"]
        commit_lsn = parse_lsn(source["commit_lsn"])
        lsn = parse_lsn(source["lsn"])
        assert {k: v for k, v in body.items() if k != "source"} == {
            "op": change.op,
            "schema": "public",
            "table": "conversations",
            "key": change.key,
            "after": change.after,
            "before": change.before,
            "unchanged_toast": change.unchanged_toast,
        }
        assert source["slot"] == "cdc_bridge"
        assert source["xid"] == transaction.xid
        assert source["index"] == change.index
        assert transaction.lower_lsn <= lsn < commit_lsn < transaction.upper_lsn
        assert commit_lsn >= previous_commit  # commit order
        previous_commit = commit_lsn
        committed_at = datetime.fromisoformat(source["commit_ts"])
        assert abs((datetime.now(UTC) - committed_at).total_seconds()) < 120
        row = change.after if change.after is not None else change.before
        assert row is not None
        if full_identity:
            assert message.subject == f"messages.{row['conversation_uuid']}"
        else:
            assert message.subject == f"cdc.public.conversations.{change.op}"
        headers = dict(message.headers)
        batch = {k: headers.pop(k) for k in list(headers) if k.startswith("Nats-Batch-")}
        batches.append((transaction.xid, batch))
        assert headers == {
            "Nats-Msg-Id": f"cdc_bridge:{format_lsn(commit_lsn)}:{change.index}",
            "Cdc-Op": change.op,
            "Cdc-Table": "public.conversations",
            "Cdc-Commit-Lsn": format_lsn(commit_lsn),
            "Cdc-Index": str(change.index),
        }
    _assert_whole_transactions_in_batches(batches)
    assert all("never committed" not in str(m.body) for m in messages)


def _assert_whole_transactions_in_batches(batches: list[tuple[int, dict[str, str]]]) -> None:
    """Atomic batches hold whole transactions (consecutive ones may share a batch), with
    sequences 1..n in stream order and the commit flag on the last message only; a
    message without batch headers is a transaction of one change, alone."""
    by_batch: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for xid, headers in batches:
        if not headers:
            assert sum(1 for x, _ in batches if x == xid) == 1, "an unbatched multi-change tx"
            continue
        by_batch.setdefault(headers["Nats-Batch-Id"], []).append((xid, headers))
    seen: dict[int, str] = {}
    order = [h.get("Nats-Batch-Id") for _, h in batches if h]
    for batch_id, members in by_batch.items():
        positions = [i for i, b in enumerate(order) if b == batch_id]
        assert positions == list(range(positions[0], positions[0] + len(members)))
        assert [h["Nats-Batch-Sequence"] for _, h in members] == [
            str(n) for n in range(1, len(members) + 1)
        ]
        assert [h.get("Nats-Batch-Commit") for _, h in members] == [None] * (len(members) - 1) + [
            "1"
        ]
        for xid, _ in members:
            assert seen.setdefault(xid, batch_id) == batch_id, f"xid {xid} split over batches"
    assert by_batch, "no atomic batch at all"
