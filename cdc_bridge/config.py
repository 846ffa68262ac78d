"""Configuration: one YAML file, overridable key by key from the environment.

Sources, highest priority first:

1. environment variables ``CDC_BRIDGE_<SECTION>__<KEY>`` (e.g. ``CDC_BRIDGE_POSTGRES__DSN``),
2. secret files in ``CDC_BRIDGE_SECRETS_DIR``, one file per key, named like the key path
   (``postgres__dsn``, ``postgres__password``),
3. the YAML file given by ``--config`` or ``CDC_BRIDGE_CONFIG``,
4. the defaults below (``config/example.yaml`` lists every key with its default).

Every model forbids unknown keys, nested ones too, so a typo is an error rather than a
silently ignored setting. Errors are turned into one line naming the key and the fix.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from cdc_bridge.errors import ConfigError, SetupError
from cdc_bridge.routing import SubjectTemplate, subject_is_covered

__all__ = [
    "ENV_PREFIX",
    "HEARTBEAT_SUBJECT",
    "HashMask",
    "HashSalt",
    "HeartbeatSettings",
    "LogicalMessageSettings",
    "MaskRule",
    "MetricsSettings",
    "NatsSettings",
    "PostgresSettings",
    "Settings",
    "SnapshotSettings",
    "TableSettings",
    "TruncateMask",
    "load_settings",
]

ENV_PREFIX = "CDC_BRIDGE_"
CONFIG_ENV = "CDC_BRIDGE_CONFIG"
SECRETS_DIR_ENV = "CDC_BRIDGE_SECRETS_DIR"

# Variables with our prefix that are not settings keys; any other CDC_BRIDGE_* variable
# whose section is unknown is reported as a typo.
_NON_SETTING_ENV = re.compile(
    r"^CDC_BRIDGE_(CONFIG|SECRETS_DIR|TEST_.*|PG_BIN|BENCH_.*"
    # Kubernetes injects these for a Service named cdc-bridge ("service links").
    r"|PORT(_\d+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?)?|SERVICE_HOST|SERVICE_PORT(_.+)?)$",
    re.I,
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


def _dsn_params(dsn: str) -> dict[str, str]:
    """The DSN's parameters; ValueError if it is not a valid connection string."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except ProgrammingError:
        raise ValueError("postgres.dsn is not a valid connection string") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PostgresSettings(_Section):
    """Where to read changes from."""

    dsn: SecretStr = Field(
        description="libpq connection string or URI of the database that holds the tables"
    )
    password: SecretStr | None = Field(
        default=None, description="password, if not in the DSN (handy as a secret file)"
    )
    slot: str = Field(default="cdc_bridge", description="logical replication slot name")
    publication: str = Field(default="cdc_bridge", description="publication name")
    create_if_missing: bool = Field(
        default=True,
        description="create the publication and the slot at start if they do not exist",
    )
    recreate_slot: bool = Field(
        default=False,
        description="create a new slot even though the stream holds changes of a dropped one",
    )
    status_interval: float = Field(
        default=10.0, gt=0, description="seconds between standby status updates"
    )
    connect_timeout: float = Field(
        default=10.0, gt=0, description="seconds to wait for a connection (rounded up)"
    )
    receive_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds without a frame from PostgreSQL before the stream counts as lost",
    )
    sslmode: SslMode | None = Field(
        default=None, description="libpq sslmode, applied on top of the DSN; null: the DSN's"
    )
    sslrootcert: Path | None = Field(
        default=None, description="CA file that signed the server's certificate ('system' ok)"
    )
    sslcert: Path | None = Field(default=None, description="client certificate file")
    sslkey: Path | None = Field(default=None, description="client certificate's key file")
    iam_auth: bool = Field(
        default=False, description="log in with a fresh AWS RDS IAM token at every connect"
    )
    aws_region: str | None = Field(
        default=None, description="region for iam_auth; default: from an RDS DSN host name"
    )

    @field_validator("sslrootcert", "sslcert", "sslkey")
    @classmethod
    def _existing_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None or (info.field_name == "sslrootcert" and str(value) == "system"):
            return value
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _security(self) -> PostgresSettings:
        if self.receive_timeout <= self.status_interval:
            raise ValueError(
                "postgres.receive_timeout must be longer than postgres.status_interval (a quiet "
                "stream hears from PostgreSQL once per status_interval)"
            )
        if (self.sslcert is None) != (self.sslkey is None):
            raise ValueError("set both postgres.sslcert and postgres.sslkey, or neither")
        if self.iam_auth:
            self.iam_target()  # raises ValueError naming what is missing
        return self

    def effective_sslmode(self) -> str | None:
        """``sslmode``, or the DSN's if it sets one."""
        if self.sslmode is not None:
            return self.sslmode
        return _dsn_params(self.dsn.get_secret_value()).get("sslmode")

    def iam_target(self) -> tuple[str, int, str, str]:
        """(host, port, user, region) of the IAM token; ValueError if one is unknown."""
        from cdc_bridge.pgsecurity import rds_region_from_host

        if importlib.util.find_spec("boto3") is None:
            raise ValueError("iam_auth needs boto3: pip install 'cdc-bridge[aws]'")
        if self.effective_sslmode() not in ("require", "verify-ca", "verify-full"):
            raise ValueError(
                "iam_auth needs postgres.sslmode require, verify-ca or verify-full "
                "(RDS refuses IAM auth without TLS; verify-full with the RDS CA bundle is best)"
            )
        if self.password is not None:
            raise ValueError("iam_auth and postgres.password exclude each other")
        params = _dsn_params(self.dsn.get_secret_value())
        host, user = params.get("host", ""), params.get("user", "")
        if not host or "," in host or host.startswith("/"):
            raise ValueError("iam_auth needs one TCP host name in postgres.dsn")
        if not user:
            raise ValueError("iam_auth needs the user name in postgres.dsn")
        try:
            port = int(params.get("port") or 5432)
        except ValueError:
            raise ValueError("iam_auth needs one port number in postgres.dsn") from None
        region = self.aws_region or rds_region_from_host(host)
        if not region:
            raise ValueError(
                f"iam_auth: set postgres.aws_region ({host!r} is not an RDS host name)"
            )
        return host, port, user, region

    @field_validator("slot")
    @classmethod
    def _slot_name(cls, value: str) -> str:
        # PostgreSQL's own rule for slot names (ReplicationSlotValidateName).
        if not re.fullmatch(r"[a-z0-9_]{1,63}", value):
            raise ValueError(
                "slot names may contain only lower case letters, digits and '_' (max 63)"
            )
        return value

    @field_validator("publication")
    @classmethod
    def _publication_name(cls, value: str) -> str:
        if not _IDENTIFIER.fullmatch(value) or len(value) > 63:
            raise ValueError("use a plain SQL identifier (letters, digits, '_', max 63)")
        return value


