"""What the admin commands read from (and drop in) PostgreSQL, on an ordinary connection.

Slot, publication and server facts for ``check`` and ``status``; dropping slot and
publication for ``teardown``. The replication protocol itself stays in ``source.py`` and
creating things stays in ``provisioning.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdc_bridge.errors import SetupError, first_line

__all__ = [
    "PublicationInfo",
    "ServerInfo",
    "SlotInfo",
    "drop_publication",
    "drop_slot",
    "publication_info",
    "server_info",
    "slot_info",
    "table_exists",
]

Connection = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class SlotInfo:
    name: str
    plugin: str | None
    database: str | None
    current_database: str
    active: bool
    active_pid: int | None
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    wal_status: str | None
    safe_wal_size: int | None
    current_wal_lsn: str
    lag_bytes: int | None  # pg_current_wal_lsn() - confirmed_flush_lsn


@dataclass(frozen=True, slots=True)
class PublicationInfo:
    name: str
    via_root: bool
    tables: frozenset[str]  # schema.table


@dataclass(frozen=True, slots=True)
class ServerInfo:
    version: int
    version_text: str
    wal_level: str
    max_replication_slots: int
    used_replication_slots: int
    max_wal_senders: int
    used_wal_senders: int
    role: str
    superuser: bool
    replication: bool
    rds_replication: bool | None  # None: no such role (not RDS)


def _one(conn: Connection, query: str, params: tuple[object, ...] = ()) -> tuple[object, ...]:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row


def server_info(conn: Connection) -> ServerInfo:
    version_text, wal_level, max_slots, max_senders = _one(
        conn,
        "SELECT current_setting('server_version'), current_setting('wal_level'), "
        "current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int",
    )
    (used_slots,) = _one(conn, "SELECT count(*) FROM pg_replication_slots")
    (used_senders,) = _one(conn, "SELECT count(*) FROM pg_stat_replication")
    role, superuser, replication, rds = _one(
        conn,
        """
        SELECT current_user, r.rolsuper, r.rolreplication,
               CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication')
                    THEN pg_has_role(current_user, 'rds_replication', 'member') END
        FROM pg_roles r WHERE r.rolname = current_user
        """,
    )
    return ServerInfo(
        version=conn.info.server_version,
        version_text=str(version_text),
        wal_level=str(wal_level),
        max_replication_slots=int(str(max_slots)),
        used_replication_slots=int(str(used_slots)),
        max_wal_senders=int(str(max_senders)),
        used_wal_senders=int(str(used_senders)),
        role=str(role),
        superuser=bool(superuser),
        replication=bool(replication),
        rds_replication=None if rds is None else bool(rds),
    )


def slot_info(conn: Connection, slot: str) -> SlotInfo | None:
    """The slot's state, or None if it does not exist."""
    row = conn.execute(
        """
        SELECT plugin, database, current_database(), active, active_pid,
               confirmed_flush_lsn::text, restart_lsn::text, wal_status, safe_wal_size,
               pg_current_wal_lsn()::text,
               pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        return None
    (plugin, database, current, active, pid, confirmed, restart, wal_status, safe, wal, lag) = row
    return SlotInfo(
        name=slot,
        plugin=None if plugin is None else str(plugin),
        database=None if database is None else str(database),
        current_database=str(current),
        active=bool(active),
        active_pid=None if pid is None else int(str(pid)),
        confirmed_flush_lsn=None if confirmed is None else str(confirmed),
        restart_lsn=None if restart is None else str(restart),
        wal_status=None if wal_status is None else str(wal_status),
        safe_wal_size=None if safe is None else int(str(safe)),
        current_wal_lsn=str(wal),
        lag_bytes=None if lag is None else int(str(lag)),
    )


def publication_info(conn: Connection, publication: str) -> PublicationInfo | None:
    row = conn.execute(
        "SELECT pubviaroot FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone()
    if row is None:
        return None
    tables = frozenset(
        f"{r[0]}.{r[1]}"
        for r in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            (publication,),
        )
    )
    return PublicationInfo(publication, bool(row[0]), tables)


def table_exists(conn: Connection, name: str) -> bool:
    schema, table = name.split(".", 1)
    row = conn.execute(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    return row is not None


def drop_slot(conn: Connection, slot: str) -> None:
    """Drop the slot; :class:`SetupError` naming the holder if a bridge is using it."""
    try:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    except psycopg.errors.ObjectInUse:
        info = slot_info(conn, slot)
        pid = info.active_pid if info else None
        raise SetupError(active_slot_message(slot, pid)) from None
    except psycopg.Error as exc:
        raise SetupError(f"cannot drop replication slot {slot!r}: {first_line(exc)}") from None


def active_slot_message(slot: str, pid: int | None) -> str:
    holder = f"PID {pid}" if pid is not None else "another process"
    return (
        f"replication slot {slot!r} is active, held by {holder} (a running cdc-bridge?): "
        "stop the bridge first, then run teardown again"
    )


def drop_publication(conn: Connection, publication: str) -> None:
    try:
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication)))
    except psycopg.Error as exc:
        raise SetupError(f"cannot drop publication {publication!r}: {first_line(exc)}") from None
