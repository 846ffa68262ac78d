"""``verify --repair``: republish the current row of every mismatched key.

Owns the one path that writes to the stream: per batch of keys, lock the rows
(``FOR SHARE``), republish each as op ``read`` (or a delete for a row only in the
stream) with a ``Nats-Msg-Id`` that is not a WAL position (:func:`repair_msg_id`),
wait for the PubAcks, then commit. Separate because it is optional, it is the only
part of verify with side effects, and its locking and ids are a concern of their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import orjson
import psycopg
from nats.aio.client import Client as NatsClient
from psycopg import sql
from psycopg.types.string import TextLoader

from cdc_bridge.changes import Change, TableInfo, read_change
from cdc_bridge.config import Settings
from cdc_bridge.envelopes import encoder_from_settings
from cdc_bridge.errors import SetupError, SinkError, first_line
from cdc_bridge.filters import ChangeFilters
from cdc_bridge.lsn import parse_lsn
from cdc_bridge.pgoutput import pg_now_micros
from cdc_bridge.router import Router
from cdc_bridge.routing import SubjectTemplate
from cdc_bridge.snapshot import convert_row
from cdc_bridge.verify.fold import key_text
from cdc_bridge.verify.table import Target, connect

__all__ = ["repair", "repair_msg_id"]

log = logging.getLogger(__name__)

_REPAIR_BATCH = 500


def repair_msg_id(slot: str, lsn: str, table: str, number: int) -> str:
    """``<slot>:verify:<L>:<table>:<n>``: not a WAL position (the read-back passes over it),
    deterministic for one verify run, distinct between runs (L moves on)."""
    return f"{slot}:verify:{lsn}:{table}:{number}"


async def repair(
    settings: Settings,
    nc: NatsClient,
    targets: Mapping[str, Target],
    lsn_text: str,
    filters: ChangeFilters | None,
) -> None:
    """Republish the mismatched keys of every target; set each one's ``result.repaired``."""
    router = Router(
        slot=settings.postgres.slot,
        table_subjects={name: t.subject for name, t in settings.tables.items()},
        message_subject=None,
        encoder=encoder_from_settings(settings),
    )
    conn = await asyncio.to_thread(connect, settings)
    try:
        for target in targets.values():
            if not target.repairs:
                continue
            info = target.table.info
            # The converters take each type's text output, as the snapshot read it.
            for type_oid in set(info.type_oids):
                conn.adapters.register_loader(type_oid, TextLoader)
            target.type_names = await asyncio.to_thread(_type_names, conn, info)
            target.result.repaired = await _repair_table(
                conn, nc, settings, target, lsn_text, filters, router
            )
            log.info("republished %d keys of %s", target.result.repaired, target.name)
    finally:
        await asyncio.to_thread(conn.close)


def _type_names(conn: psycopg.Connection[tuple[Any, ...]], info: TableInfo) -> tuple[str, ...]:
    rows = conn.execute(
        "SELECT format_type(t, m) FROM unnest(%s::oid[], %s::int[]) AS u(t, m)",
        (list(info.type_oids), list(info.type_modifiers or [-1] * len(info.type_oids))),
    ).fetchall()
    return tuple(str(r[0]) for r in rows)


