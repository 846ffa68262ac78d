"""The pgoutput layer: replication frames and logical decoding messages, bytes in, values out.

Everything in this package is pure (no psycopg, no nats, no asyncio) so that the wire
formats can be tested against captured server bytes and fuzzed without any server.
The replication reader feeds it CopyData payloads; the rest of the bridge only ever
sees the typed messages.
"""

from cdc_bridge.pgoutput.decoder import decode_message
from cdc_bridge.pgoutput.frames import (
    PrimaryKeepalive,
    XLogData,
    encode_standby_status,
    parse_copy_frame,
    pg_now_micros,
)
from cdc_bridge.pgoutput.messages import (
    PG_EPOCH,
    PG_EPOCH_UNIX_MICROS,
    UNCHANGED_TOAST,
    Begin,
    Column,
    ColumnValue,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    UnchangedToast,
    Update,
    pg_timestamp_to_datetime,
    pg_timestamp_to_iso,
)

__all__ = [
    "PG_EPOCH",
    "PG_EPOCH_UNIX_MICROS",
    "UNCHANGED_TOAST",
    "Begin",
    "Column",
    "ColumnValue",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Origin",
    "PgOutputMessage",
    "PrimaryKeepalive",
    "Relation",
    "StreamAbort",
    "StreamCommit",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleData",
    "Type",
    "UnchangedToast",
    "Update",
    "XLogData",
    "decode_message",
    "encode_standby_status",
    "parse_copy_frame",
    "pg_now_micros",
    "pg_timestamp_to_datetime",
    "pg_timestamp_to_iso",
]
