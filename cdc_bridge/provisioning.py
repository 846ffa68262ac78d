"""Pre-flight and setup on an ordinary PostgreSQL connection, before streaming starts.

Checks what would otherwise fail later or, worse, silently: ``wal_level``, the server
version, that every configured table exists with a usable key and replica identity,
and that every subject placeholder names a column that will be there for every kind of
change. Then creates what is missing when the config allows it: the publication (for the
configured tables only) and the logical slot (publication first, so the slot never
decodes a change the publication did not yet cover). ``sql/setup.sql`` holds the same
statements for a DBA who prefers to run them by hand.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from cdc_bridge.errors import ConnectError, SetupError, first_line
from cdc_bridge.lsn import Lsn, format_lsn, parse_lsn
from cdc_bridge.pgsecurity import connect_error_hint
from cdc_bridge.routing import BUILTIN_PLACEHOLDERS, SubjectTemplate

if TYPE_CHECKING:
    from cdc_bridge.readback import Position as StreamPosition

__all__ = [
    "DatabaseState",
    "TableCatalog",
    "TableRequest",
    "check_database",
    "check_table",
    "connect",
    "ensure_replication",
    "quote_ident",
]

log = logging.getLogger(__name__)

MIN_SERVER_VERSION = 140000

#: Row filters in publications (``tables.*.where``) came with PostgreSQL 15.
ROW_FILTER_VERSION = 150000

#: The comment that marks a publication the bridge created as its own: only in such a
#: publication does it drop tables that are no longer in ``tables:``.
MANAGED_COMMENT = "managed by cdc-bridge: its tables follow the bridge's tables: setting"


@dataclass(frozen=True, slots=True)
class TableCatalog:
    schema: str
    table: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    identity_columns: tuple[str, ...]
    partitioned: bool = False

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def sql_name(self) -> str:
        return f"{_quote(self.schema)}.{_quote(self.table)}"


@dataclass(frozen=True, slots=True)
class DatabaseState:
    server_version: int
    tables: dict[str, TableCatalog]
    key_columns: dict[str, tuple[str, ...]]
    row_filters: dict[str, str] = field(default_factory=dict)  # table → WHERE expression
    #: Domain type OID → its base type OID (arrays of domains → arrays of the base), so
    #: that a domain's values convert like its base type's.
    type_aliases: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TableRequest:
    """What the config asks of one table."""

    subject: str
    key: tuple[str, ...] | None
    columns: tuple[str, ...] | None = None  # published columns; None: all
    exclude_columns: tuple[str, ...] = ()
    masks: tuple[tuple[str, str], ...] = ()  # (column, "hash" | "redact" | "truncate")
    where: str | None = None


def _connect(conninfo: str, connect_timeout: float) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(
            conninfo, autocommit=True, connect_timeout=max(1, math.ceil(connect_timeout))
        )
    except psycopg.ProgrammingError as exc:
        raise SetupError(
            f"postgres.dsn is not a valid connection string: {first_line(exc)}"
        ) from None
    except psycopg.Error as exc:
        reason = first_line(exc)
        hint = connect_error_hint(reason) or "check postgres.dsn"
        raise ConnectError(f"cannot connect to PostgreSQL: {reason} ({hint})") from None


def connect(conninfo: str, connect_timeout: float) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection; :class:`SetupError` with the reason if there is none."""
    return _connect(conninfo, connect_timeout)


def check_table(
    conn: psycopg.Connection[tuple[object, ...]], name: str, request: TableRequest
) -> tuple[TableCatalog, tuple[str, ...]]:
    """One table's checks, as ``run`` does them: its catalog and key, or :class:`SetupError`.

    For callers that report each table's problem instead of stopping at the first
    (``cdc-bridge check``).
    """
    catalog = _load_table(conn, name)
    return catalog, _check_table(catalog, request)


