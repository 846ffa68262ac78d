"""PostgreSQL TLS keys and RDS IAM auth: validation, conninfo, tokens (no server, no network)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import botocore.auth
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from cdc_bridge import pgsecurity
from cdc_bridge.config import Settings, load_settings
from cdc_bridge.errors import ConfigError, SetupError
from cdc_bridge.metrics import SlotCollector
from cdc_bridge.pgsecurity import connect_error_hint, rds_region_from_host

RDS_HOST = "orders.c9akciq32.eu-central-1.rds.amazonaws.com"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No CDC_BRIDGE_* or AWS_* of the developer; AWS config files and IMDS out of reach."""
    for name in list(os.environ):
        if name.upper().startswith(("CDC_BRIDGE_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    pgsecurity._rds_client.cache_clear()
    yield
    pgsecurity._rds_client.cache_clear()


def _load(tmp_path: Path, **postgres: Any) -> Settings:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"postgres": postgres, "tables": {"public.t": {}}}))
    return load_settings(config)


def _error(tmp_path: Path, **postgres: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, **postgres)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("ca.pem", "client.crt", "client.key"):
        files[name] = tmp_path / name
        files[name].write_text("not read before connecting\n")
    return files


# ------------------------------------------------------------------------------ TLS


def test_no_tls_keys_leave_the_dsn_alone(tmp_path: Path) -> None:
    dsn = "postgresql://cdc@db.example:5432/app?sslmode=require"
    assert _load(tmp_path, dsn=dsn).conninfo() == dsn


def test_tls_keys_are_applied_on_top_of_the_dsn(tmp_path: Path, pem_files: dict[str, Path]) -> None:
    settings = _load(
        tmp_path,
        dsn="postgresql://cdc@db.example:5432/app?sslmode=disable&sslrootcert=/old.pem",
        password="s3cret",
        sslmode="verify-full",
        sslrootcert=str(pem_files["ca.pem"]),
        sslcert=str(pem_files["client.crt"]),
        sslkey=str(pem_files["client.key"]),
    )
    params = conninfo_to_dict(settings.conninfo())
    assert params == {
        "host": "db.example",
        "port": "5432",
        "user": "cdc",
        "dbname": "app",
        "password": "s3cret",
        "sslmode": "verify-full",
        "sslrootcert": str(pem_files["ca.pem"]),
        "sslcert": str(pem_files["client.crt"]),
        "sslkey": str(pem_files["client.key"]),
    }


def test_sslrootcert_may_be_the_system_store(tmp_path: Path) -> None:
    settings = _load(tmp_path, dsn="host=db", sslmode="verify-full", sslrootcert="system")
    assert conninfo_to_dict(settings.conninfo())["sslrootcert"] == "system"


@pytest.mark.parametrize("key", ["sslrootcert", "sslcert", "sslkey"])
def test_a_missing_file_names_the_key(tmp_path: Path, key: str) -> None:
    other = {"sslcert": "sslkey", "sslkey": "sslcert"}.get(key)
    extra = {other: str(tmp_path / "config.yaml")} if other else {}
    missing = tmp_path / "missing.pem"
    message = _error(tmp_path, dsn="host=db", **{key: str(missing)}, **extra)
    assert message == f"invalid configuration: postgres.{key}: no such file: {missing}"


def test_a_client_certificate_needs_its_key(tmp_path: Path, pem_files: dict[str, Path]) -> None:
    message = _error(tmp_path, dsn="host=db", sslcert=str(pem_files["client.crt"]))
    assert "set both postgres.sslcert and postgres.sslkey" in message
    message = _error(tmp_path, dsn="host=db", sslkey=str(pem_files["client.key"]))
    assert "set both postgres.sslcert and postgres.sslkey" in message


def test_an_unknown_sslmode_is_a_config_error(tmp_path: Path) -> None:
    assert "postgres.sslmode: Input should be" in _error(tmp_path, dsn="h", sslmode="on")


@pytest.mark.parametrize(
    ("libpq", "hint"),
    [
        ("SSL error: certificate verify failed", "postgres.sslrootcert"),
        ('server certificate for "a" does not match host name "b"', "verify-ca"),
        ("FATAL:  connection requires a valid client certificate", "postgres.sslcert"),
        ('FATAL:  password authentication failed for user "x"', "postgres.password"),
        ('FATAL:  PAM authentication failed for user "x"', "rds_iam"),
        ("could not translate host name", ""),
    ],
)
def test_connect_error_hints(libpq: str, hint: str) -> None:
    found = connect_error_hint(libpq)
    assert (hint in found) if hint else found == ""


# -------------------------------------------------------------------------- RDS IAM


@pytest.mark.parametrize(
    ("host", "region"),
    [
        (RDS_HOST, "eu-central-1"),
        ("db.cluster-ro-abc.us-gov-west-1.rds.amazonaws.com", "us-gov-west-1"),
        ("proxy.proxy-abc.cn-north-1.rds.amazonaws.com.cn", "cn-north-1"),
        ("db.example.com", None),
        ("10.0.0.5", None),
    ],
)
def test_region_from_an_rds_host_name(host: str, region: str | None) -> None:
    assert rds_region_from_host(host) == region


