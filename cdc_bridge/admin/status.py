"""``cdc-bridge status``: where the slot is, how far behind it is, and what was published last.

Lag in bytes is ``pg_current_wal_lsn() - confirmed_flush_lsn`` (WAL the slot still
retains; it includes WAL of tables that are not streamed until the next keepalive is
confirmed). "Last commit age" is the time since the commit (``source.commit_ts``) of
the newest message in the stream: how old the freshest change downstream is. It grows
while the tables see no writes, so read it together with the byte lag.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import click
import orjson

from cdc_bridge.admin import database, jetstream
from cdc_bridge.admin.backfill import describe_backfill, progress_line
from cdc_bridge.backfill import BackfillRecord, BackfillStore
from cdc_bridge.config import Settings
from cdc_bridge.errors import SetupError
from cdc_bridge.provisioning import connect

__all__ = ["collect_status", "run_status"]


def _slot(settings: Settings) -> database.SlotInfo | None:
    pg = settings.postgres
    with connect(settings.conninfo(), pg.connect_timeout) as conn:
        return database.slot_info(conn, pg.slot)


async def _stream(settings: Settings) -> dict[str, Any]:
    cfg = settings.nats
    nc = await jetstream.connect(cfg)
    try:
        info = await jetstream.stream_info(nc, cfg.stream)
        if info is None:
            return {"name": cfg.stream, "exists": False}
        last = await jetstream.last_message(nc, info)
        verified = await _last_verify(nc, settings)
        backfills = await _backfills(nc, settings)
    finally:
        await jetstream.close(nc)
    stream: dict[str, Any] = {
        "name": cfg.stream,
        "exists": True,
        "messages": info.state.messages,
        "last_seq": info.state.last_seq,
        "last_message": None,
        "last_verify": verified,
        "backfills": backfills,
    }
    if last is not None:
        try:
            body = orjson.loads(last.data)
        except orjson.JSONDecodeError:
            body = {}
        source = body.get("source", {}) if isinstance(body, dict) else {}
        stream["last_message"] = {
            "seq": last.seq,
            "subject": last.subject,
            "time": last.time.isoformat().replace("+00:00", "Z") if last.time else None,
            "commit_lsn": last.headers.get("Cdc-Commit-Lsn"),
            "op": last.headers.get("Cdc-Op"),
            "table": last.headers.get("Cdc-Table"),
            "commit_ts": source.get("commit_ts") if isinstance(source, dict) else None,
        }
    return stream


async def _last_verify(nc: Any, settings: Settings) -> dict[str, Any] | None:
    """The summary ``cdc-bridge verify`` kept of its last run (None: never ran, or unreadable)."""
    from cdc_bridge.verify.results import load_last_result

    try:
        return await load_last_result(nc, settings.nats.stream, settings.postgres.slot)
    except Exception:
        return None


async def _backfills(nc: Any, settings: Settings) -> dict[str, Any]:
    """This slot's backfills (cdc-bridge backfill): the unfinished ones, and how many ended."""
    store = BackfillStore(nc, stream=settings.nats.stream, slot=settings.postgres.slot)
    try:
        records = [record for record, _ in await store.all()]
    except Exception:
        return {"unfinished": [], "finished": 0}
    return {
        "unfinished": [orjson.loads(r.to_json()) for r in records if not r.final],
        "finished": sum(1 for r in records if r.final),
    }


def _age(commit_ts: str | None) -> float | None:
    if not commit_ts:
        return None
    try:
        committed = datetime.fromisoformat(commit_ts)
    except ValueError:
        return None
    return round((datetime.now(UTC) - committed).total_seconds(), 3)


