"""Tests for cdc_bridge.config: YAML + secret files + environment -> Settings, and the
one-line ConfigError messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc_bridge.config import Settings, load_settings
from cdc_bridge.errors import ConfigError

CONTRACT_YAML = """\
postgres:
  dsn: "host=db.internal dbname=app user=cdc"
  slot: conversations_slot
  publication: conversations_pub
nats:
  url: nats://nats.internal:4222
  stream: CONVERSATIONS
tables:
  public.conversations:
    subject: "messages.{conversation_uuid}"
"""

# The example from the README, verbatim.
README_YAML = """\
postgres:
  dsn: postgresql://cdc@db.example:5432/app   # CDC_BRIDGE_POSTGRES__DSN
  slot: cdc_bridge
  publication: cdc_bridge
nats:
  url: nats://127.0.0.1:4222                  # CDC_BRIDGE_NATS__URL
  stream: conversational-memory
tables:
  public.conversations:
    subject: "messages.{conversation_uuid}"
"""

MINIMAL_YAML = """\
postgres:
  dsn: "host=localhost dbname=app"
tables:
  public.conversations: {}
"""

_UNKNOWN = "unknown key (check the spelling; see config/example.yaml)"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's own CDC_BRIDGE_* variables out of these tests."""
    for name in list(os.environ):
        if name.upper().startswith("CDC_BRIDGE_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path | None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message
    assert "\r" not in message
    return message


# --------------------------------------------------------------------------- loading


def test_contract_keys(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, CONTRACT_YAML))
    assert isinstance(settings, Settings)
    assert settings.postgres.dsn.get_secret_value() == "host=db.internal dbname=app user=cdc"
    assert settings.postgres.slot == "conversations_slot"
    assert settings.postgres.publication == "conversations_pub"
    assert settings.nats.url == "nats://nats.internal:4222"
    assert settings.nats.stream == "CONVERSATIONS"
    assert list(settings.tables) == ["public.conversations"]
    assert settings.tables["public.conversations"].subject == "messages.{conversation_uuid}"
    assert settings.tables["public.conversations"].key is None
    assert settings.conninfo() == "host=db.internal dbname=app user=cdc"


def test_path_may_be_a_string(tmp_path: Path) -> None:
    settings = load_settings(str(_write(tmp_path, CONTRACT_YAML)))
    assert settings.postgres.slot == "conversations_slot"


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, MINIMAL_YAML))
    postgres = settings.postgres
    assert postgres.dsn.get_secret_value() == "host=localhost dbname=app"
    assert postgres.password is None
    assert postgres.slot == "cdc_bridge"
    assert postgres.publication == "cdc_bridge"
    assert postgres.create_if_missing is True
    assert postgres.status_interval == 10.0
    assert postgres.connect_timeout == 10.0

    nats = settings.nats
    assert nats.url == "nats://127.0.0.1:4222"
    assert nats.stream == "cdc-bridge"
    assert nats.create_stream is True
    assert nats.subjects is None
    assert nats.storage == "file"
    assert nats.replicas == 1
    assert nats.max_age == 0
    assert nats.max_bytes == -1
    assert nats.duplicate_window == 120.0
    assert nats.max_in_flight == 2048
    assert nats.ack_timeout == 30.0
    assert nats.connect_timeout == 5.0

    table = settings.tables["public.conversations"]
    assert table.subject == "cdc.{schema}.{table}.{op}"
    assert table.key is None

    assert settings.messages.publish is False
    assert settings.messages.subject == "cdc.message.{prefix}"
    assert settings.shutdown_timeout == 30.0
    assert settings.log_level == "INFO"
    assert settings.conninfo() == "host=localhost dbname=app"