def _iam(tmp_path: Path, **postgres: Any) -> Settings:
    values: dict[str, Any] = {
        "dsn": f"postgresql://cdc_bridge@{RDS_HOST}:5433/app",
        "iam_auth": True,
        "sslmode": "verify-full",
        "sslrootcert": "system",
    }
    return _load(tmp_path, **(values | postgres))


def test_iam_auth_needs_tls(tmp_path: Path) -> None:
    message = _error(tmp_path, dsn=f"postgresql://u@{RDS_HOST}/app", iam_auth=True)
    assert "iam_auth needs postgres.sslmode require, verify-ca or verify-full" in message
    for mode in ("disable", "allow", "prefer"):
        assert "iam_auth needs postgres.sslmode" in _error(
            tmp_path, dsn=f"postgresql://u@{RDS_HOST}/app", iam_auth=True, sslmode=mode
        )
    # sslmode from the DSN counts too
    _load(tmp_path, dsn=f"postgresql://u@{RDS_HOST}/app?sslmode=require", iam_auth=True)


def test_iam_auth_needs_a_region_off_rds_host_names(tmp_path: Path) -> None:
    dsn = "postgresql://cdc_bridge@db.internal.example/app"
    message = _error(tmp_path, dsn=dsn, iam_auth=True, sslmode="require")
    assert "set postgres.aws_region ('db.internal.example' is not an RDS host name)" in message
    settings = _load(tmp_path, dsn=dsn, iam_auth=True, sslmode="require", aws_region="us-east-2")
    assert settings.postgres.iam_target() == (
        "db.internal.example",
        5432,
        "cdc_bridge",
        "us-east-2",
    )


def test_iam_auth_needs_user_and_host_and_no_password(tmp_path: Path) -> None:
    assert "user name in postgres.dsn" in _error(
        tmp_path, dsn=f"host={RDS_HOST}", iam_auth=True, sslmode="require"
    )
    assert "one TCP host name" in _error(
        tmp_path, dsn="user=u dbname=app", iam_auth=True, sslmode="require"
    )
    assert "iam_auth and postgres.password exclude each other" in _error(
        tmp_path,
        dsn=f"postgresql://u@{RDS_HOST}/app",
        iam_auth=True,
        sslmode="require",
        password="x",
    )


@pytest.fixture
def fixed_aws(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """Fixed credentials in the environment and a clock that ticks a second per read."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET")
    ticks: list[datetime] = []

    def now() -> datetime:
        ticks.append(datetime(2026, 11, 27, 9, 30, 0, tzinfo=UTC) + timedelta(seconds=len(ticks)))
        return ticks[-1].replace(tzinfo=None)

    monkeypatch.setattr(botocore.auth, "get_current_datetime", now)
    return ticks


def test_iam_token_is_a_presigned_connect_url(tmp_path: Path, fixed_aws: list[datetime]) -> None:
    password = conninfo_to_dict(_iam(tmp_path).conninfo())["password"]
    assert isinstance(password, str)
    assert password.startswith(f"{RDS_HOST}:5433/?")
    query = parse_qs(urlsplit("https://" + password).query)
    assert query["Action"] == ["connect"]
    assert query["DBUser"] == ["cdc_bridge"]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"] == ["AKID/20261127/eu-central-1/rds-db/aws4_request"]
    assert query["X-Amz-Date"] == ["20261127T093000Z"]
    assert query["X-Amz-Expires"] == ["900"]
    assert len(query["X-Amz-Signature"][0]) == 64


def test_every_connect_gets_a_fresh_token(
    tmp_path: Path, fixed_aws: list[datetime], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _iam(tmp_path, aws_region="eu-west-3")
    seen: list[str] = []

    def fake_connect(conninfo: str, **kwargs: Any) -> Any:
        seen.append(conninfo)
        raise OSError("no server in this test")

    monkeypatch.setattr("cdc_bridge.metrics.psycopg.connect", fake_connect)
    collector = SlotCollector(settings.conninfo, "cdc_bridge")  # as the pipeline does
    assert list(collector.collect()) == []
    assert list(collector.collect()) == []
    tokens = [conninfo_to_dict(c)["password"] for c in seen]
    assert len(tokens) == 2
    assert tokens[0] != tokens[1]
    dates = [parse_qs(urlsplit(f"https://{t}").query)["X-Amz-Date"][0] for t in tokens]
    assert dates == ["20261127T093000Z", "20261127T093001Z"]
    assert all("%2Feu-west-3%2Frds-db%2F" in str(t) for t in tokens)


def test_no_aws_credentials_is_a_clear_error(tmp_path: Path) -> None:
    settings = _iam(tmp_path)  # loading needs no credentials: only connecting does
    with pytest.raises(SetupError) as caught:
        settings.conninfo()
    message = str(caught.value)
    assert message.startswith(
        f"cannot make an RDS IAM auth token for cdc_bridge@{RDS_HOST} in eu-central-1: "
    )
    assert "check the AWS credentials" in message
    assert "\n" not in message