async def _repair_table(
    conn: psycopg.Connection[tuple[Any, ...]],
    nc: NatsClient,
    settings: Settings,
    target: Target,
    lsn_text: str,
    filters: ChangeFilters | None,
    router: Router,
) -> int:
    """Republish the current row of each mismatched key; return how many were sent.

    Per batch of keys, in one transaction: lock the rows (``FOR SHARE``; without the
    lock, with a warning, if the role may not take it), publish, wait for the PubAcks,
    commit. A change of a locked row waits for the commit, so it reaches the stream
    after the repair, never before.
    """
    stream = settings.nats.stream
    slot = settings.postgres.slot
    js = nc.jetstream(timeout=max(settings.nats.ack_timeout, 5.0))
    table = target.table
    info = table.info
    names = info.column_names
    page_columns = table.page_columns
    casts = [sql.SQL(target.type_names[i]) for i in table.page_positions]
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in names)
    key_sql = sql.SQL(", ").join(sql.Identifier(c) for c in page_columns)
    one_key = sql.SQL("({})").format(
        sql.SQL(", ").join(sql.SQL("CAST({} AS {})").format(sql.Placeholder(), c) for c in casts)
    )
    masked = set(settings.tables[target.name].mask)
    # A row only in the stream is looked up by the key the stream states, where that is
    # the table's own key, unmasked.
    lookup = page_columns == target.key_names and not masked & set(page_columns)
    sent = 0
    number = 0
    items = list(target.repairs.items())
    for start in range(0, len(items), _REPAIR_BATCH):
        batch = items[start : start + _REPAIR_BATCH]
        raw: list[list[Any]] = []
        for key, (values, _) in batch:
            if values is not None:
                raw.append(list(values))
            elif lookup:
                raw.append(
                    [
                        v if isinstance(v, str) or v is None else orjson.dumps(v).decode()
                        for v in orjson.loads(key)
                    ]
                )
        conditions: list[sql.Composable] = [
            sql.SQL("({}) IN ({})").format(key_sql, sql.SQL(", ").join([one_key] * len(raw)))
        ]
        if table.where:
            conditions.append(sql.SQL("({})").format(sql.SQL(table.where)))
        select = sql.SQL("SELECT {} FROM {} WHERE {}").format(
            columns, table.sql_name, sql.SQL(" AND ").join(conditions)
        )
        params = [v for values in raw for v in values]
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        try:
            with conn.transaction():
                rows: list[tuple[Any, ...]] = []
                if raw:
                    rows = _locked_rows(conn, select, params, target.name)
                lock_row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                assert lock_row is not None
                now_lsn = parse_lsn(str(lock_row[0]))
                current: dict[str, Change] = {}
                for found_row in rows:
                    change = read_change(
                        info,
                        convert_row(names, info.converters, found_row),
                        lsn=now_lsn,
                        commit_lsn=now_lsn,
                        xid=0,
                        commit_ts=pg_now_micros(),
                        index=0,
                    )
                    if filters is not None and not filters.apply(change):
                        continue
                    assert change.after is not None
                    found_key = key_text(target.key_names, _json_round_trip(change.after))
                    if found_key is not None:
                        current[found_key] = change
                for key, (_, stream_state) in batch:
                    msg_id = repair_msg_id(slot, lsn_text, target.name, number)
                    number += 1
                    found = current.get(key)
                    if found is not None:
                        found.index = number - 1
                        outgoing = router.route_read(found, msg_id)
                    elif stream_state is not None:
                        outgoing = _repair_delete(
                            router, target, key, stream_state, now_lsn, filters, settings
                        )
                    else:
                        continue  # gone from the table, and the stream says so already
                    if outgoing is None:
                        continue
                    headers = dict(outgoing.headers)
                    headers.pop("Cdc-Index", None)
                    headers["Nats-Msg-Id"] = msg_id
                    headers["Cdc-Repair"] = lsn_text
                    messages.append((outgoing.subject, outgoing.body, headers))
                for subject, body, headers in messages:
                    try:
                        await js.publish(subject, body, headers=headers, stream=stream)
                    except Exception as exc:
                        raise SinkError(
                            f"cannot publish the repair of {target.name} to {subject!r}: "
                            f"{first_line(exc)}"
                        ) from None
                    sent += 1
        except psycopg.Error as exc:
            raise SetupError(
                f"cannot read the rows of {target.name} to repair: {first_line(exc)}"
            ) from None
    return sent


def _locked_rows(
    conn: psycopg.Connection[tuple[Any, ...]],
    select: sql.Composed,
    params: list[Any],
    name: str,
) -> list[tuple[Any, ...]]:
    """The rows, locked FOR SHARE if the role may (that needs UPDATE privilege)."""
    try:
        with conn.transaction():  # a savepoint: a refused lock leaves the outer one usable
            return conn.execute(select + sql.SQL(" FOR SHARE"), params).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        log.warning(
            "cannot lock the rows of %s to repair them (FOR SHARE needs UPDATE privilege): "
            "repairing without the lock; a change made meanwhile can reach the stream "
            "before its repair, so run verify again afterwards",
            name,
        )
        return conn.execute(select, params).fetchall()


def _json_round_trip(after: Mapping[str, Any]) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(after))  # type: ignore[no-any-return]


def _repair_delete(
    router: Router,
    target: Target,
    key: str,
    stream_state: dict[str, Any],
    now_lsn: int,
    filters: ChangeFilters | None,
    settings: Settings,
) -> Any:
    """A delete for a row the table does not have (any more) but the stream still has.

    Its old row is what the stream last stated, already in published form (so it is not
    filtered again): all of it in the native envelope; the key and subject columns in
    the others, whose encoders expect the bridge's own values.
    """
    before: dict[str, Any] = dict(zip(target.key_names, orjson.loads(key), strict=True))
    if settings.envelope.format == "native":
        before = {**stream_state, **before}
    else:
        template = SubjectTemplate(settings.tables[target.name].subject)
        for column in template.placeholders:
            if column in stream_state and column not in before:
                before[column] = stream_state[column]
    info = target.table.info
    view = filters.published_table(info) if filters is not None else info
    change = Change(
        op="delete",
        table=view,
        key={k: before.get(k) for k in target.key_names},
        after=None,
        before=before,
        unchanged_toast=[],
        lsn=now_lsn,
        commit_lsn=now_lsn,
        xid=0,
        commit_ts=pg_now_micros(),
        index=0,
    )
    return router.route_change(change)