def test_table_key_and_message_settings(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        MINIMAL_YAML
        + """\
  audit.events:
    subject: "audit.{tenant}.{op}"
    key: [tenant, id]
messages:
  publish: true
  subject: "app.msg.{prefix}"
nats:
  subjects: ["audit.>", "cdc.>", "app.msg.*"]
  storage: memory
log_level: DEBUG
""",
    )
    settings = load_settings(path)
    assert list(settings.tables) == ["public.conversations", "audit.events"]
    assert settings.tables["audit.events"].subject == "audit.{tenant}.{op}"
    assert settings.tables["audit.events"].key == ["tenant", "id"]
    assert settings.messages.publish is True
    assert settings.messages.subject == "app.msg.{prefix}"
    assert settings.nats.subjects == ["audit.>", "cdc.>", "app.msg.*"]
    assert settings.nats.storage == "memory"
    assert settings.log_level == "DEBUG"


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_BRIDGE_CONFIG", str(_write(tmp_path, CONTRACT_YAML)))
    assert load_settings().postgres.slot == "conversations_slot"


def test_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_BRIDGE_POSTGRES__DSN", "host=envhost")
    monkeypatch.setenv("CDC_BRIDGE_TABLES", '{"public.orders": {"subject": "orders.{id}"}}')
    settings = load_settings()
    assert settings.postgres.dsn.get_secret_value() == "host=envhost"
    assert list(settings.tables) == ["public.orders"]
    assert settings.tables["public.orders"].subject == "orders.{id}"


def test_nothing_at_all() -> None:
    assert _error(None) == (
        "invalid configuration: postgres: required key is missing; tables: required key is missing"
    )


# --------------------------------------------------------------------------- environment


def test_environment_beats_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_BRIDGE_POSTGRES__DSN", "host=envhost dbname=other")
    monkeypatch.setenv("CDC_BRIDGE_NATS__URL", "nats://env:4222")
    settings = load_settings(_write(tmp_path, CONTRACT_YAML))
    assert settings.postgres.dsn.get_secret_value() == "host=envhost dbname=other"
    assert settings.nats.url == "nats://env:4222"
    # The rest of each section still comes from the YAML file.
    assert settings.postgres.slot == "conversations_slot"
    assert settings.postgres.publication == "conversations_pub"
    assert settings.nats.stream == "CONVERSATIONS"
    assert settings.conninfo() == "host=envhost dbname=other"


def test_environment_values_are_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_BRIDGE_NATS__REPLICAS", "3")
    monkeypatch.setenv("CDC_BRIDGE_NATS__CREATE_STREAM", "false")
    monkeypatch.setenv("CDC_BRIDGE_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("CDC_BRIDGE_SHUTDOWN_TIMEOUT", "2.5")
    settings = load_settings(_write(tmp_path, MINIMAL_YAML))
    assert settings.nats.replicas == 3
    assert settings.nats.create_stream is False
    assert settings.log_level == "WARNING"
    assert settings.shutdown_timeout == 2.5


def test_environment_names_are_case_insensitive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("cdc_bridge_postgres__dsn", "host=lower")
    assert load_settings(_write(tmp_path, MINIMAL_YAML)).conninfo() == "host=lower"


def test_environment_typo_in_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_BRIDGE_POSTGRE__DSN", "host=x")
    assert _error(_write(tmp_path, MINIMAL_YAML)) == (
        "environment variable CDC_BRIDGE_POSTGRE__DSN: unknown setting 'postgre' "
        f"(known: {', '.join(sorted(Settings.model_fields))})"
    )
    assert "log_format" in Settings.model_fields


def test_environment_typo_in_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_BRIDGE_POSTGRES__SLOTT", "x")
    assert _error(_write(tmp_path, MINIMAL_YAML)) == (
        f"invalid configuration: postgres.slott: {_UNKNOWN}"
    )


def test_environment_invalid_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_BRIDGE_NATS__MAX_IN_FLIGHT", "many")
    assert _error(_write(tmp_path, MINIMAL_YAML)) == (
        "invalid configuration: nats.max_in_flight: "
        "Input should be a valid integer, unable to parse string as an integer"
    )


def test_environment_invalid_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_BRIDGE_TABLES", "not json")
    assert _error(_write(tmp_path, MINIMAL_YAML)) == (
        'invalid configuration: error parsing value for field "tables" '
        'from source "EnvSettingsSource"'
    )


@pytest.mark.parametrize(
    "name",
    [
        "CDC_BRIDGE_TEST_ANYTHING",
        "CDC_BRIDGE_PG_BIN",
        "CDC_BRIDGE_BENCH_ROWS",
        # Kubernetes service links for a Service named cdc-bridge:
        "CDC_BRIDGE_PORT",
        "CDC_BRIDGE_PORT_9187_TCP",
        "CDC_BRIDGE_PORT_9187_TCP_ADDR",
        "CDC_BRIDGE_PORT_9187_TCP_PORT",
        "CDC_BRIDGE_PORT_9187_TCP_PROTO",
        "CDC_BRIDGE_SERVICE_HOST",
        "CDC_BRIDGE_SERVICE_PORT",
        "CDC_BRIDGE_SERVICE_PORT_METRICS",
    ],
)
def test_non_setting_variables_are_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "1")
    assert load_settings(_write(tmp_path, MINIMAL_YAML)).postgres.slot == "cdc_bridge"