def _translate_errors(action: str, exc: psycopg.Error) -> SetupError:
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return SetupError(
            f"permission denied: {first_line(exc)} (the role needs REPLICATION, or "
            "rds_replication on RDS; creating or extending the publication needs ownership "
            "of the tables, so let the table owner run sql/setup.sql and set "
            "postgres.create_if_missing: false)"
        )
    if isinstance(exc, psycopg.OperationalError):  # the connection broke: it may come back
        return ConnectError(f"{action} failed: {first_line(exc)}")
    return SetupError(f"{action} failed: {first_line(exc)}")


def check_database(
    conninfo: str, *, tables: Mapping[str, TableRequest], connect_timeout: float = 10.0
) -> DatabaseState:
    """Check server, ``wal_level`` and tables; raise :class:`SetupError` on a problem."""
    with _connect(conninfo, connect_timeout) as conn:
        try:
            return _check(conn, tables)
        except psycopg.Error as exc:
            raise _translate_errors("checking the database", exc) from None


def ensure_replication(
    conninfo: str,
    state: DatabaseState,
    *,
    slot: str,
    publication: str,
    create_if_missing: bool,
    connect_timeout: float = 10.0,
    stream_position: StreamPosition | None = None,
    recreate_slot: bool = False,
    slot_creator: Callable[[], Lsn] | None = None,
) -> tuple[Lsn, bool]:
    """Create or check publication and slot; return (confirmed_flush_lsn, slot created).

    ``stream_position`` is the newest change of this slot already in the stream (None if
    it holds none). It turns two silent data losses into errors: a missing slot whose
    changes the stream already holds (a new slot would start after a gap, unless
    ``recreate_slot``), and a stream ahead of the database's own WAL (another database,
    or one restored from a backup, behind the same slot name).

    ``slot_creator``, if given, creates a missing slot instead of
    ``pg_create_logical_replication_slot`` and returns its consistent point (the initial
    snapshot creates it over a replication connection, to use the snapshot it exports).
    """
    with _connect(conninfo, connect_timeout) as conn:
        try:
            _ensure_publication(
                conn, publication, list(state.tables.values()), create_if_missing, state.row_filters
            )
            exists = _scalar_param(
                conn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", slot
            )
            if not exists and stream_position is not None and not recreate_slot:
                raise SetupError(
                    f"replication slot {slot!r} does not exist, but the stream already holds "
                    f"its changes up to {stream_position}: the slot was dropped and the "
                    "changes since then are lost to it. Set postgres.recreate_slot: true to "
                    "start a new slot anyway (then backfill the tables), or restore the slot"
                )
            confirmed, created = _ensure_slot(conn, slot, create_if_missing, slot_creator)
            if stream_position is not None and not created:
                current = parse_lsn(str(_scalar(conn, "SELECT pg_current_wal_lsn()::text")))
                if stream_position.lsn > current:
                    raise SetupError(
                        f"the stream holds changes of slot {slot!r} up to {stream_position}, "
                        f"beyond this database's WAL ({format_lsn(current)}): it is another "
                        "database, or one restored from a backup, under the same slot name. "
                        "Use another postgres.slot or nats.stream"
                    )
            return confirmed, created
        except psycopg.Error as exc:
            raise _translate_errors("setting up replication", exc) from None


def slot_confirmed_lsn(conninfo: str, slot: str, *, connect_timeout: float = 10.0) -> Lsn:
    """The slot's confirmed_flush_lsn now."""
    with _connect(conninfo, connect_timeout) as conn:
        try:
            value = _scalar_param(
                conn,
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                slot,
            )
        except psycopg.Error as exc:
            raise _translate_errors("reading the slot position", exc) from None
    if value is None:
        raise SetupError(f"replication slot {slot!r} does not exist (any more)")
    return parse_lsn(str(value))


