"""Opening a connection to NATS with the configured security, for every part of the bridge.

:func:`connect_options` turns :class:`~cdc_bridge.config.NatsSettings` into the keyword
arguments of ``nats.connect`` (user/password, token, .creds file, NKey seed, TLS);
:func:`open_connection` connects once, with a deadline, and turns whatever nats-py or
``ssl`` raised into one :class:`SinkError` line that names the setting to check.

:func:`encode_hpub` and :class:`FrameWriter` are the publish fast path: the sink builds
each HPUB frame with one string join and hands whole runs of frames to nats-py's
outgoing buffer at once, instead of nats-py's per-message validation and per-header
byte appends (the largest share of the bridge's CPU per change).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client as NatsClient

from cdc_bridge.config import NatsSettings
from cdc_bridge.errors import SinkError, first_line

__all__ = [
    "BadHeaderError",
    "FrameWriter",
    "connect_options",
    "encode_hpub",
    "frame_payload_size",
    "open_connection",
    "redacted_url",
    "tls_context",
]

ErrorCallback = Callable[[BaseException], Awaitable[None]]
Callback = Callable[[], Awaitable[None]]


def redacted_url(url: str) -> str:
    """``url`` (comma separated URLs) with any password in them replaced by ``***``."""
    parts = []
    for one in url.split(","):
        one = one.strip()
        try:
            split = urlsplit(one)
        except ValueError:
            parts.append(one)
            continue
        if split.password is None and split.username is None:
            parts.append(one)
            continue
        host = split.netloc.rsplit("@", 1)[-1]
        user = "***" if split.password is None else f"{split.username or ''}:***"
        parts.append(urlunsplit(split._replace(netloc=f"{user}@{host}")))
    return ",".join(parts)


def tls_context(cfg: NatsSettings) -> ssl.SSLContext | None:
    """The TLS context for the configured CA / client certificate, or None (defaults)."""
    if cfg.tls_ca_file is None and cfg.tls_cert_file is None and not cfg.tls_handshake_first:
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise SinkError(
            f"cannot read nats.tls_ca_file {str(cfg.tls_ca_file)!r}: {first_line(exc)} "
            "(it must hold PEM certificates)"
        ) from None
    if cfg.tls_cert_file is not None and cfg.tls_key_file is not None:
        try:
            context.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file))
        except (ssl.SSLError, OSError) as exc:
            raise SinkError(
                f"cannot load nats.tls_cert_file {str(cfg.tls_cert_file)!r} with "
                f"nats.tls_key_file {str(cfg.tls_key_file)!r}: {first_line(exc)} "
                "(both must be PEM, the key unencrypted and matching the certificate)"
            ) from None
    return context


def connect_options(cfg: NatsSettings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect``: servers, timeout, authentication and TLS."""
    options: dict[str, Any] = {
        "servers": [u.strip() for u in cfg.url.split(",")],
        "connect_timeout": cfg.connect_timeout,
    }
    if cfg.user is not None and cfg.password is not None:
        options["user"] = cfg.user
        options["password"] = cfg.password.get_secret_value()
    if cfg.token is not None:
        options["token"] = cfg.token.get_secret_value()
    if cfg.creds_file is not None:
        options["user_credentials"] = str(cfg.creds_file)
    if cfg.nkey_seed_file is not None:
        options["nkeys_seed"] = str(cfg.nkey_seed_file)
    context = tls_context(cfg)
    if context is not None:
        options["tls"] = context
    if cfg.tls_handshake_first:
        options["tls_handshake_first"] = True
    return options


def _auth_hint(cfg: NatsSettings) -> str:
    if cfg.user is not None:
        return "check nats.user and nats.password"
    if cfg.token is not None:
        return "check nats.token"
    if cfg.creds_file is not None:
        return "check nats.creds_file"
    if cfg.nkey_seed_file is not None:
        return "check nats.nkey_seed_file and that the server knows its public key"
    return (
        "the server requires authentication: set nats.user and nats.password, nats.token, "
        "nats.creds_file or nats.nkey_seed_file"
    )