# --------------------------------------------------------------------------- secret files


def test_secret_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "postgres__password").write_text("s3 cr'et\n", encoding="utf-8")
    monkeypatch.setenv("CDC_BRIDGE_SECRETS_DIR", str(secrets))
    settings = load_settings(_write(tmp_path, CONTRACT_YAML))
    assert settings.postgres.password is not None
    assert settings.postgres.password.get_secret_value() == "s3 cr'et"
    assert conninfo_to_dict(settings.conninfo()) == {
        "host": "db.internal",
        "dbname": "app",
        "user": "cdc",
        "password": "s3 cr'et",
    }


def test_readme_example_with_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "postgres__password").write_text("pw", encoding="utf-8")
    monkeypatch.setenv("CDC_BRIDGE_SECRETS_DIR", str(secrets))
    settings = load_settings(_write(tmp_path, README_YAML))
    assert settings.postgres.dsn.get_secret_value() == "postgresql://cdc@db.example:5432/app"
    assert settings.postgres.slot == "cdc_bridge"
    assert settings.postgres.publication == "cdc_bridge"
    assert settings.nats.url == "nats://127.0.0.1:4222"
    assert settings.nats.stream == "conversational-memory"
    assert settings.tables["public.conversations"].subject == "messages.{conversation_uuid}"
    assert conninfo_to_dict(settings.conninfo()) == {
        "user": "cdc",
        "host": "db.example",
        "port": "5432",
        "dbname": "app",
        "password": "pw",
    }


def test_secret_dsn_file_beats_yaml_and_loses_to_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "postgres__dsn").write_text("host=secrethost dbname=s\n", encoding="utf-8")
    (secrets / "postgres__password").write_text("pw", encoding="utf-8")
    monkeypatch.setenv("CDC_BRIDGE_SECRETS_DIR", str(secrets))
    path = _write(tmp_path, CONTRACT_YAML)

    settings = load_settings(path)
    assert settings.postgres.dsn.get_secret_value() == "host=secrethost dbname=s"
    assert settings.postgres.slot == "conversations_slot"
    assert conninfo_to_dict(settings.conninfo()) == {
        "host": "secrethost",
        "dbname": "s",
        "password": "pw",
    }

    monkeypatch.setenv("CDC_BRIDGE_POSTGRES__DSN", "host=envhost")
    settings = load_settings(path)
    assert settings.postgres.dsn.get_secret_value() == "host=envhost"
    assert conninfo_to_dict(settings.conninfo()) == {"host": "envhost", "password": "pw"}


def test_missing_secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    monkeypatch.setenv("CDC_BRIDGE_SECRETS_DIR", str(missing))
    assert _error(_write(tmp_path, MINIMAL_YAML)) == (
        f'invalid configuration: directory "{missing}" does not exist'
    )