def _check(
    conn: psycopg.Connection[tuple[object, ...]], requests: Mapping[str, TableRequest]
) -> DatabaseState:
    version = conn.info.server_version
    if version < MIN_SERVER_VERSION:
        raise SetupError(f"PostgreSQL {version // 10000} is too old: cdc-bridge needs 14 or newer")
    wal_level = _scalar(conn, "SHOW wal_level")
    if wal_level != "logical":
        raise SetupError(
            f"wal_level is {wal_level!r} but must be 'logical': set wal_level = logical in "
            "postgresql.conf (on RDS: rds.logical_replication = 1 in the parameter group) "
            "and restart PostgreSQL"
        )
    check_row_filter_support(version, requests)
    catalogs = {name: _load_table(conn, name) for name in requests}
    keys = {name: _check_table(catalogs[name], request) for name, request in requests.items()}
    row_filters = {name: r.where for name, r in requests.items() if r.where is not None}
    return DatabaseState(version, catalogs, keys, row_filters, _domain_base_types(conn))


def _domain_base_types(conn: psycopg.Connection[tuple[object, ...]]) -> dict[int, int]:
    """Every domain's base type (through domains over domains), and the same for arrays."""
    rows = conn.execute(
        """
        WITH RECURSIVE walk(domain, base) AS (
            SELECT oid, typbasetype FROM pg_type WHERE typtype = 'd'
            UNION ALL
            SELECT walk.domain, t.typbasetype
            FROM walk JOIN pg_type t ON t.oid = walk.base
            WHERE t.typtype = 'd'
        )
        SELECT walk.domain::int8, walk.base::int8, d.typarray::int8, b.typarray::int8
        FROM walk
        JOIN pg_type b ON b.oid = walk.base AND b.typtype <> 'd'
        JOIN pg_type d ON d.oid = walk.domain
        """
    ).fetchall()
    aliases: dict[int, int] = {}
    for domain, base, domain_array, base_array in rows:
        aliases[int(str(domain))] = int(str(base))
        if domain_array and base_array:
            aliases[int(str(domain_array))] = int(str(base_array))
    return aliases


def check_row_filter_support(version: int, requests: Mapping[str, TableRequest]) -> None:
    """:class:`SetupError` if a table has a row filter and the server cannot apply it."""
    if version >= ROW_FILTER_VERSION:
        return
    for name, request in requests.items():
        if request.where is not None:
            raise SetupError(
                f"tables.{name}.where needs PostgreSQL 15 or newer (publication row filters), "
                f"but the server is PostgreSQL {version // 10000}: remove the key, or upgrade"
            )


def _load_table(conn: psycopg.Connection[tuple[object, ...]], name: str) -> TableCatalog:
    schema, table = name.split(".", 1)
    row = conn.execute(
        """
        SELECT c.oid, c.relreplident, c.relkind
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s
        """,
        (schema, table),
    ).fetchone()
    if row is None:
        raise SetupError(
            f"table {name} does not exist (check the tables: section of the config; "
            "names are case-sensitive)"
        )
    oid, replident, relkind = row
    if relkind not in ("r", "p"):
        raise SetupError(
            f"{name} is not a table (relkind {relkind!r}); only tables can be streamed"
        )
    columns = tuple(
        str(r[0])
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            (oid,),
        )
    )
    primary_key = _index_columns(conn, oid, "indisprimary")
    identity_index = _index_columns(conn, oid, "indisreplident")
    replica_identity = str(replident)
    identity: tuple[str, ...]
    if replica_identity == "f":
        identity = columns
    elif replica_identity == "i":
        identity = identity_index
    elif replica_identity == "d":
        identity = primary_key
    else:
        identity = ()
    return TableCatalog(
        schema, table, columns, primary_key, replica_identity, identity, relkind == "p"
    )


def _index_columns(
    conn: psycopg.Connection[tuple[object, ...]], oid: object, flag: str
) -> tuple[str, ...]:
    query = sql.SQL(
        """
        SELECT a.attname
        FROM pg_index i
        JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position) ON true
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = %s AND i.{flag}
        ORDER BY k.position
        """
    ).format(flag=sql.Identifier(flag))
    return tuple(str(r[0]) for r in conn.execute(query, (oid,)))


