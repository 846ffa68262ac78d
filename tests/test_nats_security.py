"""NATS security: user/password, token, NKey, .creds, TLS, mutual TLS, handshake-first.

Each case runs against a real nats-server (cdc_bridge.local_servers.start_nats with an
``authorization`` or ``tls`` block) at the sink level: JetStreamSink.connect, then
ensure_stream and one publish acknowledged by JetStream. Certificates are made here with
trustme, the NKey pairs (and the JWTs of operator mode) with nkeys. Wrong credentials or
certificates must fail with one line that names the setting to check and holds no secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import psycopg
import pytest
import trustme

from cdc_bridge.config import NatsSettings, load_settings
from cdc_bridge.errors import ConfigError, SinkError
from cdc_bridge.local_servers import LocalNats, start_nats
from cdc_bridge.nats_connection import connect_options, redacted_url
from cdc_bridge.sink import JetStreamSink, StreamSpec
from tests.fixtures.bridge import BridgeProcess, read_stream, wait_for_messages, write_config

PASSWORD = "pw-Zq8v3xK1"
TOKEN = "tok-Jm4n7bW2"


@dataclass(frozen=True)
class Certs:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    where = tmp_path_factory.mktemp("certs")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("cdc-bridge@example.com")
    paths = Certs(
        ca=where / "ca.pem",
        other_ca=where / "other-ca.pem",
        server_cert=where / "server.pem",
        server_key=where / "server-key.pem",
        client_cert=where / "client.pem",
        client_key=where / "client-key.pem",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    other.cert_pem.write_to_path(str(paths.other_ca))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(paths.server_cert), append=True)
    server.private_key_pem.write_to_path(str(paths.server_key))
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(paths.client_cert), append=True)
    client.private_key_pem.write_to_path(str(paths.client_key))
    return paths


def _user_nkey(where: Path) -> tuple[Path, str]:
    """A new user NKey: (file holding its seed, its public key)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    path = where / "user.nk"
    path.write_bytes(bytes(seed) + b"\n")
    return path, public


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> tuple[Any, bytes]:
    seed = bytes(nkeys.encode_seed(os.urandom(32), prefix))
    return nkeys.from_seed(bytearray(seed)), seed


def _jwt(signer: Any, subject: Any, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2) for ``subject``'s public key, signed by ``signer``."""
    claims: dict[str, Any] = {
        "jti": uuid.uuid4().hex.upper(),
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": subject.public_key.decode(),
        "nats": {**nats, "version": 2},
    }
    header = {"typ": "JWT", "alg": "ed25519-nkey"}
    signed = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return signed + "." + _b64(signer.sign(signed.encode()))


@dataclass(frozen=True)
class OperatorMode:
    server_config: str
    creds_file: Path