async def collect_status(settings: Settings) -> dict[str, Any]:
    slot = await asyncio.to_thread(_slot, settings)
    if slot is None:
        raise SetupError(
            f"replication slot {settings.postgres.slot!r} does not exist "
            "(run cdc-bridge setup, or start the bridge)"
        )
    stream = await _stream(settings)
    last = stream.get("last_message")
    return {
        "slot": {
            "name": slot.name,
            "active": slot.active,
            "active_pid": slot.active_pid,
            "confirmed_flush_lsn": slot.confirmed_flush_lsn,
            "restart_lsn": slot.restart_lsn,
            "wal_status": slot.wal_status,
            "safe_wal_size": slot.safe_wal_size,
        },
        "current_wal_lsn": slot.current_wal_lsn,
        "lag_bytes": slot.lag_bytes,
        "last_commit_age_seconds": _age(last.get("commit_ts")) if last else None,
        "stream": stream,
        "last_verify": stream.pop("last_verify", None),
        "backfills": stream.pop("backfills", {"unfinished": [], "finished": 0}),
    }


def render(status: dict[str, Any]) -> str:
    slot = status["slot"]
    stream = status["stream"]
    running = (
        f"yes: active, held by PID {slot['active_pid']}" if slot["active"] else "no (inactive)"
    )
    safe = slot["safe_wal_size"]
    lines = [
        f"slot                 {slot['name']}",
        f"  bridge running     {running}",
        f"  confirmed_flush    {slot['confirmed_flush_lsn']}",
        f"  restart_lsn        {slot['restart_lsn']}",
        f"  current WAL        {status['current_wal_lsn']}",
        f"  lag                {status['lag_bytes']} bytes (current WAL - confirmed_flush)",
        f"  wal_status         {slot['wal_status']}"
        + (f" (safe_wal_size {safe} bytes)" if safe is not None else ""),
    ]
    if not stream["exists"]:
        lines.append(f"stream               {stream['name']}: does not exist")
        return "\n".join(lines)
    lines.append(
        f"stream               {stream['name']}: {stream['messages']} messages, "
        f"last seq {stream['last_seq']}"
    )
    last = stream["last_message"]
    if last is None:
        lines.append("  last message       none")
    else:
        age = status["last_commit_age_seconds"]
        lines += [
            f"  last message       seq {last['seq']} {last['subject']} ({last['op']})",
            f"  stored at          {last['time']}",
            f"  Cdc-Commit-Lsn     {last['commit_lsn']}",
            f"  commit time        {last['commit_ts']}"
            + (f" ({age:.1f}s ago: age of the newest change in the stream)" if age else ""),
        ]
    lines.append(_verify_line(status.get("last_verify")))
    lines += _backfill_lines(status["backfills"])
    return "\n".join(lines)


def _backfill_lines(backfills: dict[str, Any]) -> list[str]:
    finished = backfills["finished"]
    ended = f" ({finished} ended; cdc-bridge backfill --list)" if finished else ""
    unfinished = [BackfillRecord.from_json(orjson.dumps(r)) for r in backfills["unfinished"]]
    if not unfinished:
        return [f"backfills            none running{ended}"]
    return [f"backfills            {len(unfinished)} unfinished{ended}"] + [
        f"  {describe_backfill(r)}: {progress_line(r)}" for r in unfinished
    ]


def _verify_line(last: dict[str, Any] | None) -> str:
    if last is None:
        return "last verify          never (cdc-bridge verify)"
    tables = last.get("tables") or {}
    checked = sum(int(t.get("checked", 0)) for t in tables.values())
    mismatched = sum(
        int(t.get(kind, 0))
        for t in tables.values()
        for kind in ("only_in_table", "only_in_stream", "differing")
    )
    verdict = "equal" if mismatched == 0 else f"{mismatched} keys mismatched"
    if not last.get("ok", False):
        verdict += " (above --max-mismatch)"
    return (
        f"last verify          {last.get('time')} at LSN {last.get('lsn')}: {verdict}, "
        f"{checked} keys checked in {len(tables)} table{'' if len(tables) == 1 else 's'} "
        f"({last.get('mode')})"
    )


async def run_status(settings: Settings, *, as_json: bool) -> int:
    status = await collect_status(settings)
    if as_json:
        click.echo(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render(status))
    return 0
