"""One error tree for the whole bridge.

Every error says whether retrying can help (``retriable``) and carries the context an
operator needs (slot, LSN, subject). Errors from psycopg and nats-py are translated into
this tree at the edge of the module that talks to them, so the rest of the code never
imports a driver just to catch its exceptions.
"""

__all__ = [
    "CdcBridgeError",
    "ConfigError",
    "ConnectError",
    "DecodeError",
    "PublishError",
    "SetupError",
    "SinkError",
    "SlotBusyError",
    "SourceError",
    "first_line",
]


class CdcBridgeError(Exception):
    """Root of every error the bridge raises on purpose."""

    #: Whether a new attempt (reconnect, restart from the slot) may succeed.
    retriable: bool = False


class ConfigError(CdcBridgeError):
    """The configuration is invalid; the message names the key and the fix."""


class DecodeError(CdcBridgeError):
    """A pgoutput or replication-protocol message could not be decoded."""


class SetupError(CdcBridgeError):
    """The database or the stream is not in a state the bridge can work with."""


class ConnectError(SetupError):
    """A server could not be reached or refused the login; it may come back."""

    retriable = True


class SourceError(CdcBridgeError):
    """The replication connection to PostgreSQL failed."""

    retriable = True


class SlotBusyError(SourceError):
    """Another process streams from the slot (SQLSTATE 55006); this one stands by."""


class SinkError(CdcBridgeError):
    """The connection to NATS JetStream failed."""

    retriable = True


class PublishError(SinkError):
    """JetStream refused a message or did not acknowledge it in time."""

    def __init__(
        self, message: str, *, subject: str | None = None, retriable: bool = False
    ) -> None:
        super().__init__(message)
        self.subject = subject
        self.retriable = retriable


def first_line(exc: BaseException) -> str:
    """The first line of a driver's error message, for one-line reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