@pytest.fixture(scope="module")
def operator_mode(tmp_path_factory: pytest.TempPathFactory) -> OperatorMode:
    """An operator, a system account, an account with JetStream and a user's .creds."""
    operator, _ = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    system, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    account, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user, user_seed = _keypair(nkeys.PREFIX_BYTE_USER)
    limits = {k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")}
    js_limits = {k: -1 for k in ("mem_storage", "disk_storage", "streams", "consumer")}
    account_jwt = _jwt(
        operator, account, "app", {"type": "account", "limits": {**limits, **js_limits}}
    )
    system_jwt = _jwt(operator, system, "SYS", {"type": "account", "limits": limits})
    user_jwt = _jwt(
        account,
        user,
        "cdc-bridge",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    creds = tmp_path_factory.mktemp("creds") / "cdc-bridge.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n"
        "------END USER NKEY SEED------\n",
        encoding="utf-8",
    )
    config = (
        f"operator: {json.dumps(_jwt(operator, operator, 'op', {'type': 'operator'}))}\n"
        f"system_account: {system.public_key.decode()}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{ {account.public_key.decode()}: {json.dumps(account_jwt)}, "
        f"{system.public_key.decode()}: {json.dumps(system_jwt)} }}"
    )
    return OperatorMode(config, creds)


def _server(extra: str) -> Iterator[LocalNats]:
    server = start_nats(extra_config=extra)
    try:
        yield server
    finally:
        server.cleanup()


def _tls_block(certs: Certs, extra: str = "") -> str:
    return (
        f"tls {{ cert_file: {json.dumps(str(certs.server_cert))}, "
        f"key_file: {json.dumps(str(certs.server_key))}, "
        f"ca_file: {json.dumps(str(certs.ca))}, timeout: 2 {extra} }}"
    )


@pytest.fixture(scope="module")
def nkey_user(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _user_nkey(tmp_path_factory.mktemp("nkey"))


@pytest.fixture(scope="module")
def users_server(nkey_user: tuple[Path, str]) -> Iterator[LocalNats]:
    yield from _server(
        "authorization { users: ["
        f"{{ user: alice, password: {json.dumps(PASSWORD)} }}, "
        f"{{ nkey: {nkey_user[1]} }}"
        "] }"
    )


@pytest.fixture(scope="module")
def token_server() -> Iterator[LocalNats]:
    yield from _server(f"authorization {{ token: {json.dumps(TOKEN)} }}")


@pytest.fixture(scope="module")
def tls_server(certs: Certs) -> Iterator[LocalNats]:
    yield from _server(_tls_block(certs))


@pytest.fixture(scope="module")
def mtls_server(certs: Certs) -> Iterator[LocalNats]:
    yield from _server(_tls_block(certs, ", verify: true"))


@pytest.fixture(scope="module")
def handshake_first_server(certs: Certs) -> Iterator[LocalNats]:
    yield from _server(_tls_block(certs, ", handshake_first: true"))


async def _roundtrip(settings: NatsSettings) -> None:
    """Connect, create a stream, publish one message and wait for its PubAck."""
    acked = asyncio.Event()
    sink: JetStreamSink[int] = await JetStreamSink.connect(
        settings,
        on_ack=lambda ticket, duplicate: acked.set(),
        max_in_flight=8,
        ack_timeout=5,
    )
    try:
        unique = uuid.uuid4().hex[:10]
        await sink.ensure_stream(
            StreamSpec(f"SEC_{unique}", (f"sec{unique}.>",), create=True, storage="memory")
        )
        await sink.publish(f"sec{unique}.one", b"{}", {"Nats-Msg-Id": "1"}, 1)
        await asyncio.wait_for(acked.wait(), 5)
        sink.raise_if_failed()
    finally:
        await sink.close()


async def _refused(settings: NatsSettings) -> str:
    with pytest.raises(SinkError) as info:
        await _roundtrip(settings)
    message = str(info.value)
    assert "\n" not in message
    for secret in (PASSWORD, TOKEN):
        assert secret not in message
    return message


def _nats(server: LocalNats, **keys: Any) -> NatsSettings:
    return NatsSettings(url=server.url, connect_timeout=2, **keys)


# ------------------------------------------------------------------ authentication


@pytest.mark.servers
async def test_user_password(users_server: LocalNats) -> None:
    await _roundtrip(_nats(users_server, user="alice", password=PASSWORD))


@pytest.mark.servers
async def test_wrong_password_is_one_clear_line(users_server: LocalNats) -> None:
    message = await _refused(_nats(users_server, user="alice", password="not-" + PASSWORD))
    assert message == (
        f"cannot connect to NATS at {users_server.url}: authorization violation "
        "(check nats.user and nats.password)"
    )


@pytest.mark.servers
async def test_no_credentials_for_a_server_that_wants_them(users_server: LocalNats) -> None:
    message = await _refused(_nats(users_server))
    assert "authorization violation (the server requires authentication" in message


@pytest.mark.servers
async def test_token(token_server: LocalNats) -> None:
    await _roundtrip(_nats(token_server, token=TOKEN))
    message = await _refused(_nats(token_server, token="not-" + TOKEN))
    assert message.endswith("authorization violation (check nats.token)")


@pytest.mark.servers
async def test_nkey_seed_file(users_server: LocalNats, nkey_user: tuple[Path, str]) -> None:
    await _roundtrip(_nats(users_server, nkey_seed_file=nkey_user[0]))


@pytest.fixture(scope="module")
def operator_server(operator_mode: OperatorMode) -> Iterator[LocalNats]:
    yield from _server(operator_mode.server_config)


@pytest.mark.servers
async def test_creds_file(operator_server: LocalNats, operator_mode: OperatorMode) -> None:
    await _roundtrip(_nats(operator_server, creds_file=operator_mode.creds_file))


@pytest.mark.servers
async def test_unknown_nkey_is_refused(users_server: LocalNats, tmp_path: Path) -> None:
    seed_file, _ = _user_nkey(tmp_path)
    message = await _refused(_nats(users_server, nkey_seed_file=seed_file))
    assert "authorization violation (check nats.nkey_seed_file" in message


# ------------------------------------------------------------------ TLS


@pytest.mark.servers
async def test_tls_with_ca(tls_server: LocalNats, certs: Certs) -> None:
    await _roundtrip(_nats(tls_server, tls_ca_file=certs.ca))


@pytest.mark.servers
async def test_tls_with_the_wrong_ca(tls_server: LocalNats, certs: Certs) -> None:
    message = await _refused(_nats(tls_server, tls_ca_file=certs.other_ca))
    assert message.startswith(
        f"cannot connect to NATS at {tls_server.url}: TLS certificate verify failed"
    )
    assert "(check nats.tls_ca_file" in message


@pytest.mark.servers
async def test_mutual_tls(mtls_server: LocalNats, certs: Certs) -> None:
    await _roundtrip(
        _nats(
            mtls_server,
            tls_ca_file=certs.ca,
            tls_cert_file=certs.client_cert,
            tls_key_file=certs.client_key,
        )
    )


@pytest.mark.servers
async def test_mutual_tls_without_a_client_certificate(
    mtls_server: LocalNats, certs: Certs
) -> None:
    message = await _refused(_nats(mtls_server, tls_ca_file=certs.ca))
    assert "set nats.tls_cert_file and nats.tls_key_file" in message


@pytest.mark.servers
async def test_tls_handshake_first(handshake_first_server: LocalNats, certs: Certs) -> None:
    await _roundtrip(_nats(handshake_first_server, tls_ca_file=certs.ca, tls_handshake_first=True))


@pytest.mark.servers
async def test_handshake_first_server_without_the_setting(
    handshake_first_server: LocalNats, certs: Certs
) -> None:
    settings = NatsSettings(url=handshake_first_server.url, connect_timeout=0.5)
    message = await _refused(settings.model_copy(update={"tls_ca_file": certs.ca}))
    assert "set nats.tls_handshake_first: true" in message


# ------------------------------------------------------------------ configuration


def _load(tmp_path: Path, nats: dict[str, Any]) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(
        json.dumps(
            {"postgres": {"dsn": "postgresql://x@h/db"}, "nats": nats, "tables": {"a.b": {}}}
        ),
        encoding="utf-8",
    )
    return load_settings(path)


@pytest.fixture
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CDC_BRIDGE_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("_no_env")
@pytest.mark.parametrize(
    ("nats", "error"),
    [
        ({"user": "alice"}, "nats.user is set but nats.password is not"),
        ({"password": "x"}, "nats.password is set but nats.user is not"),
        (
            {"user": "a", "password": "b", "token": "c"},
            "nats.user/password and nats.token are set together: choose one way",
        ),
        ({"tls_cert_file": "CERT"}, "nats.tls_cert_file and nats.tls_key_file go together"),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, "nats.tls_ca_file: no such file"),
        ({"creds_file": "/nonexistent/x.creds"}, "nats.creds_file: no such file"),
    ],
)
def test_invalid_security_settings(
    tmp_path: Path, certs: Certs, nats: dict[str, Any], error: str
) -> None:
    nats = {k: str(certs.client_cert) if v == "CERT" else v for k, v in nats.items()}
    with pytest.raises(ConfigError, match=error) as info:
        _load(tmp_path, nats)
    assert "\n" not in str(info.value)


@pytest.mark.usefixtures("_no_env")
def test_secrets_come_from_files_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "nats__password").write_text(PASSWORD + "\n", encoding="utf-8")
    monkeypatch.setenv("CDC_BRIDGE_SECRETS_DIR", str(secrets))
    settings = _load(tmp_path, {"user": "alice"})
    assert settings.nats.password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(settings)
    monkeypatch.setenv("CDC_BRIDGE_NATS__PASSWORD", "from-env")
    assert _load(tmp_path, {"user": "alice"}).nats.password.get_secret_value() == "from-env"