def _check_table(table: TableCatalog, request: TableRequest) -> tuple[str, ...]:
    """Validate key and subject placeholders; return the key columns to use."""
    name = table.qualified_name
    if not table.identity_columns:
        if table.replica_identity == "n":
            fix = f"ALTER TABLE {table.sql_name} REPLICA IDENTITY DEFAULT (or FULL)"
            what = "has REPLICA IDENTITY NOTHING"
        else:
            fix = f"add a primary key, or run ALTER TABLE {table.sql_name} REPLICA IDENTITY FULL"
            what = "has no primary key and no replica identity"
        raise SetupError(
            f"table {name} {what}: once published, its UPDATEs and DELETEs would fail; {fix}"
        )
    if request.key is not None:
        missing = [c for c in request.key if c not in table.columns]
        if missing:
            raise SetupError(f"tables.{name}.key names columns {missing} that {name} does not have")
        outside = [c for c in request.key if c not in table.identity_columns]
        if outside:
            raise SetupError(
                f"tables.{name}.key uses {outside}, which PostgreSQL does not log for DELETEs "
                f"under the table's replica identity: run ALTER TABLE {table.sql_name} "
                "REPLICA IDENTITY FULL, or use key columns of the primary key"
            )
        key = request.key
    else:
        # The key must be logged for deletes: the primary key when the replica identity
        # covers it, else the identity index's columns (REPLICA IDENTITY USING INDEX).
        identity = set(table.identity_columns)
        if table.primary_key and identity.issuperset(table.primary_key):
            key = table.primary_key
        else:
            key = table.identity_columns
    placeholders = SubjectTemplate(request.subject).placeholders - BUILTIN_PLACEHOLDERS
    unknown = sorted(p for p in placeholders if p not in table.columns)
    if unknown:
        raise SetupError(
            f"tables.{name}.subject uses {{{unknown[0]}}} but {name} has no such column "
            f"(columns: {', '.join(table.columns)})"
        )
    not_logged = sorted(p for p in placeholders if p not in table.identity_columns)
    if not_logged:
        raise SetupError(
            f"tables.{name}.subject uses {{{not_logged[0]}}}, which PostgreSQL does not log for "
            f"DELETEs under the table's replica identity, so deletes could not be routed: run "
            f"ALTER TABLE {table.sql_name} REPLICA IDENTITY FULL, or route by key columns only"
        )
    _check_columns(table, request, key, placeholders)
    return key


def _check_columns(
    table: TableCatalog, request: TableRequest, key: tuple[str, ...], placeholders: frozenset[str]
) -> None:
    """Column filters and masks name real columns and leave key and subject columns usable."""
    name = table.qualified_name
    named = [("columns", c) for c in request.columns or ()]
    named += [("exclude_columns", c) for c in request.exclude_columns]
    named += [(f"mask.{c}", c) for c, _ in request.masks]
    for setting, column in named:
        if column not in table.columns:
            raise SetupError(
                f"tables.{name}.{setting} names column {column!r}, which {name} does not "
                f"have (columns: {', '.join(table.columns)})"
            )
    published = set(request.columns) if request.columns is not None else set(table.columns)
    published -= set(request.exclude_columns)
    masks = dict(request.masks)
    excluded = set(request.exclude_columns)
    for column in key:
        if column not in published:
            setting = "exclude_columns" if column in excluded else "columns"
            raise SetupError(
                f"tables.{name}.{setting} leaves out key column {column!r}: key columns always "
                "leave the bridge (publish it, or mask it with hash)"
            )
        if masks.get(column, "hash") != "hash":
            raise SetupError(
                f"tables.{name}.mask.{column}: {column!r} is a key column, which may only be "
                f"masked with hash ({masks[column]} would make different rows share a key)"
            )
    for column in sorted(placeholders):
        if column not in published:
            setting = "exclude_columns" if column in excluded else "columns"
            raise SetupError(
                f"tables.{name}.{setting} leaves out {column!r}, which tables.{name}.subject "
                "uses (publish it, or mask it with hash)"
            )
        if masks.get(column) == "redact":
            raise SetupError(
                f"tables.{name}.mask.{column}: {column!r} is used by the subject, and redacted "
                "every change would go to one subject (use hash, or route by another column)"
            )