def describe_error(cfg: NatsSettings, exc: BaseException) -> str:
    """One line: what went wrong connecting, and which setting to check."""
    where = f"cannot connect to NATS at {redacted_url(cfg.url)}"
    text = first_line(exc)
    lowered = text.lower()
    if "authorization violation" in lowered or "authentication" in lowered:
        return f"{where}: authorization violation ({_auth_hint(cfg)})"
    if type(exc).__module__.split(".")[0] == "nkeys":
        key = "nats.creds_file" if cfg.creds_file is not None else "nats.nkey_seed_file"
        return f"{where}: {text} (check {key}: it must hold a user NKey seed, SU...)"
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in lowered:
        reason = getattr(exc, "verify_message", None) or "certificate verify failed"
        return (
            f"{where}: TLS certificate verify failed: {reason} "
            "(check nats.tls_ca_file, and that the server's certificate names this host)"
        )
    if isinstance(exc, ssl.SSLError) or "ssl" in lowered or "tls" in lowered:
        hint = (
            "the server may require a client certificate: set nats.tls_cert_file and "
            "nats.tls_key_file"
            if cfg.tls_cert_file is None
            else "check nats.tls_cert_file, nats.tls_key_file and nats.tls_ca_file"
        )
        return f"{where}: TLS failed: {text} ({hint})"
    if isinstance(
        exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError | ssl.SSLEOFError
    ):
        # With TLS 1.3 a server that wants a client certificate (tls { verify: true })
        # and does not like ours (or gets none) drops the connection after the handshake;
        # depending on timing the client sees a reset or, while writing, a broken pipe.
        uses_tls = any(u.strip().startswith("tls://") for u in cfg.url.split(",")) or (
            cfg.tls_ca_file is not None or cfg.tls_cert_file is not None
        )
        if not uses_tls:
            hint = "check nats.url, that nats-server is running and the network to it"
        elif cfg.tls_cert_file is None:
            hint = (
                "the server may require a TLS client certificate: set nats.tls_cert_file and "
                "nats.tls_key_file; else check nats.url and that nats-server is running"
            )
        else:
            hint = "check that the server trusts the CA of nats.tls_cert_file"
        return f"{where}: connection closed by the server ({hint})"
    if isinstance(exc, TimeoutError):
        hint = (
            "check nats.url and that nats-server is running; if its tls block sets "
            "handshake_first, set nats.tls_handshake_first: true"
            if not cfg.tls_handshake_first
            else "check nats.url and that nats-server is running"
        )
        return f"{where}: timed out ({hint})"
    return f"{where}: {text} (check nats.url and that nats-server is running)"


async def open_connection(
    cfg: NatsSettings,
    *,
    name: str,
    closed_cb: Callback | None = None,
    error_cb: ErrorCallback | None = None,
) -> NatsClient:
    """Connect once (no reconnects); :class:`SinkError` with a one-line reason on failure."""
    options = connect_options(cfg)
    errors: list[BaseException] = []

    async def record(exc: BaseException) -> None:
        errors.append(exc)
        if error_cb is not None:
            await error_cb(exc)

    try:
        # nats-py retries a failed first connect forever whatever the options say,
        # so the whole attempt gets a deadline of its own.
        return await asyncio.wait_for(
            nats.connect(
                name=name,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=record,
                closed_cb=closed_cb,
                **options,
            ),
            timeout=cfg.connect_timeout + 1,
        )
    except Exception as exc:
        cause: BaseException = errors[-1] if errors else exc
        raise SinkError(describe_error(cfg, cause)) from None


# --------------------------------------------------------------------- publish frames

#: What nats-py refuses in a subject (whitespace would end the protocol line early).
_SUBJECT_INVALID: Final = re.compile(r"[ \t\r\n]")
#: nats-py's header key rule (RFC 7230 token characters).
_HEADER_KEY: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES_TO_SPACES: Final = str.maketrans({"\r": " ", "\n": " "})
#: Header keys already checked against :data:`_HEADER_KEY`.
_known_keys: set[str] = set()
#: Subjects already checked against :data:`_SUBJECT_INVALID` (a few per table), bounded.
_valid_subjects: set[str] = set()
_VALID_SUBJECTS_KEPT: Final = 4096


class BadHeaderError(ValueError):
    """A header key that is not an RFC 7230 token (nats-py raises the same)."""


def _careful_header_block(headers: dict[str, str]) -> str:
    """Exactly what nats-py encodes: keys checked and stripped (empty ones skipped),
    values stripped and their newlines turned into spaces."""
    lines = ["NATS/1.0\r\n"]
    for k, v in headers.items():
        key = k.strip()
        if not key:
            continue
        if not _HEADER_KEY.fullmatch(key):
            raise BadHeaderError(f"invalid header key {key!r}")
        lines.append(f"{key}: {v.strip().translate(_NEWLINES_TO_SPACES)}\r\n")
    lines.append("\r\n")
    return "".join(lines)