def test_connect_options() -> None:
    options = connect_options(NatsSettings(url="nats://a:4222, nats://b:4222", token=TOKEN))
    assert options == {
        "servers": ["nats://a:4222", "nats://b:4222"],
        "connect_timeout": 5.0,
        "token": TOKEN,
    }
    assert redacted_url("nats://u:secret@h:4222,nats://h2") == "nats://u:***@h:4222,nats://h2"


# ------------------------------------------------------------------ end to end


@pytest.mark.servers
def test_bridge_runs_with_a_password_from_a_secret_file(
    users_server: LocalNats, database: str, tmp_path: Path
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    stream = f"SEC_{uuid.uuid4().hex[:10].upper()}"
    config = write_config(
        tmp_path / "config.yaml",
        dsn=database,
        nats_url=users_server.url,
        stream=stream,
        tables={"public.t": {}},
        extra={"nats": {"user": "alice"}, "log_level": "DEBUG"},
    )
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "nats__password").write_text(PASSWORD + "\n", encoding="utf-8")
    bridge = BridgeProcess(
        config, tmp_path / "bridge.log", env={"CDC_BRIDGE_SECRETS_DIR": str(secrets)}
    )
    reader_url = users_server.url.replace("nats://", f"nats://alice:{PASSWORD}@")
    bridge.start()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        wait_for_messages(reader_url, stream, 1)
        assert bridge.terminate() == 0
    finally:
        bridge.stop_quietly()
    assert [m.body["after"] for m in read_stream(reader_url, stream)] == [{"id": 1}]
    assert PASSWORD not in bridge.log_text()