def _ensure_publication(
    conn: psycopg.Connection[tuple[object, ...]],
    publication: str,
    tables: list[TableCatalog],
    create_if_missing: bool,
    row_filters: Mapping[str, str] | None = None,
) -> None:
    """Make the publication publish the configured tables with their row filters.

    One transaction: either every change (tables added, row filters set or changed,
    tables dropped) is made, or none is; a row filter PostgreSQL would later refuse
    UPDATEs and DELETEs for is caught before it is committed.
    """
    with conn.transaction():
        _sync_publication(conn, publication, tables, create_if_missing, row_filters or {})


def _table_item(table: TableCatalog, where: str | None) -> sql.Composable:
    name = sql.Identifier(table.schema, table.table)
    if where is None:
        return name
    # The expression is the operator's own SQL, like the DSN: not data from a change.
    return sql.SQL("{} WHERE ({})").format(name, sql.SQL(where))


def _sync_publication(
    conn: psycopg.Connection[tuple[object, ...]],
    publication: str,
    tables: list[TableCatalog],
    create_if_missing: bool,
    row_filters: Mapping[str, str],
) -> None:
    pub = sql.Identifier(publication)
    exists = conn.execute(
        "SELECT pubviaroot, obj_description(oid, 'pg_publication') "
        "FROM pg_publication WHERE pubname = %s",
        (publication,),
    ).fetchone()
    if exists is None:
        if not create_if_missing:
            raise SetupError(
                f"publication {publication!r} does not exist and postgres.create_if_missing is "
                f"false (run sql/setup.sql, or set postgres.create_if_missing: true)"
            )
        # Via the partition root: a partitioned table's changes then carry its own
        # name, the one in the config, rather than the name of each leaf partition.
        conn.execute(
            sql.SQL(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)"
            ).format(pub, sql.SQL(", ").join(sql.Identifier(t.schema, t.table) for t in tables))
        )
        conn.execute(
            sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(pub, sql.Literal(MANAGED_COMMENT))
        )
        for table in tables:
            where = row_filters.get(table.qualified_name)
            if where is not None:
                _sync_row_filter(conn, publication, table, None, where, create_if_missing)
        _check_row_filter_identity(conn, publication, tables)
        log.info(
            "created publication %s for %s",
            publication,
            ", ".join(t.qualified_name for t in tables),
        )
        return
    via_root, comment = exists
    managed = comment == MANAGED_COMMENT
    partitioned = [t.qualified_name for t in tables if t.partitioned]
    if partitioned and not via_root:
        raise SetupError(
            f"publication {publication!r} publishes the partitions of {', '.join(partitioned)} "
            "under their own names: run ALTER PUBLICATION "
            f"{publication} SET (publish_via_partition_root = true)"
        )
    published = _published_tables(conn, publication)
    missing = [t for t in tables if t.qualified_name not in published]
    if missing:
        names = ", ".join(t.qualified_name for t in missing)
        if not create_if_missing:
            raise SetupError(
                f"publication {publication!r} does not include {names} (run ALTER PUBLICATION "
                f"{publication} ADD TABLE {names}, or set postgres.create_if_missing: true)"
            )
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                pub,
                sql.SQL(", ").join(sql.Identifier(t.schema, t.table) for t in missing),
            )
        )
        log.info("added %s to publication %s", names, publication)
        published.update((t.qualified_name, None) for t in missing)  # filters: just below
    for table in tables:
        name = table.qualified_name
        if name in published:
            _sync_row_filter(
                conn, publication, table, published[name], row_filters.get(name), create_if_missing
            )
    configured = {t.qualified_name for t in tables}
    extra = sorted(name for name in published if name not in configured)
    if extra and managed and create_if_missing:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                pub, sql.SQL(", ").join(sql.Identifier(*name.split(".", 1)) for name in extra)
            )
        )
        log.info(
            "dropped %s from publication %s: no longer in tables:", ", ".join(extra), publication
        )
    elif extra:
        log.info(
            "publication %s also publishes %s, which is not in tables: (its changes are "
            "skipped); the bridge leaves the publication's table list as it is, because it "
            "did not create the publication",
            publication,
            ", ".join(extra),
        )
    _check_row_filter_identity(conn, publication, tables)