def encode_hpub(subject: str, headers: dict[str, str], body: bytes, reply: str = "") -> bytes:
    """One NATS ``HPUB`` frame: ``HPUB <subject> [reply] <hdr len> <total len>\\r\\n``,
    the header block (``NATS/1.0``, one ``Key: value`` line each, an empty line), the
    body and ``\\r\\n`` — byte for byte what ``nats.aio.client.Client.publish`` sends.

    Raises ValueError for a subject with whitespace (it would break the protocol line)
    and :class:`BadHeaderError` for a key that is not a token.
    """
    if subject not in _valid_subjects:
        if not subject or _SUBJECT_INVALID.search(subject):
            raise ValueError(f"invalid NATS subject {subject!r}")
        if len(_valid_subjects) < _VALID_SUBJECTS_KEPT:
            _valid_subjects.add(subject)
    if reply and _SUBJECT_INVALID.search(reply):
        raise ValueError(f"invalid NATS subject {subject!r}")
    values = "".join(headers.values())
    if (
        not headers
        or " " in values
        or not values.isprintable()
        or not _known_keys.issuperset(headers)
    ):
        # Perhaps something nats-py would change: a blank (to strip), a CR or LF (to
        # replace); a key not seen yet. Spaces inside a value also come this way.
        for key in headers:
            if _HEADER_KEY.fullmatch(key):
                _known_keys.add(key)
        block = _careful_header_block(headers)
    else:
        block = "NATS/1.0\r\n" + "\r\n".join(map(": ".join, headers.items())) + "\r\n\r\n"
    target = f"{subject} {reply}" if reply else subject
    if block.isascii():  # its length in bytes is known: one encode for line and block
        size = len(block)
        head = f"HPUB {target} {size} {size + len(body)}\r\n{block}".encode()
        return b"".join((head, body, b"\r\n"))
    header = block.encode()
    size = len(header)
    return b"".join(
        (f"HPUB {target} {size} {size + len(body)}\r\n".encode(), header, body, b"\r\n")
    )


def frame_payload_size(frame: bytes) -> int:
    """Header and body bytes of an :func:`encode_hpub` frame: what max_payload limits."""
    return len(frame) - frame.index(b"\r\n") - 4


class FrameWriter:
    """Puts ready-made frames into nats-py's outgoing buffer, as ``Client.publish`` does
    (its flusher task writes the buffer to the socket), many frames per call.

    This uses nats-py's internals (``_pending``, ``_pending_data_size``,
    ``_flush_pending``; the same from nats-py 2.2 through 2.16). For a client without
    them :attr:`available` is False, and the sink publishes through ``Client.publish``.
    """

    def __init__(self, client: NatsClient) -> None:
        self._nc = client
        self.available = all(
            hasattr(client, name)
            for name in ("_pending", "_pending_data_size", "_max_pending_size", "_flush_queue")
        ) and callable(getattr(client, "_flush_pending", None))

    async def write(self, frames: list[bytes], size: int) -> None:
        """Queue ``frames`` (``size`` bytes in all) and wake the flusher.

        Our frames never fill nats-py's buffer past half its limit: beyond that, this
        waits (cancellably) until the flusher has handed the buffer to the socket. So
        another user of the client (a KV read, the read-back) never lands in nats-py's
        forced flush, which waits for a server that may not be reading (frozen) and
        swallows a cancellation on the way (``_flush_pending``: ``except
        CancelledError: pass``): the session could then never end.
        """
        nc: Any = self._nc
        self._check_open()
        flusher = nc._flusher_task
        if flusher is None or flusher.done():
            # No flusher: nats-py writes inline (and may swallow a cancellation).
            nc._pending.extend(frames)
            nc._pending_data_size += size
            await nc._flush_pending()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            return
        limit = nc._max_pending_size // 2
        while limit > 0 and nc._pending_data_size and nc._pending_data_size + size > limit:
            future = self._kick()
            if future is None:  # the flusher has wake-ups enough queued
                await asyncio.sleep(0.005)
            else:
                await future  # resolved once the flusher's write has drained
            self._check_open()
        nc._pending.extend(frames)
        nc._pending_data_size += size
        nc.stats["out_msgs"] += len(frames)
        nc.stats["out_bytes"] += size
        if nc._flush_queue.empty():
            self._kick()

    def _check_open(self) -> None:
        nc = self._nc
        if nc.is_closed or nc.is_draining_pubs or not nc.is_connected:
            # allow_reconnect is off: not connected means gone for this session.
            raise ConnectionError("the connection to NATS is closed")

    def _kick(self) -> asyncio.Future[None] | None:
        """Wake nats-py's flusher; the future it resolves after writing, or None when
        its queue is full (it is awake then anyway)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._nc._flush_queue.put_nowait(future)  # type: ignore[union-attr]
        except asyncio.QueueFull:
            return None
        return future