class NatsSettings(_Section):
    """Where to publish changes to."""

    url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server URL(s), comma separated"
    )
    stream: str = Field(default="cdc-bridge", description="JetStream stream name")
    create_stream: bool = Field(default=True, description="create the stream if it does not exist")
    subjects: list[str] | None = Field(
        default=None,
        description="stream subjects when creating it; default: derived from the table subjects",
    )
    storage: Literal["file", "memory"] = Field(
        default="file", description="stream storage when creating it"
    )
    replicas: int = Field(default=1, ge=1, le=5, description="stream replicas when creating it")
    max_age: float = Field(default=0, ge=0, description="seconds; 0 keeps messages forever")
    max_bytes: int = Field(default=-1, ge=-1, description="-1 is unlimited")
    duplicate_window: float = Field(
        default=120.0, gt=0, description="seconds JetStream remembers Nats-Msg-Id for dedup"
    )
    max_in_flight: int = Field(
        default=2048, ge=1, description="published messages awaiting their PubAck at most"
    )
    max_in_flight_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="bytes of published messages awaiting their PubAck at most",
    )
    ack_timeout: float = Field(default=30.0, gt=0, description="seconds to wait for one PubAck")
    atomic_batches: bool = Field(
        default=True,
        description="publish each transaction as one atomic batch when server and stream allow",
    )
    atomic_batch_size: int = Field(
        default=1000,
        ge=2,
        le=100_000,
        description="messages per atomic batch at most (the server's limit; 1000 by default)",
    )
    oversized: Literal["fail", "dead-letter"] = Field(
        default="fail",
        description="a message over max_payload: stop with an error, or publish a marker",
    )
    dead_letter_subject: str = Field(
        default="cdc.dead_letter",
        description="where oversized: dead-letter publishes its markers",
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="seconds to wait for NATS")
    # Security: at most one way to authenticate (user+password, token, creds file, nkey).
    user: str | None = Field(default=None, description="user name (with password)")
    password: SecretStr | None = Field(default=None, description="password of nats.user")
    token: SecretStr | None = Field(default=None, description="authentication token")
    creds_file: Path | None = Field(
        default=None, description="user credentials file (.creds: JWT and NKey seed)"
    )
    nkey_seed_file: Path | None = Field(default=None, description="file holding a user NKey seed")
    tls_ca_file: Path | None = Field(
        default=None, description="CA certificate(s) to verify the server with (PEM)"
    )
    tls_cert_file: Path | None = Field(
        default=None, description="client certificate for mutual TLS (PEM)"
    )
    tls_key_file: Path | None = Field(default=None, description="key of nats.tls_cert_file (PEM)")
    tls_handshake_first: bool = Field(
        default=False,
        description="start TLS before the server's INFO (the server's tls handshake_first)",
    )

    @field_validator("creds_file", "nkey_seed_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = value.expanduser()
        if not path.is_file():
            raise ValueError(f"no such file: {str(path)!r}")
        if not os.access(path, os.R_OK):
            raise ValueError(f"file {str(path)!r} is not readable by this user")
        return path

    @model_validator(mode="after")
    def _security(self) -> NatsSettings:
        if (self.user is None) != (self.password is None):
            given, missing = ("user", "password") if self.password is None else ("password", "user")
            raise ValueError(f"nats.{given} is set but nats.{missing} is not: set both or neither")
        methods = [
            name
            for name, value in (
                ("user/password", self.user),
                ("token", self.token),
                ("creds_file", self.creds_file),
                ("nkey_seed_file", self.nkey_seed_file),
            )
            if value is not None
        ]
        if len(methods) > 1:
            raise ValueError(
                f"nats.{' and nats.'.join(methods)} are set together: choose one way to "
                "authenticate"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "nats.tls_cert_file and nats.tls_key_file go together: set both for mutual "
                "TLS, or neither"
            )
        return self

    @field_validator("stream")
    @classmethod
    def _stream_name(cls, value: str) -> str:
        if not value or any(c in value for c in " \t.*>/\\"):
            raise ValueError("a stream name may not be empty or contain spaces, '.', '*', '>', '/'")
        return value

    @field_validator("dead_letter_subject")
    @classmethod
    def _dead_letter_subject(cls, value: str) -> str:
        if SubjectTemplate(value).placeholders:  # also raises ValueError on a bad subject
            raise ValueError("use a plain subject here, without {placeholders}")
        return value

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one subject, or leave the key out")
        return value


#: Shortest hash salt accepted: a short one could be guessed, and with it every value.
MIN_SALT_LENGTH = 16

_OPS: tuple[Literal["insert", "update", "delete", "truncate"], ...] = (
    "insert",
    "update",
    "delete",
    "truncate",
)


class HashSalt(_Section):
    """Where the secret salt of a ``hash`` mask comes from: never the YAML itself."""

    salt_env: str | None = Field(default=None, description="environment variable holding it")
    salt_file: Path | None = Field(default=None, description="file holding it (a mounted secret)")

    @model_validator(mode="after")
    def _one_source(self) -> HashSalt:
        if (self.salt_env is None) == (self.salt_file is None):
            raise ValueError("give the salt as exactly one of salt_env or salt_file")
        if self.salt_env is not None and self.salt_env.upper().startswith(ENV_PREFIX):
            raise ValueError(
                f"salt_env {self.salt_env!r}: names starting with {ENV_PREFIX} are reserved "
                "for settings; use another name (e.g. CDC_MASK_SALT)"
            )
        self.salt()  # the secret must be there now, not at the first change
        return self

    def salt(self) -> SecretStr:
        """The salt; ValueError naming the variable or file if it is missing or too short."""
        if self.salt_env is not None:
            value = os.environ.get(self.salt_env)
            where = f"environment variable {self.salt_env}"
            if value is None:
                raise ValueError(f"{where} is not set")
        else:
            assert self.salt_file is not None
            where = f"salt_file {str(self.salt_file)!r}"
            try:
                value = self.salt_file.expanduser().read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"cannot read {where}: {getattr(exc, 'strerror', None) or exc}"
                ) from None
        if len(value) < MIN_SALT_LENGTH:
            raise ValueError(
                f"the salt in {where} is {len(value)} characters; use at least "
                f"{MIN_SALT_LENGTH} random ones (e.g. openssl rand -hex 32)"
            )
        return SecretStr(value)