def _published_tables(
    conn: psycopg.Connection[tuple[object, ...]], publication: str
) -> dict[str, str | None]:
    """schema.table → its row filter (None: none) of every table in the publication."""
    if conn.info.server_version < ROW_FILTER_VERSION:
        query = "SELECT schemaname, tablename, NULL FROM pg_publication_tables WHERE pubname = %s"
    else:
        query = (
            "SELECT schemaname, tablename, rowfilter FROM pg_publication_tables WHERE pubname = %s"
        )
    return {
        f"{r[0]}.{r[1]}": None if r[2] is None else str(r[2])
        for r in conn.execute(query, (publication,))
    }


def _sync_row_filter(
    conn: psycopg.Connection[tuple[object, ...]],
    publication: str,
    table: TableCatalog,
    have: str | None,
    want: str | None,
    create_if_missing: bool,
) -> None:
    """Set ``table``'s row filter in the publication to ``want`` if it differs."""
    if have is None and want is None:
        return
    pub = sql.Identifier(publication)
    name = table.qualified_name
    drop = sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
        pub, sql.Identifier(table.schema, table.table)
    )
    add = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, _table_item(table, want))
    now: str | None = "different"
    try:
        # PostgreSQL keeps a row filter in its own normalized form: the way to compare
        # is to let it normalize ours. Rolled back unless it differs and may be kept.
        with conn.transaction() as savepoint:
            conn.execute(drop)
            conn.execute(add)
            now = _published_tables(conn, publication).get(name)
            if now == have or not create_if_missing:
                raise psycopg.Rollback(savepoint)
            log.info(
                "set the row filter of %s in publication %s to %s (was %s)",
                name,
                publication,
                now or "none",
                have or "none",
                extra={"table": name},
            )
            return
    except psycopg.errors.InsufficientPrivilege:
        if have is not None and want is not None:
            log.warning(
                "cannot check that the row filter of %s in publication %s, %s, is the "
                "configured one (not allowed to alter the publication)",
                name,
                publication,
                have,
                extra={"table": name},
            )
            return
    except psycopg.DatabaseError as exc:
        if isinstance(exc, psycopg.OperationalError):
            raise
        raise SetupError(f"tables.{name}.where {want!r}: {first_line(exc)}") from None
    if now == have:
        return
    raise SetupError(
        f"publication {publication!r} filters the rows of {name} with {have or 'no WHERE'}, "
        f"but tables.{name}.where says {want or 'none'} (run ALTER PUBLICATION {publication} "
        f"DROP TABLE {table.sql_name}; ALTER PUBLICATION {publication} ADD TABLE "
        f"{table.sql_name}{f' WHERE ({want})' if want else ''}; in one transaction, or set "
        "postgres.create_if_missing: true)"
    )


_VAR_ATTNO = re.compile(r":varattno (\d+)")


