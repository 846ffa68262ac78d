"""PostgreSQL connection security: TLS parameters, RDS IAM auth tokens, clear error hints.

Everything here is applied in one place, :meth:`cdc_bridge.config.Settings.conninfo`,
which every connection of the bridge and of the admin commands goes through. An IAM
token is valid for 15 minutes, so it is computed at connect time, for every connect:
callers that reconnect (heartbeat, slot metrics) get a callable, not a string.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "ConnInfo",
    "connect_error_hint",
    "rds_auth_token",
    "rds_region_from_host",
    "resolve_conninfo",
]

#: A connection string, or something that makes a fresh one (a new IAM token) per call.
ConnInfo = str | Callable[[], str]

# <instance>.<id>.<region>.rds.amazonaws.com (also proxies, clusters and China regions).
_RDS_HOST = re.compile(r"\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.rds\.amazonaws\.com(?:\.cn)?$")


def resolve_conninfo(conninfo: ConnInfo) -> str:
    """The connection string to use for one connect."""
    return conninfo if isinstance(conninfo, str) else conninfo()


def rds_region_from_host(host: str) -> str | None:
    """The AWS region of an RDS host name, None if `host` is not one."""
    match = _RDS_HOST.search(host.lower().rstrip("."))
    return match["region"] if match else None


@functools.cache
def _rds_client(region: str) -> tuple[Any, Any]:
    # One session and client per region: they refresh expiring credentials (IRSA,
    # instance roles) by themselves.
    boto3: Any = importlib.import_module("boto3")
    session = boto3.session.Session(region_name=region)
    return session, session.client("rds", region_name=region)


def rds_auth_token(host: str, port: int, user: str, region: str) -> str:
    """A fresh RDS IAM authentication token (a presigned URL, valid 15 minutes)."""
    session, client = _rds_client(region)
    # Without credentials botocore would hand out an unsigned (useless) token.
    if session.get_credentials() is None:
        raise RuntimeError("no AWS credentials found")
    token: str = client.generate_db_auth_token(
        DBHostname=host, Port=port, DBUsername=user, Region=region
    )
    return token


# libpq's message (lower case) -> what to check.
_HINTS = (
    (
        "certificate verify failed",
        "check postgres.sslrootcert: it must be the CA that signed the server's certificate",
    ),
    (
        "does not match host name",
        "connect by a host name the server's certificate is for, or use postgres.sslmode verify-ca",
    ),
    (
        "requires a valid client certificate",
        "set postgres.sslcert and postgres.sslkey to a client certificate the server trusts",
    ),
    (
        "certificate authentication failed",
        "the client certificate's CN must be the user name (or match the server's pg_ident map)",
    ),
    (
        "password authentication failed",
        "check postgres.password or the password in postgres.dsn; "
        "with postgres.iam_auth, the role needs GRANT rds_iam",
    ),
    (
        "pam authentication failed",
        "with postgres.iam_auth: check the role has GRANT rds_iam, "
        "the AWS credentials and postgres.aws_region",
    ),
    (
        "no pg_hba.conf entry",
        "the server's pg_hba.conf has no line for this host, user and "
        "encryption; a hostssl line needs postgres.sslmode require or stricter",
    ),
    (
        "server does not support ssl",
        "the server has ssl = off: enable TLS on the server or relax postgres.sslmode",
    ),
    ("root certificate file", "set postgres.sslrootcert to the CA file of the server"),
)


def connect_error_hint(message: str) -> str:
    """What to check for a libpq connection error, '' if nothing specific applies."""
    lowered = message.lower()
    for needle, hint in _HINTS:
        if needle in lowered:
            return hint
    return ""
