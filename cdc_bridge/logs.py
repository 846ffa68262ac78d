"""Log records as text for a terminal or as JSON lines for a log collector.

``log_format: auto`` (the default) writes JSON when stderr is not a terminal (a
container, systemd, a pipe) and text when a person is watching. Each JSON line holds
``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` and the context fields
present on the record: given with ``extra={"lsn": ...}`` or bound for a whole task with
:func:`bind_log_context` (the pipeline binds ``slot``). Context is a ``ContextVar``, so
asyncio tasks created after binding inherit it and other tasks are not affected.

The final ``cdc-bridge: error: …`` line is not a log record (the CLI echoes it), so it
stays plain text whatever the format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

__all__ = [
    "CONTEXT_FIELDS",
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "bind_log_context",
    "configure_logging",
    "resolve_format",
]

LogFormat = Literal["auto", "json", "text"]

#: Record attributes copied into the output when present (from ``extra=`` or the context).
CONTEXT_FIELDS = ("slot", "lsn", "table", "subject", "stream")

_context: ContextVar[Mapping[str, Any] | None] = ContextVar("cdc_bridge_log_context", default=None)


def bind_log_context(**fields: Any) -> None:
    """Add ``fields`` to every record logged from the current context (and tasks it starts)."""
    _context.set({**(_context.get() or {}), **fields})


class _ContextFilter(logging.Filter):
    """Copies the bound context onto each record, without overriding ``extra=`` values."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def _context_of(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in CONTEXT_FIELDS if hasattr(record, name)}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in _context_of(record).items():
            entry[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value …`` for people."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = _context_of(record)
        if not context:
            return text
        first, newline, rest = text.partition("\n")
        fields = " ".join(f"{name}={value}" for name, value in context.items())
        return f"{first} [{fields}]{newline}{rest}"


def resolve_format(log_format: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    """``auto`` → JSON unless ``stream`` is a terminal."""
    if log_format != "auto":
        return log_format
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure_logging(
    level: str, log_format: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    """Send the root logger's records to ``stream`` (stderr) in the chosen format."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    chosen = resolve_format(log_format, stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
