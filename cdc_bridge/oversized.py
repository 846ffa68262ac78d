"""Messages over the NATS server's ``max_payload``: fail, or a dead-letter marker.

``nats.oversized: fail`` (default) stops the bridge at the message, with its table, key,
commit LSN and size; nothing after it is published or confirmed. ``dead-letter``
publishes a small marker on ``nats.dead_letter_subject`` in its place (same
``Nats-Msg-Id``), so the stream goes on and the loss is visible and counted.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from cdc_bridge.config import Settings
from cdc_bridge.errors import PublishError
from cdc_bridge.metrics import BridgeMetrics
from cdc_bridge.router import OutgoingMessage, dead_letter_marker
from cdc_bridge.sink import BATCH_HEADER_BYTES

__all__ = ["PayloadLimit"]

#: More than the headers of any message the bridge makes can take (see ``fit``).
_HEADERS_AT_MOST = 4096

log = logging.getLogger(__name__)


class PayloadLimit:
    """Checks each message against the connected server's ``max_payload``."""

    def __init__(
        self,
        sink: Any,
        metrics: BridgeMetrics,
        *,
        atomic: bool,
        dead_letter_subject: str | None,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        # Room the batch headers need, when messages go out in atomic batches.
        self.margin = BATCH_HEADER_BYTES if atomic else 0
        self.dead_letter_subject = dead_letter_subject
        # A body this small fits whatever its headers: ours are a few hundred bytes at
        # most (names of 63 bytes, LSNs, ids), far below _HEADERS_AT_MOST. Only a larger
        # one is measured, on the hot path.
        self.small_body = sink.max_payload - self.margin - _HEADERS_AT_MOST

    @classmethod
    def from_settings(
        cls, settings: Settings, sink: Any, metrics: BridgeMetrics, *, atomic: bool
    ) -> PayloadLimit:
        nats = settings.nats
        return cls(
            sink,
            metrics,
            atomic=atomic,
            dead_letter_subject=(
                nats.dead_letter_subject if nats.oversized == "dead-letter" else None
            ),
        )

    def fit(self, outgoing: OutgoingMessage, table: str | None, key: object) -> OutgoingMessage:
        """``outgoing``, or its dead-letter marker; :class:`PublishError` under ``fail``."""
        if len(outgoing.body) <= self.small_body:
            return outgoing
        sink = self.sink
        size = sink.message_size(outgoing.subject, outgoing.body, outgoing.headers)
        size += self.margin
        if size <= sink.max_payload:
            return outgoing
        what = f"{outgoing.headers.get('Cdc-Op', 'message')} of {table or 'a message'}"
        where = f"key {orjson.dumps(key, default=str).decode()} " if key is not None else ""
        if self.dead_letter_subject is None:
            self.metrics.publish_failed("too_large")
            raise PublishError(
                f"the {what} {where}at commit {outgoing.headers.get('Cdc-Commit-Lsn')} is "
                f"{size} bytes, over the NATS server's max_payload of {sink.max_payload}: "
                "raise max_payload in nats-server, or set nats.oversized: dead-letter",
                subject=outgoing.subject,
            )
        log.warning(
            "the %s %sis %d bytes, over max_payload %d: publishing a marker to %s instead",
            what,
            where,
            size,
            sink.max_payload,
            self.dead_letter_subject,
            extra={"table": table},
        )
        self.metrics.dead_letters += 1
        return dead_letter_marker(
            outgoing,
            subject=self.dead_letter_subject,
            size=size,
            max_payload=sink.max_payload,
            table=table,
            key=key,
        )