def test_secrets_never_in_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "postgres__password").write_text("hunter2", encoding="utf-8")
    monkeypatch.setenv("CDC_BRIDGE_SECRETS_DIR", str(secrets))
    settings = load_settings(_write(tmp_path, CONTRACT_YAML))
    assert "hunter2" not in repr(settings)
    assert "db.internal" not in repr(settings)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            MINIMAL_YAML + "bogus: 1\n",
            f"invalid configuration: bogus: {_UNKNOWN}",
        ),
        (
            "postgres: {dsn: a, slott: x}\ntables: {public.t: {}}\n",
            f"invalid configuration: postgres.slott: {_UNKNOWN}",
        ),
        (
            MINIMAL_YAML + "nats: {urls: x}\n",
            f"invalid configuration: nats.urls: {_UNKNOWN}",
        ),
        (
            "postgres: {dsn: a}\ntables:\n  public.conversations:\n    subjct: x\n",
            f"invalid configuration: tables.public.conversations.subjct: {_UNKNOWN}",
        ),
        (
            "postgres: {slot: s}\ntables: {public.t: {}}\n",
            "invalid configuration: postgres.dsn: required key is missing",
        ),
        (
            "tables: {public.t: {}}\n",
            "invalid configuration: postgres: required key is missing",
        ),
        (
            "postgres: {dsn: a}\n",
            "invalid configuration: tables: required key is missing",
        ),
        (
            "postgres: {dsn: a, slot: Bad-Slot}\ntables: {public.t: {}}\n",
            "invalid configuration: postgres.slot: slot names may contain only "
            "lower case letters, digits and '_' (max 63)",
        ),
        (
            f"postgres: {{dsn: a, slot: {'s' * 64}}}\ntables: {{public.t: {{}}}}\n",
            "invalid configuration: postgres.slot: slot names may contain only "
            "lower case letters, digits and '_' (max 63)",
        ),
        (
            "postgres: {dsn: a, publication: 'my-pub'}\ntables: {public.t: {}}\n",
            "invalid configuration: postgres.publication: "
            "use a plain SQL identifier (letters, digits, '_', max 63)",
        ),
        (
            "postgres: {dsn: a}\ntables: {conversations: {}}\n",
            "invalid configuration: tables: table 'conversations' must be written as schema.table",
        ),
        (
            "postgres: {dsn: a}\ntables: {a.b.c: {}}\n",
            "invalid configuration: tables: table 'a.b.c' must be written as schema.table",
        ),
        (
            "postgres: {dsn: a}\ntables: {}\n",
            "invalid configuration: tables: "
            "Dictionary should have at least 1 item after validation, not 0",
        ),
        (
            "postgres: {dsn: a}\ntables: {public.t: {subject: 'a..b'}}\n",
            "invalid configuration: tables.public.t.subject: "
            "subject template 'a..b' has an empty token ('..' or an edge '.')",
        ),
        (
            "postgres: {dsn: a}\ntables: {public.t: {subject: 'cdc.>'}}\n",
            "invalid configuration: tables.public.t.subject: subject template 'cdc.>': "
            "literal text may not contain braces, spaces, control characters, '*' or '>'",
        ),
        (
            "postgres: {dsn: a}\ntables: {public.t: {subject: 'a.{b-c}'}}\n",
            "invalid configuration: tables.public.t.subject: "
            "subject template 'a.{b-c}': placeholder {b-c} is not a name",
        ),
        (
            "postgres: {dsn: a}\ntables: {public.t: {key: id}}\n",
            "invalid configuration: tables.public.t.key: Input should be a valid list",
        ),
        (
            MINIMAL_YAML + "messages: {subject: 'x.{table}'}\n",
            "invalid configuration: messages.subject: only {prefix} may be used here, "
            "not ['table']",
        ),
        (
            MINIMAL_YAML + "nats: {stream: 'a.b', replicas: 9}\n",
            "invalid configuration: nats.stream: a stream name may not be empty or contain "
            "spaces, '.', '*', '>', '/'; nats.replicas: Input should be less than or equal to 5",
        ),
        (
            MINIMAL_YAML + "nats: {subjects: []}\n",
            "invalid configuration: nats.subjects: give at least one subject, or leave the key out",
        ),
        (
            MINIMAL_YAML + "log_level: TRACE\n",
            "invalid configuration: log_level: Input should be 'DEBUG', 'INFO', 'WARNING' "
            "or 'ERROR'",
        ),
        (
            "postgres: [1]\ntables: {public.t: {}}\n",
            "invalid configuration: postgres: "
            "Input should be a valid dictionary or instance of PostgresSettings",
        ),
        # User-supplied text holding a newline still gives a one-line message.
        (
            'postgres: {dsn: a}\ntables:\n  public.t:\n    subject: "a.{b\\nc}"\n',
            "invalid configuration: tables.public.t.subject: "
            "subject template 'a.{b\\nc}': placeholder {b\\nc} is not a name",
        ),
        (
            MINIMAL_YAML + '"x\\ny": 1\n',
            f"invalid configuration: x\\ny: {_UNKNOWN}",
        ),
    ],
)
def test_invalid_configuration(tmp_path: Path, yaml_text: str, message: str) -> None:
    assert _error(_write(tmp_path, yaml_text)) == message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "postgres:\n  dsn: a\n slot: b\ntables: {public.t: {}}\n")
    assert _error(path) == (
        f"config file {path} at line 3, column 2: "
        "expected <block end>, but found '<block mapping start>'"
    )


