"""``cdc-bridge config show``: the effective configuration, secrets masked.

What the bridge would run with after YAML, secret files and ``CDC_BRIDGE_*`` variables
are merged. ``SecretStr`` values print as ``***``; a password inside the DSN (URI
``user:password@``, a ``password=`` key or a ``?password=`` parameter) is masked too.
The names of the environment variables that override settings are listed, never their
values.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePath
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import click
import orjson
import yaml

from cdc_bridge.config import ENV_PREFIX, SECRETS_DIR_ENV, Settings
from cdc_bridge.nats_connection import redacted_url

__all__ = ["mask_dsn", "masked_settings", "run_show"]

MASK = "***"

_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***`` (URI or key=value form)."""
    parts = urlsplit(dsn)
    if parts.scheme in ("postgresql", "postgres"):
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":" + MASK
            netloc = f"{userinfo}@{host}"
        query = [
            (k, MASK if k.lower() == "password" else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        return urlunsplit(
            (parts.scheme, netloc, parts.path, urlencode(query, safe="*"), parts.fragment)
        )
    return _KV_PASSWORD.sub(lambda m: m.group(1) + MASK, dsn)


def masked_settings(settings: Settings) -> dict[str, Any]:
    data = settings.model_dump(mode="python")
    postgres = data["postgres"]
    postgres["dsn"] = mask_dsn(settings.postgres.dsn.get_secret_value())
    if settings.postgres.password is not None:
        postgres["password"] = MASK
    # nats://user:password@host or nats://token@host
    data["nats"]["url"] = redacted_url(settings.nats.url)
    masked: dict[str, Any] = _plain(data)
    return masked


def _plain(value: Any) -> Any:
    """Secrets masked, everything else as YAML/JSON-friendly builtins."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, PurePath):  # a file name, not its contents
        return str(value)
    # SecretStr and anything unexpected: never print it as is.
    return MASK


def env_overrides(environ: dict[str, str] | None = None) -> list[str]:
    environ = dict(os.environ if environ is None else environ)
    known = {name.upper() for name in Settings.model_fields}
    return sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper()[len(ENV_PREFIX) :].split("__", 1)[0] in known
    )


def _secret_files() -> list[str]:
    """Names (never contents) of the files in $CDC_BRIDGE_SECRETS_DIR."""
    directory = os.environ.get(SECRETS_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def run_show(settings: Settings, *, as_json: bool) -> int:
    data = masked_settings(settings)
    overrides = env_overrides()
    if as_json:
        click.echo(
            orjson.dumps(
                {"settings": data, "environment_overrides": overrides}, option=orjson.OPT_INDENT_2
            ).decode()
        )
        return 0
    header = "# effective cdc-bridge configuration (secrets masked)\n"
    if overrides:
        header += "# overridden from the environment: " + ", ".join(overrides) + "\n"
    secret_files = _secret_files()
    if secret_files:
        header += "# read from secret files: " + ", ".join(secret_files) + "\n"
    click.echo(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
    return 0