class HashMask(_Section):
    """``{hash: {salt_env: VAR}}``: hex HMAC-SHA256 of the value under a secret salt."""

    hash: HashSalt


class TruncateMask(_Section):
    """``{truncate: N}``: the first N characters of the value."""

    truncate: int = Field(ge=1)


MaskRule = Literal["redact"] | HashMask | TruncateMask


def _mask_rule(value: object) -> object:
    """A mask rule as its model, with a one-line error for a wrong one.

    Parsed here rather than by pydantic's union, whose error would list every branch.
    """
    if isinstance(value, HashMask | TruncateMask) or value == "redact":
        return value
    usage = "use redact, {hash: {salt_env: VAR}} or {truncate: N}"
    if isinstance(value, str):
        raise ValueError(f"unknown mask {value!r}: {usage}")
    if not isinstance(value, dict) or len(value) != 1 or not {"hash", "truncate"} >= value.keys():
        raise ValueError(f"mask {value!r}: {usage}")
    model = HashMask if "hash" in value else TruncateMask
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise ValueError(f"{where}: {message}" if where else message) from None


class TableSettings(_Section):
    """How one table's changes are routed, and which of them (and which columns) leave."""

    subject: str = Field(
        default="cdc.{schema}.{table}.{op}",
        description="subject template; placeholders: {schema} {table} {op} and column names",
    )
    key: list[str] | None = Field(default=None, description="key columns; default: the primary key")
    columns: list[str] | None = Field(
        default=None, description="publish only these columns; null: all (key columns always)"
    )
    exclude_columns: list[str] = Field(
        default_factory=list, description="columns that never leave the bridge"
    )
    mask: dict[str, MaskRule] = Field(
        default_factory=dict,
        description="column → redact | {hash: {salt_env|salt_file}} | {truncate: N}",
    )
    where: str | None = Field(
        default=None,
        description="row filter: a publication WHERE expression (PostgreSQL 15 or newer)",
    )
    ops: list[Literal["insert", "update", "delete", "truncate"]] = Field(
        default_factory=lambda: list(_OPS), description="the kinds of change to publish"
    )

    @field_validator("subject")
    @classmethod
    def _template(cls, value: str) -> str:
        SubjectTemplate(value)  # raises ValueError with the reason
        return value

    @field_validator("mask", mode="before")
    @classmethod
    def _mask_shapes(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        rules = {}
        for column, rule in value.items():
            try:
                rules[column] = _mask_rule(rule)
            except ValueError as exc:
                raise ValueError(f"column {column!r}: {exc}") from None
        return rules

    @field_validator("columns", "exclude_columns", "ops")
    @classmethod
    def _no_duplicates(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        if info.field_name in ("columns", "ops") and not value:
            raise ValueError("give at least one, or leave the key out")
        twice = sorted({item for item in value if value.count(item) > 1})
        if twice:
            raise ValueError(f"{twice[0]!r} is listed twice")
        return value

    @field_validator("where")
    @classmethod
    def _where(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the row filter is empty: leave the key out to publish every row")
        return value

    @model_validator(mode="after")
    def _columns_agree(self) -> TableSettings:
        published = set(self.columns) if self.columns is not None else None
        excluded = set(self.exclude_columns)
        for column in self.mask:
            if column in excluded or (published is not None and column not in published):
                raise ValueError(f"mask names column {column!r}, which is not published")
        placeholders = SubjectTemplate(self.subject).placeholders - {"schema", "table", "op"}
        for what, names in (("key", self.key or []), ("subject", sorted(placeholders))):
            for column in names:
                if column in excluded or (published is not None and column not in published):
                    raise ValueError(
                        f"{what} column {column!r} is not published (key and subject columns "
                        "always leave the bridge; mask it with hash instead)"
                    )
                rule = self.mask.get(column)
                if what == "key" and rule is not None and not isinstance(rule, HashMask):
                    raise ValueError(
                        f"key column {column!r} may only be masked with hash (redact or "
                        "truncate would make different rows share a key)"
                    )
                if what == "subject" and rule == "redact":
                    raise ValueError(
                        f"subject column {column!r} is redacted: every change would go to one "
                        "subject (use hash, or route by another column)"
                    )
        return self


class LogicalMessageSettings(_Section):
    """Logical decoding messages (``pg_logical_emit_message``)."""

    publish: bool = Field(default=False, description="publish logical decoding messages")
    subject: str = Field(
        default="cdc.message.{prefix}", description="subject template; placeholder: {prefix}"
    )
    prefixes: list[str] | None = Field(
        default=None, description="publish only messages with these prefixes; null: all"
    )

    @field_validator("subject")
    @classmethod
    def _template(cls, value: str) -> str:
        template = SubjectTemplate(value)
        unknown = template.placeholders - {"prefix"}
        if unknown:
            raise ValueError(f"only {{prefix}} may be used here, not {sorted(unknown)}")
        return value


class MetricsSettings(_Section):
    """The HTTP port for Prometheus metrics and the health probes."""

    enabled: bool = Field(default=True, description="serve /metrics, /livez and /readyz over HTTP")
    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=9187, ge=0, le=65535, description="port; 0 picks a free one")
    ready_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds without progress (a frame from PostgreSQL, a PubAck) after "
        "which /readyz fails",
    )


class SchemaChangeSettings(_Section):
    """Events published when a table's shape changes while streaming."""

    publish: bool = Field(
        default=False, description="publish an event when a table's columns or key change"
    )
    subject: str = Field(
        default="cdc.schema.{schema}.{table}",
        description="subject template; placeholders: {schema} {table}",
    )

    @field_validator("subject")
    @classmethod
    def _template(cls, value: str) -> str:
        unknown = SubjectTemplate(value).placeholders - {"schema", "table"}
        if unknown:
            raise ValueError(
                f"only {{schema}} and {{table}} may be used here, not {sorted(unknown)}"
            )
        return value


class SnapshotSettings(_Section):
    """The initial snapshot of the tables' existing rows (README "Snapshots and backfills")."""

    mode: Literal["initial", "never", "initial_only"] = Field(
        default="initial",
        description="initial: snapshot when the bridge creates the slot; never; "
        "initial_only: snapshot, then exit without a slot",
    )
    chunk_size: int = Field(
        default=10000,
        ge=1,
        le=1_000_000,
        description="rows per keyset page (memory holds one page); progress is kept per page",
    )
    max_rows_per_second: float = Field(
        default=0.0,
        ge=0,
        description="pace of snapshots and backfills, so that they leave the database and "
        "the stream room; 0: as fast as they go",
    )


#: Where heartbeat messages go when ``heartbeat.publish`` is true.
HEARTBEAT_SUBJECT = "cdc.heartbeat"


class HeartbeatSettings(_Section):
    """Periodic ``pg_logical_emit_message`` so the slot advances on a quiet database."""

    interval: float = Field(default=30.0, ge=0, description="seconds between beats; 0 disables")
    publish: bool = Field(
        default=False, description=f"publish heartbeat messages to {HEARTBEAT_SUBJECT}"
    )
    prefix: str = Field(
        default="cdc_bridge.heartbeat",
        min_length=1,
        description="the logical decoding message prefix of the heartbeats",
    )


class ReconnectSettings(_Section):
    """Reconnecting after a lost connection to PostgreSQL or NATS."""

    initial_delay: float = Field(
        default=0.5, gt=0, description="seconds before the first reconnect attempt"
    )
    max_delay: float = Field(
        default=30.0, gt=0, description="seconds between attempts at most (doubling, jittered)"
    )
    standby_interval: float = Field(
        default=1.0,
        gt=0,
        description="seconds between attempts to take over a slot another process streams from",
    )


_WAL2JSON_OPTIONS = (
    "include_xids",
    "include_timestamp",
    "include_lsn",
    "include_type_oids",
    "transaction_markers",
)
_DEBEZIUM_OPTIONS = ("transaction_block",)  # name: harmless, only debezium reads it


class EnvelopeSettings(_Section):
    """The JSON body of row-change messages: native, wal2json- or Debezium-compatible."""

    format: Literal["native", "wal2json", "debezium"] = Field(
        default="native",
        description="native (README), wal2json (format-version 2) or debezium (JSON, no schema)",
    )
    include_xids: bool = Field(default=False, description="wal2json: add the xid")
    include_timestamp: bool = Field(default=False, description="wal2json: add the commit time")
    include_lsn: bool = Field(default=False, description="wal2json: add the change's LSN")
    include_type_oids: bool = Field(
        default=False, description="wal2json: add each column's type OID"
    )
    transaction_markers: bool = Field(
        default=False,
        description="wal2json: publish {action: B} and {action: C} around each transaction",
    )
    markers_subject: str = Field(
        default="cdc.transactions",
        description="where the wal2json transaction markers go (a plain subject)",
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        description="debezium: source.name (Debezium's topic.prefix); default: the slot name",
    )
    transaction_block: bool = Field(
        default=False,
        description="debezium: fill the transaction block (provide.transaction.metadata)",
    )

    @field_validator("markers_subject")
    @classmethod
    def _markers_subject(cls, value: str) -> str:
        if SubjectTemplate(value).placeholders:  # also raises ValueError on a bad subject
            raise ValueError("use a plain subject here, without {placeholders}")
        return value

    @model_validator(mode="after")
    def _options_of_format(self) -> EnvelopeSettings:
        for names, owner in ((_WAL2JSON_OPTIONS, "wal2json"), (_DEBEZIUM_OPTIONS, "debezium")):
            if self.format == owner:
                continue
            for name in names:
                if getattr(self, name):
                    raise ValueError(
                        f"{name} is an option of format {owner}, not {self.format}: "
                        f"set format: {owner} or remove {name}"
                    )
        return self


class Settings(BaseSettings):
    """The whole configuration of one bridge process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    postgres: PostgresSettings
    nats: NatsSettings = NatsSettings()
    tables: dict[str, TableSettings] = Field(min_length=1)
    messages: LogicalMessageSettings = LogicalMessageSettings()
    schema_changes: SchemaChangeSettings = SchemaChangeSettings()
    metrics: MetricsSettings = MetricsSettings()
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    reconnect: ReconnectSettings = ReconnectSettings()
    envelope: EnvelopeSettings = EnvelopeSettings()
    snapshot: SnapshotSettings = SnapshotSettings()
    shutdown_timeout: float = Field(
        default=30.0, gt=0, description="seconds to wait for in-flight PubAcks when stopping"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="log verbosity"
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="json lines or text on stderr; auto: json unless stderr is a terminal",
    )

    @model_validator(mode="after")
    def _stream_subjects_cover_routes(self) -> Settings:
        if self.nats.subjects is None:
            return self
        templates = {f"tables.{n}.subject": t.subject for n, t in self.tables.items()}
        if self.messages.publish:
            templates["messages.subject"] = self.messages.subject
        if self.schema_changes.publish:
            templates["schema_changes.subject"] = self.schema_changes.subject
        if self.envelope.transaction_markers:
            templates["envelope.markers_subject"] = self.envelope.markers_subject
        if self.heartbeat.publish:
            templates["heartbeat.publish"] = HEARTBEAT_SUBJECT
        if self.nats.oversized == "dead-letter":
            templates["nats.dead_letter_subject"] = self.nats.dead_letter_subject
        for key, template in templates.items():
            wanted = SubjectTemplate(template).stream_filter
            if not subject_is_covered(wanted, self.nats.subjects):
                raise ValueError(
                    f"nats.subjects {self.nats.subjects} do not capture {key} "
                    f"{template!r} (subjects {wanted}): add {wanted!r} to nats.subjects"
                )
        return self

    @field_validator("tables")
    @classmethod
    def _table_names(cls, value: dict[str, TableSettings]) -> dict[str, TableSettings]:
        for name in value:
            parts = name.split(".")
            if len(parts) != 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
                raise ValueError(f"table {name!r} must be written as schema.table")
        return value

    def conninfo(self) -> str:
        """The PostgreSQL connection string for one connect: the DSN with the separate
        password and the TLS keys applied, and with ``iam_auth`` a fresh IAM token.

        Every connection goes through here. Raises :class:`SetupError` if no IAM token
        can be made (no AWS credentials).
        """
        from psycopg.conninfo import make_conninfo

        pg = self.postgres
        dsn = pg.dsn.get_secret_value()
        params: dict[str, str] = {}
        if pg.password is not None:
            params["password"] = pg.password.get_secret_value()
        if pg.sslmode is not None:
            params["sslmode"] = pg.sslmode
        for key in ("sslrootcert", "sslcert", "sslkey"):
            value = getattr(pg, key)
            if value is not None:
                params[key] = str(value)
        if pg.iam_auth:
            from cdc_bridge.pgsecurity import rds_auth_token

            host, port, user, region = pg.iam_target()
            try:
                params["password"] = rds_auth_token(host, port, user, region)
            except Exception as exc:
                text = " ".join(str(exc).split()) or type(exc).__name__
                raise SetupError(
                    f"cannot make an RDS IAM auth token for {user}@{host} in {region}: {text} "
                    "(check the AWS credentials: environment, IRSA or instance role)"
                ) from None
        if not params:
            return dsn
        return make_conninfo(dsn, **params)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        secrets_dir = os.environ.get(SECRETS_DIR_ENV)
        if secrets_dir:
            assert isinstance(file_secret_settings, SecretsSettingsSource)
            sources.append(
                NestedSecretsSettingsSource(
                    file_secret_settings,
                    secrets_dir=secrets_dir,
                    secrets_dir_missing="error",
                    secrets_prefix="",
                    secrets_nested_delimiter="__",
                )
            )
        sources.append(_YamlDataSource(settings_cls, _yaml_data.get() or {}))
        return tuple(sources)


_yaml_data: ContextVar[Mapping[str, Any] | None] = ContextVar("cdc_bridge_yaml_data", default=None)


class _YamlDataSource(PydanticBaseSettingsSource):
    """Hands the already-parsed YAML mapping to pydantic-settings as the lowest source."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = dict(data)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


@contextmanager
def _yaml_context(data: Mapping[str, Any]) -> Iterator[None]:
    token = _yaml_data.set(data)
    try:
        yield
    finally:
        _yaml_data.reset(token)


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc} "
            f"(pass an existing file with --config or {CONFIG_ENV})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, not {type(data).__name__}"
        )
    return data


