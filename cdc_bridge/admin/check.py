"""``cdc-bridge check``: a read-only preflight of everything ``run`` needs.

Each check is one row: ✓ (fine), ! (a warning, e.g. a slot that ``run`` will create) or
✗ (``run`` would fail, or the setup is unsafe), with the fix for every ✗. Nothing is
created or changed. Table checks are :func:`cdc_bridge.provisioning.check_table`, the
very checks ``run`` makes, reported per table instead of stopping at the first.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Literal

import click
import orjson
import psycopg
from nats.aio.client import Client as NatsClient

from cdc_bridge.admin import database, jetstream
from cdc_bridge.config import Settings
from cdc_bridge.errors import CdcBridgeError, first_line
from cdc_bridge.nats_connection import redacted_url
from cdc_bridge.pipeline import stream_spec, table_requests
from cdc_bridge.provisioning import MIN_SERVER_VERSION, check_table, connect, quote_ident
from cdc_bridge.routing import subject_is_covered

__all__ = ["Check", "render", "run_check", "run_checks"]

Status = Literal["ok", "warn", "fail"]
SYMBOLS: dict[Status, str] = {"ok": "✓", "warn": "!", "fail": "✗"}

_RESTART = "then restart PostgreSQL"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _warn(name: str, detail: str, fix: str | None = None) -> Check:
    return Check(name, "warn", detail, fix)


def _fail(name: str, detail: str, fix: str | None = None) -> Check:
    return Check(name, "fail", detail, fix)


def postgres_checks(settings: Settings) -> list[Check]:
    pg = settings.postgres
    try:
        conn = connect(settings.conninfo(), pg.connect_timeout)
    except CdcBridgeError as exc:
        return [_fail("postgres.connect", str(exc), "check postgres.dsn and that the server runs")]
    checks = [_ok("postgres.connect", "connected")]
    try:
        with conn:
            checks += _database_checks(settings, conn)
    except psycopg.Error as exc:
        checks.append(_fail("postgres.catalog", f"cannot read the catalog: {first_line(exc)}"))
    return checks


def _database_checks(settings: Settings, conn: database.Connection) -> list[Check]:
    pg = settings.postgres
    checks: list[Check] = []
    server = database.server_info(conn)
    slot = database.slot_info(conn, pg.slot)
    checks += _server_checks(server, slot is not None)
    publication = database.publication_info(conn, pg.publication)
    partitioned: list[str] = []
    for name, request in table_requests(settings).items():
        try:
            catalog, key = check_table(conn, name, request)
        except CdcBridgeError as exc:
            checks.append(_fail(f"table {name}", str(exc), _table_fix(conn, name)))
            continue
        if catalog.partitioned:
            partitioned.append(name)
        identity = {"d": "default", "f": "full", "i": "index", "n": "nothing"}
        checks.append(
            _ok(
                f"table {name}",
                f"key ({', '.join(key)}), replica identity "
                f"{identity.get(catalog.replica_identity, catalog.replica_identity)}",
            )
        )
    existing = [t for t in settings.tables if database.table_exists(conn, t)]
    checks.append(_publication_check(settings, publication, partitioned, existing))
    checks.append(_slot_check(settings, slot))
    return checks


def _table_fix(conn: database.Connection, name: str) -> str | None:
    """The fix for a missing table; other table errors name theirs in the message."""
    if database.table_exists(conn, name):
        return None
    return f"create {name} (names are case-sensitive), or remove tables.{name} from the config"


def _server_checks(server: database.ServerInfo, slot_exists: bool) -> list[Check]:
    checks: list[Check] = []
    if server.version < MIN_SERVER_VERSION:
        checks.append(
            _fail(
                "postgres.version",
                f"PostgreSQL {server.version_text} is too old",
                "upgrade to PostgreSQL 14 or newer",
            )
        )
    else:
        checks.append(_ok("postgres.version", f"PostgreSQL {server.version_text}"))
    if server.wal_level != "logical":
        checks.append(
            _fail(
                "postgres.wal_level",
                f"wal_level is {server.wal_level!r}, must be 'logical'",
                f"ALTER SYSTEM SET wal_level = logical; {_RESTART} "
                "(RDS: set rds.logical_replication = 1 in the DB parameter group and reboot)",
            )
        )
    else:
        checks.append(_ok("postgres.wal_level", "logical"))
    # A new slot needs a free slot; the bridge's walsender needs a free sender (unless
    # the slot is in use by a running bridge already, which then holds one).
    need_slot = 0 if slot_exists else 1
    free_slots = server.max_replication_slots - server.used_replication_slots
    detail = f"{server.used_replication_slots} of {server.max_replication_slots} used"
    if free_slots < need_slot:
        checks.append(
            _fail(
                "postgres.max_replication_slots",
                f"{detail}: no free slot for {need_slot} more",
                f"ALTER SYSTEM SET max_replication_slots = {server.max_replication_slots + 1}; "
                f"{_RESTART} (RDS: parameter max_replication_slots), or drop an unused slot",
            )
        )
    else:
        checks.append(_ok("postgres.max_replication_slots", detail))
    free_senders = server.max_wal_senders - server.used_wal_senders
    detail = f"{server.used_wal_senders} of {server.max_wal_senders} in use"
    if free_senders < 1:
        checks.append(
            _fail(
                "postgres.max_wal_senders",
                f"{detail}: no free WAL sender for the bridge",
                f"ALTER SYSTEM SET max_wal_senders = {server.max_wal_senders + 1}; {_RESTART} "
                "(RDS: parameter max_wal_senders)",
            )
        )
    else:
        checks.append(_ok("postgres.max_wal_senders", detail))
    role = quote_ident(server.role)
    if server.superuser or server.replication:
        checks.append(
            _ok(
                "postgres.role",
                f"{server.role}: {'superuser' if server.superuser else 'REPLICATION'}",
            )
        )
    elif server.rds_replication:
        checks.append(_ok("postgres.role", f"{server.role}: member of rds_replication"))
    else:
        fix = f"ALTER ROLE {role} WITH REPLICATION;"
        if server.rds_replication is not None:
            fix = f"GRANT rds_replication TO {role};"
        checks.append(
            _fail("postgres.role", f"{server.role} may not start logical replication", fix)
        )
    return checks


def _table_sql(name: str) -> str:
    schema, table = name.split(".", 1)
    return f"{quote_ident(schema)}.{quote_ident(table)}"


def _publication_check(
    settings: Settings,
    publication: database.PublicationInfo | None,
    partitioned: list[str],
    existing: list[str],
) -> Check:
    """``existing``: the configured tables that exist (only those can be published)."""
    pg = settings.postgres
    name = f"publication {pg.publication}"
    pub = quote_ident(pg.publication)
    tables = list(settings.tables)
    if publication is None:
        create = (
            f"CREATE PUBLICATION {pub} FOR TABLE {', '.join(map(_table_sql, existing))} "
            "WITH (publish_via_partition_root = true);"
        )
        if pg.create_if_missing:
            return _warn(name, "does not exist; run (or cdc-bridge setup) will create it")
        return _fail(name, "does not exist and postgres.create_if_missing is false", create)
    if partitioned and not publication.via_root:
        return _fail(
            name,
            f"publishes the partitions of {', '.join(partitioned)} under their own names",
            f"ALTER PUBLICATION {pub} SET (publish_via_partition_root = true);",
        )
    missing = [t for t in tables if t not in publication.tables]
    if missing:
        detail = f"does not include {', '.join(missing)}"
        if pg.create_if_missing:
            return _warn(name, f"{detail}; run (or cdc-bridge setup) will add them")
        addable = [t for t in missing if t in existing] or missing
        add = ", ".join(map(_table_sql, addable))
        return _fail(name, detail, f"ALTER PUBLICATION {pub} ADD TABLE {add};")
    return _ok(name, f"covers {', '.join(tables)}")


def _slot_check(settings: Settings, slot: database.SlotInfo | None) -> Check:
    pg = settings.postgres
    name = f"slot {pg.slot}"
    create = f"SELECT pg_create_logical_replication_slot('{pg.slot}', 'pgoutput');"
    if slot is None:
        if pg.create_if_missing:
            return _warn(name, "does not exist; run (or cdc-bridge setup) will create it")
        return _fail(name, "does not exist and postgres.create_if_missing is false", create)
    drop = f"SELECT pg_drop_replication_slot('{pg.slot}');"
    if slot.plugin != "pgoutput":
        return _fail(
            name,
            f"uses plugin {slot.plugin!r}, not pgoutput",
            f"choose another postgres.slot, or {drop} {create}",
        )
    if slot.database != slot.current_database:
        return _fail(
            name,
            f"belongs to database {slot.database!r}, not {slot.current_database!r}",
            "choose another postgres.slot",
        )
    state = (
        f"pgoutput, wal_status {slot.wal_status}, "
        + (f"active (PID {slot.active_pid})" if slot.active else "inactive")
        + f", lag {slot.lag_bytes} bytes"
    )
    if slot.wal_status == "lost":
        return _fail(
            name,
            f"{state}: invalidated, the WAL it needed was removed and changes were lost",
            f"{drop} then start once with postgres.recreate_slot: true, and backfill the tables",
        )
    if slot.wal_status == "unreserved":
        return _warn(
            name,
            f"{state}: about to lose WAL (past max_slot_wal_keep_size)",
            "start the bridge now, or raise max_slot_wal_keep_size",
        )
    return _ok(name, state)


async def nats_checks(settings: Settings) -> list[Check]:
    cfg = settings.nats
    try:
        nc = await jetstream.connect(cfg)
    except CdcBridgeError as exc:
        return [_fail("nats.connect", str(exc), "check the nats.* settings named above")]
    try:
        checks = [
            _ok(
                "nats.connect",
                f"{nc.connected_url.hostname}:{nc.connected_url.port}"
                if nc.connected_url
                else redacted_url(cfg.url),
            ),
            _ok(
                "nats.max_payload", f"{nc.max_payload} bytes (largest message the bridge can send)"
            ),
        ]
        reason = await jetstream.jetstream_enabled(nc)
        if reason is not None:
            checks.append(
                _fail(
                    "nats.jetstream",
                    f"JetStream does not answer: {reason}",
                    "start nats-server with -js (or jetstream {} in its config)",
                )
            )
            return checks
        checks.append(_ok("nats.jetstream", "enabled"))
        checks.append(await _stream_check(settings, nc))
        checks.append(await _atomic_check(settings, nc))
        return checks
    finally:
        await jetstream.close(nc)


async def _stream_check(settings: Settings, nc: NatsClient) -> Check:
    spec = stream_spec(settings)
    name = f"stream {spec.name}"
    info = await jetstream.stream_info(nc, spec.name)
    wanted = ", ".join(spec.subjects)
    if info is None:
        add = f"nats stream add {spec.name} --subjects '{' '.join(spec.subjects)}'"
        if spec.create:
            return _warn(
                name, f"does not exist; run (or cdc-bridge setup) will create it for {wanted}"
            )
        return _fail(name, "does not exist and nats.create_stream is false", add)
    existing = info.config.subjects or []
    missing = [s for s in spec.subjects if not subject_is_covered(s, existing)]
    if missing:
        return _fail(
            name,
            f"captures {', '.join(existing)} but not {', '.join(missing)}",
            f"add {', '.join(missing)} to the stream's subjects (nats stream edit {spec.name}), "
            "or change the subject templates",
        )
    return _ok(name, f"captures {wanted} ({info.state.messages} messages)")


async def _atomic_check(settings: Settings, nc: NatsClient) -> Check:
    """Whether each transaction will be stored as a whole (nats.atomic_batches)."""
    name = "nats.atomic_batches"
    if not settings.nats.atomic_batches:
        return _ok(name, "off: messages are published one at a time")
    version = nc.connected_server_version
    if (version.major, version.minor) < (2, 12):
        return _warn(
            name,
            f"nats-server {version.major}.{version.minor}.{version.patch} has none (2.12+): "
            "a transaction's messages are stored one by one, consumers may see part of one",
            "upgrade nats-server to 2.12 or newer, or set nats.atomic_batches: false",
        )
    stream = settings.nats.stream
    info = await jetstream.stream_info(nc, stream)
    if info is None:
        return _ok(name, f"supported; the stream {stream} will be created allowing them")
    if not info.config.allow_atomic:
        return _warn(
            name,
            f"stream {stream} does not allow them: transactions are stored message by message",
            f"set allow_atomic: true in the configuration of stream {stream}",
        )
    return _ok(name, "each transaction is stored as a whole")


async def run_checks(settings: Settings) -> list[Check]:
    pg_checks = await asyncio.to_thread(postgres_checks, settings)
    return pg_checks + await nats_checks(settings)


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{SYMBOLS[check.status]} {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != "ok":
            lines.append(f"  {'':<{width}}  fix: {check.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append("")
    lines.append(
        f"{failed} problem{'s' * (failed != 1)}, {warned} warning{'s' * (warned != 1)}"
        if failed or warned
        else "all checks passed"
    )
    return "\n".join(lines)


async def run_check(settings: Settings, *, as_json: bool) -> int:
    """Print the checks; return the exit code (0: no ✗, 1: at least one)."""
    checks = await run_checks(settings)
    ok = not any(c.status == "fail" for c in checks)
    if as_json:
        click.echo(
            orjson.dumps(
                {"ok": ok, "checks": [asdict(c) for c in checks]}, option=orjson.OPT_INDENT_2
            ).decode()
        )
    else:
        click.echo(render(checks))
    return 0 if ok else 1
