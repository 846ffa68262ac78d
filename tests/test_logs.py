"""Log records as JSON lines or text, with context fields (cdc_bridge/logs.py)."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from cdc_bridge.logs import bind_log_context, configure_logging, resolve_format


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_json_unless_a_terminal() -> None:
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("auto", _Tty()) == "text"
    assert resolve_format("text", io.StringIO()) == "text"
    assert resolve_format("json", _Tty()) == "json"


@pytest.mark.usefixtures("restore_root_logger")
def test_json_lines_carry_time_level_logger_message_and_context() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", out)

    async def task() -> None:
        bind_log_context(slot="s1")
        logging.getLogger("cdc_bridge.test").info("streaming slot %s", "s1", extra={"lsn": "0/1"})

        async def child() -> None:  # tasks started after binding inherit the context
            logging.getLogger("cdc_bridge.child").warning('a "quoted" word')

        await asyncio.create_task(child())

    asyncio.run(task())
    logging.getLogger("cdc_bridge.test").debug("not shown at INFO")
    logging.getLogger("cdc_bridge.test").info("outside the task")
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [
        "streaming slot s1",
        'a "quoted" word',
        "outside the task",
    ]
    first = lines[0]
    assert first["level"] == "INFO"
    assert first["logger"] == "cdc_bridge.test"
    assert first["slot"] == "s1"
    assert first["lsn"] == "0/1"
    assert first["time"].endswith("Z")
    assert "T" in first["time"]
    assert lines[1]["slot"] == "s1"
    assert lines[1]["level"] == "WARNING"
    assert "slot" not in lines[2]  # the binding stayed inside its task


@pytest.mark.usefixtures("restore_root_logger")
def test_text_format_appends_context() -> None:
    out = _Tty()
    configure_logging("INFO", "auto", out)
    logging.getLogger("cdc_bridge.x").info("hello", extra={"slot": "s2"})
    line = out.getvalue().strip()
    assert " INFO cdc_bridge.x: hello [slot=s2]" in line
    assert not line.startswith("{")


@pytest.mark.usefixtures("restore_root_logger")
def test_exceptions_stay_on_one_json_line() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", out)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("cdc_bridge.x").exception("failed")
    (line,) = out.getvalue().splitlines()
    record = orjson.loads(line)
    assert record["message"] == "failed"
    assert "ValueError: boom" in record["exception"]
