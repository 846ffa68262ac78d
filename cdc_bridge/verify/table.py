"""The table side of verify: PostgreSQL, the consistent snapshot, and the comparison.

Owns the connection verify uses, the ``REPEATABLE READ`` snapshot whose
``pg_current_wal_lsn()`` is L, and reading each table in it page by page: every row is
converted and published as the bridge would (filters, masks, envelope) without being
sent, then compared with the stream's fold (:mod:`cdc_bridge.verify.fold`). Separate
from :mod:`.stream` (the other side of the comparison) and :mod:`.repair` (which acts
on what this finds); :class:`Target` is the per-table state the three share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql

from cdc_bridge.changes import TableInfo, read_change
from cdc_bridge.config import Settings
from cdc_bridge.envelopes import ChangeEncoder
from cdc_bridge.errors import SetupError, first_line
from cdc_bridge.filters import ChangeFilters
from cdc_bridge.lsn import parse_lsn
from cdc_bridge.pgoutput import pg_now_micros
from cdc_bridge.provisioning import DatabaseState
from cdc_bridge.snapshot import SnapshotReader, SnapshotTable, connect_for_reading, convert_row
from cdc_bridge.verify.fold import TableFold, decode_row, differing_columns, key_text
from cdc_bridge.verify.report import Differing, TableResult

__all__ = ["Target", "compare_table", "connect", "count_rows", "open_snapshot"]

_PAGE_ROWS = 5000


@dataclass(slots=True)
class Target:
    """One table being verified: its snapshot, its fold of the stream, what was found."""

    name: str
    table: SnapshotTable
    key_names: tuple[str, ...]
    fold: TableFold
    result: TableResult
    #: Mismatched keys to repair: canonical key -> (the table's key values as text, in
    #: page-column order, None if only in the stream; the stream's state of the row).
    repairs: dict[str, tuple[list[str | None] | None, dict[str, Any] | None]] = field(
        default_factory=dict
    )
    type_names: tuple[str, ...] = ()


def connect(settings: Settings) -> psycopg.Connection[tuple[Any, ...]]:
    """An autocommit connection for verify; :class:`ConnectError` with a hint if none."""
    return connect_for_reading(
        settings.conninfo(),
        connect_timeout=settings.postgres.connect_timeout,
        application_name="cdc-bridge verify",
    )


def open_snapshot(
    settings: Settings, state: DatabaseState, names: Sequence[str]
) -> tuple[SnapshotReader, psycopg.Connection[tuple[Any, ...]], int, str, dict[str, SnapshotTable]]:
    """Begin the snapshot; (reader, its connection, L, ``pg_current_snapshot()`` as
    text, each table's shape in it)."""
    conn = connect(settings)
    try:
        reader = SnapshotReader(conn)
        reader.begin(None)
        row = conn.execute(
            "SELECT pg_current_wal_lsn()::text, pg_current_snapshot()::text"
        ).fetchone()
        assert row is not None
        lsn = parse_lsn(str(row[0]))
        tables = {
            name: reader.table(
                name,
                state.tables[name],
                tuple(state.key_columns.get(name, ())),
                type_aliases=state.type_aliases,
                where=settings.tables[name].where,
            )
            for name in names
        }
    except psycopg.Error as exc:
        conn.close()
        raise SetupError(f"cannot take the snapshot to verify: {first_line(exc)}") from None
    except BaseException:
        conn.close()
        raise
    return reader, conn, lsn, str(row[1]), tables


def count_rows(conn: psycopg.Connection[tuple[Any, ...]], table: SnapshotTable) -> int:
    """The table's rows (within its ``where``) in the snapshot: the sample's base."""
    query = sql.SQL("SELECT count(*) FROM {}").format(table.sql_name)
    if table.where:
        query += sql.SQL(" WHERE ({})").format(sql.SQL(table.where))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _published(
    info: TableInfo,
    row: dict[str, Any],
    key_names: Sequence[str],
    *,
    lsn: int,
    filters: ChangeFilters | None,
    encoder: ChangeEncoder,
    envelope: str,
    slot: str,
) -> dict[str, Any] | None:
    """The row as the stream would state it: filtered, masked, encoded and decoded."""
    change = read_change(
        info, row, lsn=lsn, commit_lsn=lsn, xid=0, commit_ts=pg_now_micros(), index=0
    )
    if filters is not None and not filters.apply(change):
        return None
    if envelope == "native":
        # The native envelope is the row itself as JSON: a round trip is the same.
        return orjson.loads(orjson.dumps(change.after))  # type: ignore[no-any-return]
    body = orjson.loads(encoder(change, slot))
    return decode_row(envelope, "read", body, key_names).row


def compare_table(
    reader: SnapshotReader,
    target: Target,
    *,
    lsn: int,
    filters: ChangeFilters | None,
    encoder: ChangeEncoder,
    envelope: str,
    slot: str,
    examples: int,
    repair: bool,
    sample_by_key: bool = False,
) -> None:
    """Read the table in the snapshot, page by page, and compare each row with the fold.

    ``sample_by_key``: the published key is the converted key (native envelope, key not
    masked), so a row outside the sample is skipped before the rest of it is converted.
    """
    table, fold, result = target.table, target.fold, target.result
    info = table.info
    names = info.column_names
    converters = info.converters
    states = fold.states
    keep = fold.keep
    key_positions = [names.index(k) for k in target.key_names if k in names]
    sample_by_key = sample_by_key and len(key_positions) == len(target.key_names)
    after: list[str | None] | None = None
    while True:
        rows = reader.page(table, after, _PAGE_ROWS)
        if not rows:
            break
        after = [rows[-1][i] for i in table.page_positions]
        for values in rows:
            if keep is not None and sample_by_key:
                parts = [(i, values[i]) for i in key_positions]
                early = orjson.dumps(
                    [None if v is None else converters[i](v) for i, v in parts]
                ).decode()
                if not keep(early):
                    continue
            row = convert_row(names, converters, values)
            published = _published(
                info,
                row,
                target.key_names,
                lsn=lsn,
                filters=filters,
                encoder=encoder,
                envelope=envelope,
                slot=slot,
            )
            if published is None:
                continue
            key = key_text(target.key_names, published)
            if key is None or (keep is not None and not keep(key)):
                continue
            result.table_rows += 1
            if key in states:
                state = states.pop(key)
            elif fold.baseline_known:
                state = None
            else:
                result.unverifiable += 1
                continue
            result.checked += 1
            key_dict = dict(zip(target.key_names, orjson.loads(key), strict=True))
            if state is None:
                result.only_in_table += 1
                if len(result.only_in_table_examples) < examples:
                    result.only_in_table_examples.append(key_dict)
            else:
                columns = differing_columns(published, state)
                if not columns:
                    continue
                result.differing += 1
                for column in columns:
                    result.differing_columns[column] = result.differing_columns.get(column, 0) + 1
                if len(result.differing_examples) < examples:
                    result.differing_examples.append(Differing(key_dict, columns))
            if repair:
                target.repairs[key] = ([values[i] for i in table.page_positions], state)
        if len(rows) < _PAGE_ROWS:
            break
    # What is left in the fold: keys the table does not have (in the snapshot).
    for key, state in states.items():
        if state is None:
            continue  # gone from both
        result.checked += 1
        result.only_in_stream += 1
        if len(result.only_in_stream_examples) < examples:
            result.only_in_stream_examples.append(
                dict(zip(target.key_names, orjson.loads(key), strict=True))
            )
        if repair:
            target.repairs[key] = (None, state)
