"""Router: event → (subject, headers, body), ready for the sink. Pure.

Subjects come from the per-table templates (``{schema}``, ``{table}`` and ``{op}`` bound
once per table, column placeholders filled per row). Every message carries:

- ``Nats-Msg-Id: <slot>:<commit_lsn>:<index>`` — deterministic, so a resend after a
  crash is a duplicate that JetStream drops inside its duplicate window;
- ``Cdc-Op``, ``Cdc-Table``, ``Cdc-Commit-Lsn``, ``Cdc-Index``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson

from cdc_bridge.changes import Change, MessageEvent, SchemaChange, TableInfo
from cdc_bridge.envelope import (
    encode_change,
    encode_message,
    encode_schema_change,
    transaction_strings,
)
from cdc_bridge.lsn import format_lsn
from cdc_bridge.routing import SubjectTemplate

__all__ = ["OutgoingMessage", "Router", "dead_letter_marker"]

_OPS = ("insert", "update", "delete", "truncate", "read")


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    subject: str
    headers: dict[str, str]
    body: bytes


class Router:
    """Routes the changes of the configured tables; other tables are not routed (None)."""

    def __init__(
        self,
        *,
        slot: str,
        table_subjects: Mapping[str, str],
        message_subject: str | None,
        message_prefixes: frozenset[str] | None = None,
        schema_subject: str | None = None,
        encoder: Callable[[Change, str], bytes] = encode_change,
    ) -> None:
        self._slot = slot
        self._encode = encoder  # the body of a row change: envelope.format
        self._templates = {name: SubjectTemplate(t) for name, t in table_subjects.items()}
        self._bound: dict[tuple[int, str], SubjectTemplate | None] = {}
        self._message_template = SubjectTemplate(message_subject) if message_subject else None
        self._message_prefixes = message_prefixes  # None: every prefix
        self._schema_template = SubjectTemplate(schema_subject) if schema_subject else None

    def forget_table(self, oid: int) -> None:
        """Drop bound templates of a relation whose shape or name changed."""
        for op in _OPS:
            self._bound.pop((oid, op), None)

    def _template_for(self, table: TableInfo, op: str) -> SubjectTemplate | None:
        cache_key = (table.oid, op)
        try:
            return self._bound[cache_key]
        except KeyError:
            pass
        template = self._templates.get(table.config_name or table.qualified_name)
        bound = (
            None
            if template is None
            else template.partial({"schema": table.schema, "table": table.table, "op": op})
        )
        self._bound[cache_key] = bound
        return bound

    def route_change(self, change: Change) -> OutgoingMessage | None:
        table = change.table
        template = self._template_for(table, change.op)
        if template is None:
            return None
        values = change.after if change.after is not None else change.before
        if values is None:
            values = {}
        elif change.before is not None and not template.placeholders <= values.keys():
            # An update whose routing column is an unchanged TOAST value: use the old row.
            values = {**change.before, **values}
        subject = template.render(values)
        commit_lsn = transaction_strings(change.commit_lsn, change.commit_ts)[0]
        index = str(change.index)
        headers = {
            "Nats-Msg-Id": f"{self._slot}:{commit_lsn}:{index}",
            "Cdc-Op": change.op,
            "Cdc-Table": table.qualified_name,
            "Cdc-Commit-Lsn": commit_lsn,
            "Cdc-Index": index,
        }
        return OutgoingMessage(subject, headers, self._encode(change, self._slot))

    def route_read(self, change: Change, msg_id: str) -> OutgoingMessage | None:
        """A snapshot row (op "read"): its id is not a WAL position, so the read-back
        passes over it; ``Cdc-Snapshot`` names the table."""
        table = change.table
        template = self._template_for(table, change.op)
        if template is None:
            return None
        subject = template.render(change.after or {})
        headers = {
            "Nats-Msg-Id": msg_id,
            "Cdc-Op": "read",
            "Cdc-Table": table.qualified_name,
            "Cdc-Snapshot": table.qualified_name,
            "Cdc-Commit-Lsn": format_lsn(change.commit_lsn),
        }
        return OutgoingMessage(subject, headers, self._encode(change, self._slot))

    def route_schema_change(self, event: SchemaChange) -> OutgoingMessage | None:
        """The schema-change event of a configured table, if they are published."""
        table = event.after
        if self._schema_template is None or (
            (table.config_name or table.qualified_name) not in self._templates
        ):
            return None
        commit_lsn = transaction_strings(event.commit_lsn, event.commit_ts)[0]
        headers = {
            # Not a change position (no index): the read-back passes over it, and a
            # re-send inside the duplicate window is dropped by this id.
            "Nats-Msg-Id": f"{self._slot}:{commit_lsn}:schema-{table.oid}-{event.number}",
            "Cdc-Op": "schema",
            "Cdc-Table": table.qualified_name,
            "Cdc-Commit-Lsn": commit_lsn,
        }
        subject = self._schema_template.render({"schema": table.schema, "table": table.table})
        return OutgoingMessage(subject, headers, encode_schema_change(event, self._slot))

    def route_message(self, message: MessageEvent) -> OutgoingMessage | None:
        if self._message_template is None:
            return None
        if self._message_prefixes is not None and message.prefix not in self._message_prefixes:
            return None
        commit_lsn = format_lsn(message.commit_lsn)
        index = str(message.index)
        # A non-transactional message's own LSN can equal the commit LSN of the
        # transaction around it: a distinct suffix keeps the two ids apart.
        position = index if message.transactional else "m"
        headers = {
            "Nats-Msg-Id": f"{self._slot}:{commit_lsn}:{position}",
            "Cdc-Op": "message",
            "Cdc-Commit-Lsn": commit_lsn,
            "Cdc-Index": index,
        }
        subject = self._message_template.render({"prefix": message.prefix})
        return OutgoingMessage(subject, headers, encode_message(message, self._slot))


def dead_letter_marker(
    original: OutgoingMessage,
    *,
    subject: str,
    size: int,
    max_payload: int,
    table: str | None,
    key: object,
) -> OutgoingMessage:
    """A small stand-in for a message too large for NATS (``nats.oversized: dead-letter``).

    It keeps the original's ``Nats-Msg-Id`` and position headers, so de-duplication and
    the read-back treat it exactly like the message it replaces.
    """
    headers = {**original.headers, "Cdc-Dead-Letter": "oversized"}
    body = {
        "reason": "oversized",
        "subject": original.subject,
        "size": size,
        "max_payload": max_payload,
        "table": table,
        "op": original.headers.get("Cdc-Op"),
        "key": key,
        "commit_lsn": original.headers.get("Cdc-Commit-Lsn"),
        "index": original.headers.get("Cdc-Index"),
        "msg_id": original.headers.get("Nats-Msg-Id"),
    }
    return OutgoingMessage(subject, headers, orjson.dumps(body, default=str))
