"""``cdc-bridge tail``: follow the stream and print each message as it arrives.

An ordered push consumer (ephemeral, no acks, in stream order) on the configured stream,
filtered by the given subject or by all of the stream's subjects. Starts with new
messages, from the first with ``--from-start``, or with the stream's last N messages
(``--last N``: from stream sequence last_seq - N + 1, so with a subject filter only
those of the N that match are shown).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import click
import orjson
from nats.aio.msg import Msg

from cdc_bridge.admin import jetstream
from cdc_bridge.config import Settings
from cdc_bridge.errors import SetupError

__all__ = ["format_message", "run_tail"]


def _body(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode(errors="replace")


def format_message(msg: Msg, *, as_json: bool, verbose: bool) -> str:
    headers = dict(msg.headers or {})
    body = _body(msg.data)
    seq = msg.metadata.sequence.stream if msg.reply else None
    if as_json:
        return orjson.dumps(
            {"seq": seq, "subject": msg.subject, "headers": headers, "body": body}
        ).decode()
    fields = body if isinstance(body, dict) else {}
    op = headers.get("Cdc-Op") or fields.get("op", "?")
    table = headers.get("Cdc-Table") or ".".join(
        str(fields[k]) for k in ("schema", "table") if k in fields
    )
    key = orjson.dumps(fields.get("key")).decode()
    line = (
        f"{seq or '':>6} {msg.subject:<40} {op:<8} {table:<24} key={key:<16} "
        f"commit_lsn={headers.get('Cdc-Commit-Lsn', '?')}"
    )
    if not verbose:
        return line
    shown = [line] + [f"    {name}: {value}" for name, value in headers.items()]
    shown.append(
        "    " + orjson.dumps(body, option=orjson.OPT_INDENT_2).decode().replace("\n", "\n    ")
    )
    return "\n".join(shown)


async def run_tail(
    settings: Settings,
    *,
    stop: asyncio.Event,
    subject: str | None,
    from_start: bool,
    last: int | None,
    count: int | None,
    as_json: bool,
    verbose: bool,
) -> int:
    cfg = settings.nats
    nc = await jetstream.connect(cfg)
    try:
        info = await jetstream.stream_info(nc, cfg.stream)
        if info is None:
            raise SetupError(
                f"stream {cfg.stream!r} does not exist (run cdc-bridge setup, or start the bridge)"
            )
        filters = [subject] if subject else list(info.config.subjects or [])
        if not filters:
            raise SetupError(f"stream {cfg.stream!r} has no subjects: give a SUBJECT_FILTER")
        start_seq = None
        if last is not None:
            start_seq = max(1, (info.state.last_seq or 0) - last + 1)
        printed = 0
        done = asyncio.Event()

        async def show(msg: Msg) -> None:
            nonlocal printed
            if done.is_set():
                return
            click.echo(format_message(msg, as_json=as_json, verbose=verbose))
            printed += 1
            if count is not None and printed >= count:
                done.set()

        if count == 0:
            return 0
        sub = await jetstream.subscribe_ordered(
            nc, cfg.stream, filters, show, start_seq=start_seq, from_start=from_start
        )
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(done.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    finally:
        await jetstream.close(nc)
    return 0