def test_invalid_yaml_flow_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "postgres: {dsn: a\ntables: {}\n")
    assert (
        _error(path) == f"config file {path} at line 2, column 7: expected ',' or '}}', but got ':'"
    )


def test_invalid_yaml_unterminated_string(tmp_path: Path) -> None:
    path = _write(tmp_path, "postgres:\n  dsn: 'abc\n")
    assert _error(path) == f"config file {path} at line 3, column 1: found unexpected end of stream"


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("x\n", "str")]
)
def test_yaml_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = _write(tmp_path, text)
    assert _error(path) == f"config file {path} must hold a mapping of sections, not {kind}"


def test_empty_yaml_is_an_empty_mapping(tmp_path: Path) -> None:
    assert _error(_write(tmp_path, "# nothing here\n")) == (
        "invalid configuration: postgres: required key is missing; tables: required key is missing"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    assert _error(path) == (
        f"cannot read config file {path}: No such file or directory "
        "(pass an existing file with --config or CDC_BRIDGE_CONFIG)"
    )


def test_missing_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "missing.yaml"
    monkeypatch.setenv("CDC_BRIDGE_CONFIG", str(path))
    assert _error(None) == (
        f"cannot read config file {path}: No such file or directory "
        "(pass an existing file with --config or CDC_BRIDGE_CONFIG)"
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert _error(tmp_path) == (
        f"cannot read config file {tmp_path}: Is a directory "
        "(pass an existing file with --config or CDC_BRIDGE_CONFIG)"
    )


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"postgres: {dsn: \xff}\n")
    assert _error(path) == (
        f"cannot read config file {path}: 'utf-8' codec can't decode byte 0xff in position 16: "
        "invalid start byte (pass an existing file with --config or CDC_BRIDGE_CONFIG)"
    )


def test_explicit_stream_subjects_must_capture_every_route(tmp_path: Path) -> None:
    base = (
        "postgres: {dsn: 'postgresql://x@h/db'}\n"
        "tables:\n"
        "  public.conversations: {subject: 'messages.{conversation_uuid}'}\n"
    )
    ok = load_settings(_write(tmp_path, base + "nats: {subjects: ['messages.>']}\n", "ok.yaml"))
    assert ok.nats.subjects == ["messages.>"]
    assert _error(_write(tmp_path, base + "nats: {subjects: ['other.*']}\n", "bad.yaml")) == (
        "invalid configuration: (top level): nats.subjects ['other.*'] do not capture "
        "tables.public.conversations.subject 'messages.{conversation_uuid}' (subjects "
        "messages.*): add 'messages.*' to nats.subjects"
    )