def _check_env_sections(environ: Mapping[str, str]) -> None:
    """Report CDC_BRIDGE_* variables whose first part names no setting (a typo)."""
    known = {name.upper() for name in Settings.model_fields}
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or _NON_SETTING_ENV.match(upper):
            continue
        section = upper[len(ENV_PREFIX) :].split("__", 1)[0]
        if section not in known:
            raise ConfigError(
                f"environment variable {name}: unknown setting {section.lower()!r} "
                f"(known: {', '.join(sorted(k.lower() for k in known))})"
            )


def _format_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(
                f"{location}: unknown key (check the spelling; see config/example.yaml)"
            )
        elif error["type"] == "missing":
            problems.append(f"{location}: required key is missing")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{location}: {message}")
    # Keys and values come from the user: keep the message on one line whatever they hold.
    text = "invalid configuration: " + "; ".join(problems)
    return text.replace("\r", "\\r").replace("\n", "\\n")


def load_settings(path: str | Path | None = None) -> Settings:
    """Build :class:`Settings` from a YAML file and the environment.

    ``path`` defaults to ``$CDC_BRIDGE_CONFIG``; with neither, only the environment is used.
    Raises :class:`ConfigError` with a one-line message on any problem.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    data = _read_yaml(Path(path)) if path is not None else {}
    _check_env_sections(os.environ)
    try:
        with _yaml_context(data):
            return Settings()
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    except SettingsError as exc:
        # e.g. a missing secrets directory, or an environment value that is not valid JSON
        raise ConfigError(f"invalid configuration: {exc}") from None