@pytest.mark.usefixtures("_no_env")
def test_config_show_masks_nats_secrets(tmp_path: Path, certs: Certs) -> None:
    from cdc_bridge.admin.show import masked_settings

    url = f"nats://alice:{PASSWORD}@127.0.0.1:4222"
    nats = {"url": url, "token": TOKEN, "tls_ca_file": str(certs.ca)}
    shown = masked_settings(_load(tmp_path, nats))["nats"]
    assert shown["url"] == "nats://alice:***@127.0.0.1:4222"
    assert shown["token"] == "***"
    assert shown["tls_ca_file"] == str(certs.ca)


async def test_an_unreadable_seed_file_is_named(tmp_path: Path) -> None:
    seed = tmp_path / "bad.nk"
    seed.write_text("not a seed\n", encoding="utf-8")
    settings = NatsSettings(url="nats://127.0.0.1:1", connect_timeout=0.5, nkey_seed_file=seed)
    with pytest.raises(SinkError, match=r"invalid seed \(check nats.nkey_seed_file"):
        await _roundtrip(settings)


def test_a_reset_without_tls_points_at_the_network_not_at_certificates() -> None:
    from cdc_bridge.nats_connection import describe_error

    plain = NatsSettings(url="nats://127.0.0.1:4222")
    assert describe_error(plain, ConnectionResetError()) == (
        "cannot connect to NATS at nats://127.0.0.1:4222: connection closed by the server "
        "(check nats.url, that nats-server is running and the network to it)"
    )
    tls = NatsSettings(url="tls://127.0.0.1:4222")
    assert "may require a TLS client certificate" in describe_error(tls, ConnectionResetError())
