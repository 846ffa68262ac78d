"""``cdc-bridge config show``: the effective configuration, never a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from cdc_bridge.admin.show import mask_dsn

YAML = """\
postgres:
  dsn: postgresql://cdc:s3cret-in-dsn@db.example:5432/app?sslmode=require
tables:
  public.conversations:
    subject: "messages.{conversation_uuid}"
"""


def run_show(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CDC_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "cdc_bridge", "config", "show", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://cdc:pw@db:5432/app", "postgresql://cdc:***@db:5432/app"),
        ("postgres://cdc@db/app", "postgres://cdc@db/app"),
        ("postgresql://cdc@db/app?password=pw&sslmode=require", None),
        ("host=db user=cdc password=pw dbname=app", "host=db user=cdc password=*** dbname=app"),
        ("host=db password = 'p w\\'x' dbname=app", "host=db password = *** dbname=app"),
        ("host=db dbname=app", "host=db dbname=app"),
    ],
)
def test_mask_dsn(dsn: str, masked: str | None) -> None:
    result = mask_dsn(dsn)
    assert "pw" not in result.replace("password", "")
    if masked is not None:
        assert result == masked
    else:
        assert "password=***" in result
        assert "sslmode=require" in result


def test_show_masks_secrets_and_shows_env_overrides(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(YAML)
    env = {
        "CDC_BRIDGE_POSTGRES__PASSWORD": "env-hunter2",
        "CDC_BRIDGE_NATS__STREAM": "from-env",
        "CDC_BRIDGE_LOG_FORMAT": "text",
    }
    result = run_show(config, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "s3cret-in-dsn" not in out + result.stderr
    assert "env-hunter2" not in out + result.stderr
    assert (
        "overridden from the environment: CDC_BRIDGE_LOG_FORMAT, CDC_BRIDGE_NATS__STREAM, "
        "CDC_BRIDGE_POSTGRES__PASSWORD" in out
    )
    data = yaml.safe_load(out)
    assert data["postgres"]["dsn"] == "postgresql://cdc:***@db.example:5432/app?sslmode=require"
    assert data["postgres"]["password"] == "***"
    assert data["nats"]["stream"] == "from-env"
    assert data["log_format"] == "text"
    assert data["tables"] == {
        "public.conversations": {
            "subject": "messages.{conversation_uuid}",
            "key": None,
            "columns": None,
            "exclude_columns": [],
            "mask": {},
            "where": None,
            "ops": ["insert", "update", "delete", "truncate"],
        }
    }

    result = run_show(config, "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert "s3cret-in-dsn" not in result.stdout
    assert "env-hunter2" not in result.stdout
    shown = orjson.loads(result.stdout)
    assert shown["settings"]["postgres"]["password"] == "***"
    assert shown["settings"]["nats"]["stream"] == "from-env"
    assert "CDC_BRIDGE_NATS__STREAM" in shown["environment_overrides"]


def test_show_masks_a_secret_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(YAML)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "postgres__password").write_text("file-secret")
    result = run_show(config, env={"CDC_BRIDGE_SECRETS_DIR": str(secrets)})
    assert result.returncode == 0, result.stderr
    assert "file-secret" not in result.stdout
    assert "# read from secret files: postgres__password\n" in result.stdout
    assert yaml.safe_load(result.stdout)["postgres"]["password"] == "***"


def test_show_reports_a_config_error_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(YAML + "log_format: fancy\n")
    result = run_show(config)
    assert result.returncode == 2
    assert result.stderr.startswith("cdc-bridge: error: invalid configuration: log_format")
    assert "s3cret-in-dsn" not in result.stderr
