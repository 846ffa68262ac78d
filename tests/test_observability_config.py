"""The metrics and heartbeat settings, and what they change in the stream's subjects."""

from __future__ import annotations

import os
from typing import Any

import pytest

from cdc_bridge.config import Settings
from cdc_bridge.pipeline import stream_spec
from cdc_bridge.reader import _is_own_heartbeat


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CDC_BRIDGE_"):
            monkeypatch.delenv(name)


def settings(**extra: Any) -> Settings:
    return Settings(
        postgres={"dsn": "postgresql://x@127.0.0.1/db"},
        tables={"public.t": {"subject": "rows.{table}"}},
        **extra,
    )


def test_defaults() -> None:
    s = settings()
    assert s.metrics.enabled is True
    assert s.metrics.host == "0.0.0.0"
    assert s.metrics.port == 9187
    assert s.metrics.ready_timeout == 60
    assert s.heartbeat.interval == 30
    assert s.heartbeat.publish is False
    assert s.heartbeat.prefix == "cdc_bridge.heartbeat"


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_BRIDGE_METRICS__PORT", "9999")
    monkeypatch.setenv("CDC_BRIDGE_METRICS__ENABLED", "false")
    monkeypatch.setenv("CDC_BRIDGE_HEARTBEAT__INTERVAL", "0")
    s = settings()
    assert s.metrics.port == 9999
    assert s.metrics.enabled is False
    assert s.heartbeat.interval == 0


@pytest.mark.parametrize(
    "extra",
    [
        {"metrics": {"prot": 1}},
        {"metrics": {"port": 70000}},
        {"metrics": {"ready_timeout": 0}},
        {"heartbeat": {"interval": -1}},
        {"heartbeat": {"subject": "x"}},
    ],
)
def test_invalid(extra: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(extra))):
        settings(**extra)


def test_published_heartbeats_are_captured_by_a_created_stream() -> None:
    assert stream_spec(settings()).subjects == ("rows.*",)
    spec = stream_spec(settings(heartbeat={"publish": True}))
    assert spec.subjects == ("rows.*", "cdc.heartbeat")


def test_configured_stream_subjects_must_capture_heartbeats() -> None:
    with pytest.raises(ValueError, match=r"heartbeat\.publish"):
        settings(nats={"subjects": ["rows.>"]}, heartbeat={"publish": True})
    settings(nats={"subjects": ["rows.>", "cdc.>"]}, heartbeat={"publish": True})


def test_only_own_heartbeats() -> None:
    assert _is_own_heartbeat(b'{"slot":"s1","ts":"2026-11-27T09:32:10Z"}', "s1")
    assert not _is_own_heartbeat(b'{"slot":"s2","ts":"2026-11-27T09:32:10Z"}', "s1")
    assert not _is_own_heartbeat(b"not json", "s1")
    assert not _is_own_heartbeat(b"[1]", "s1")