def _check_row_filter_identity(
    conn: psycopg.Connection[tuple[object, ...]], publication: str, tables: list[TableCatalog]
) -> None:
    """Refuse row filters on columns outside the replica identity.

    PostgreSQL accepts such a filter, but then refuses every UPDATE and DELETE of the
    table, the application's included ("cannot update table ... Column used in the
    publication WHERE expression is not part of the replica identity").
    """
    if conn.info.server_version < ROW_FILTER_VERSION:
        return
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname, r.prqual::text, c.oid
        FROM pg_publication p
        JOIN pg_publication_rel r ON r.prpubid = p.oid
        JOIN pg_class c ON c.oid = r.prrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE p.pubname = %s AND r.prqual IS NOT NULL AND (p.pubupdate OR p.pubdelete)
        """,
        (publication,),
    ).fetchall()
    catalogs = {t.qualified_name: t for t in tables}
    for schema, relname, qual, oid in rows:
        table = catalogs.get(f"{schema}.{relname}")
        if table is None:
            continue
        # The filter's column references are Var nodes in the stored expression tree.
        used = sorted({int(n) for n in _VAR_ATTNO.findall(str(qual))})
        columns = [
            str(r[0])
            for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum = ANY(%s) "
                "ORDER BY attnum",
                (oid, used),
            )
        ]
        outside = [c for c in columns if c not in table.identity_columns]
        if outside:
            raise SetupError(
                f"tables.{table.qualified_name}.where uses {outside[0]!r}, which is not in the "
                "table's replica identity: PostgreSQL would then refuse every UPDATE and DELETE "
                f"of {table.qualified_name} (the application's too). Run ALTER TABLE "
                f"{table.sql_name} REPLICA IDENTITY FULL, or filter on key columns only"
            )


def _ensure_slot(
    conn: psycopg.Connection[tuple[object, ...]],
    slot: str,
    create_if_missing: bool,
    creator: Callable[[], Lsn] | None = None,
) -> tuple[Lsn, bool]:
    row = conn.execute(
        """
        SELECT plugin, database, confirmed_flush_lsn::text, wal_status, current_database()
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        if not create_if_missing:
            raise SetupError(
                f"replication slot {slot!r} does not exist and postgres.create_if_missing is "
                "false (run sql/setup.sql, or set postgres.create_if_missing: true)"
            )
        if creator is not None:
            lsn = creator()
            log.info(
                "created replication slot %s at %s, exporting its snapshot",
                slot,
                format_lsn(lsn),
                extra={"lsn": format_lsn(lsn)},
            )
            return lsn, True
        created = conn.execute(
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,)
        ).fetchone()
        assert created is not None
        log.info("created replication slot %s at %s", slot, created[0], extra={"lsn": created[0]})
        return parse_lsn(str(created[0])), True
    plugin, database, confirmed, wal_status, current = row
    if plugin != "pgoutput":
        raise SetupError(
            f"replication slot {slot!r} uses plugin {plugin!r}, not pgoutput "
            "(choose another postgres.slot, or drop that slot)"
        )
    if database != current:
        raise SetupError(
            f"replication slot {slot!r} belongs to database {database!r}, not {current!r} "
            "(choose another postgres.slot)"
        )
    if wal_status == "lost":
        raise SetupError(
            f"replication slot {slot!r} is invalidated (wal_status = lost): the WAL it needed "
            f"was removed and changes were lost. Drop it (SELECT pg_drop_replication_slot("
            f"'{slot}')), start once with postgres.recreate_slot: true, and backfill the "
            "tables; raise max_slot_wal_keep_size so it does not happen again"
        )
    return parse_lsn(str(confirmed)), False


def _scalar_param(
    conn: psycopg.Connection[tuple[object, ...]], query: str, param: object
) -> object:
    row = conn.execute(query, (param,)).fetchone()
    return None if row is None else row[0]


def _scalar(conn: psycopg.Connection[tuple[object, ...]], query: str) -> object:
    row = conn.execute(query).fetchone()
    return None if row is None else row[0]


def quote_ident(identifier: str) -> str:
    """``identifier`` for SQL shown to people: quoted only when it has to be."""
    return _quote(identifier)


def _quote(identifier: str) -> str:
    if identifier.isidentifier() and identifier == identifier.lower():
        return identifier
    return '"' + identifier.replace('"', '""') + '"'
