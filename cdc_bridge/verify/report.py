"""What ``cdc-bridge verify`` found, and its three renderings. Pure.

Per table: rows only in the table, only in the stream, and differing (with the
differing columns), as counts, percentages of the keys checked, and up to N example
keys. Rendered as text (default), JSON (``--json``) or Prometheus text exposition
(``--metrics``); :meth:`VerifyResult.summary` is what ``cdc-bridge status`` shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Gauge, generate_latest

__all__ = ["Differing", "TableResult", "VerifyResult", "render_metrics", "render_text"]


@dataclass(frozen=True, slots=True)
class Differing:
    key: dict[str, Any]
    columns: list[str]


@dataclass(slots=True)
class TableResult:
    table: str
    table_rows: int = 0  # rows read from the table (in the sample, if sampling)
    stream_keys: int = 0  # keys the stream holds a state for (in the sample)
    messages: int = 0  # the table's messages folded (commit LSN <= L)
    checked: int = 0  # keys compared
    only_in_table: int = 0
    only_in_stream: int = 0
    differing: int = 0
    #: Table rows that could not be compared: retention dropped the stream's history.
    unverifiable: int = 0
    only_in_table_examples: list[dict[str, Any]] = field(default_factory=list)
    only_in_stream_examples: list[dict[str, Any]] = field(default_factory=list)
    differing_examples: list[Differing] = field(default_factory=list)
    #: Column -> number of differing rows in which it differs.
    differing_columns: dict[str, int] = field(default_factory=dict)
    repaired: int = 0

    @property
    def mismatched(self) -> int:
        return self.only_in_table + self.only_in_stream + self.differing

    @property
    def mismatch_percent(self) -> float:
        return 100.0 * self.mismatched / self.checked if self.checked else 0.0

    def percent(self, count: int) -> float:
        return round(100.0 * count / self.checked, 4) if self.checked else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "table_rows": self.table_rows,
            "stream_keys": self.stream_keys,
            "messages": self.messages,
            "checked": self.checked,
            "mismatched": self.mismatched,
            "mismatch_percent": round(self.mismatch_percent, 4),
            "only_in_table": {
                "count": self.only_in_table,
                "percent": self.percent(self.only_in_table),
                "examples": self.only_in_table_examples,
            },
            "only_in_stream": {
                "count": self.only_in_stream,
                "percent": self.percent(self.only_in_stream),
                "examples": self.only_in_stream_examples,
            },
            "differing": {
                "count": self.differing,
                "percent": self.percent(self.differing),
                "columns": self.differing_columns,
                "examples": [{"key": d.key, "columns": d.columns} for d in self.differing_examples],
            },
            "unverifiable": self.unverifiable,
            "repaired": self.repaired,
        }


@dataclass(slots=True)
class VerifyResult:
    stream: str
    slot: str
    lsn: str  # the consistent view: table snapshot and stream both as of this LSN
    envelope: str
    mode: str  # full | sample
    sample: int | None
    max_mismatch: float  # percent
    started: str  # ISO-8601 UTC
    duration_seconds: float = 0.0
    tables: list[TableResult] = field(default_factory=list)
    #: Set when the stream no longer holds its first messages (retention or purge).
    history_note: str | None = None
    first_seq: int = 1
    repair: bool = False
    #: Seconds per phase: wait (for the bridge), stream (fold), tables (compare), repair.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(t.mismatch_percent <= self.max_mismatch for t in self.tables)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "stream": self.stream,
            "slot": self.slot,
            "lsn": self.lsn,
            "envelope": self.envelope,
            "mode": self.mode,
            "sample": self.sample,
            "max_mismatch_percent": self.max_mismatch,
            "started": self.started,
            "duration_seconds": round(self.duration_seconds, 3),
            "timings": self.timings,
            "history": {"complete": self.history_note is None, "note": self.history_note},
            "repair": self.repair,
            "tables": [t.to_json() for t in self.tables],
        }

    def summary(self) -> dict[str, Any]:
        """The small record kept for ``cdc-bridge status``."""
        return {
            "ok": self.ok,
            "time": self.started,
            "lsn": self.lsn,
            "mode": self.mode,
            "duration_seconds": round(self.duration_seconds, 3),
            "history_complete": self.history_note is None,
            "tables": {
                t.table: {
                    "checked": t.checked,
                    "only_in_table": t.only_in_table,
                    "only_in_stream": t.only_in_stream,
                    "differing": t.differing,
                    "unverifiable": t.unverifiable,
                    "mismatch_percent": round(t.mismatch_percent, 4),
                    "repaired": t.repaired,
                }
                for t in self.tables
            },
        }


def _key(key: dict[str, Any]) -> str:
    return orjson.dumps(key).decode()


def _examples(keys: list[dict[str, Any]]) -> str:
    return " ".join(_key(k) for k in keys)


def render_text(result: VerifyResult) -> str:
    """The human-readable report."""
    mode = f"sample of ~{result.sample} keys per table" if result.mode == "sample" else "full"
    lines = [
        f"verify stream {result.stream} (slot {result.slot}, {result.envelope} envelope) "
        f"against the tables at LSN {result.lsn}: {mode}"
    ]
    if result.history_note:
        lines.append(f"  note: {result.history_note}")
    for t in result.tables:
        lines.append(f"{t.table}")
        lines.append(
            f"  table rows         {t.table_rows}   stream keys {t.stream_keys} "
            f"(from {t.messages} messages)"
        )
        lines.append(f"  checked            {t.checked}")
        lines.append(
            f"  only in table      {t.only_in_table} ({t.percent(t.only_in_table):.2f}%)"
            + (f"  e.g. {_examples(t.only_in_table_examples)}" if t.only_in_table_examples else "")
        )
        lines.append(
            f"  only in stream     {t.only_in_stream} ({t.percent(t.only_in_stream):.2f}%)"
            + (
                f"  e.g. {_examples(t.only_in_stream_examples)}"
                if t.only_in_stream_examples
                else ""
            )
        )
        lines.append(f"  differing          {t.differing} ({t.percent(t.differing):.2f}%)")
        if t.differing_columns:
            columns = ", ".join(f"{c} ({n})" for c, n in t.differing_columns.items())
            lines.append(f"    columns          {columns}")
        for d in t.differing_examples:
            lines.append(f"    e.g.             {_key(d.key)}: {', '.join(d.columns)}")
        if t.unverifiable:
            lines.append(
                f"  not comparable     {t.unverifiable} table rows (their messages are no "
                "longer in the stream)"
            )
        if result.repair:
            lines.append(f"  repaired           {t.repaired} (the current rows republished)")
    verdict = "EQUAL" if all(t.mismatched == 0 for t in result.tables) else "MISMATCH"
    worst = max((t.mismatch_percent for t in result.tables), default=0.0)
    if verdict == "MISMATCH":
        verdict += f" ({worst:.3f}% at most"
        verdict += (
            f", above --max-mismatch {result.max_mismatch:g}%)"
            if not result.ok
            else f", within --max-mismatch {result.max_mismatch:g}%)"
        )
    phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.timings.items())
    lines.append(
        f"result: {verdict} in {result.duration_seconds:.1f}s" + (f" ({phases})" if phases else "")
    )
    return "\n".join(lines)


def render_metrics(result: VerifyResult, timestamp: float) -> str:
    """Prometheus text exposition (for node_exporter's textfile collector, say)."""
    registry = CollectorRegistry()
    rows = Gauge(
        "cdc_bridge_verify_rows",
        "Keys of the last verify by outcome (checked, only_in_table, only_in_stream, "
        "differing, unverifiable).",
        ["stream", "table", "outcome"],
        registry=registry,
    )
    ratio = Gauge(
        "cdc_bridge_verify_mismatch_ratio",
        "Mismatched keys / keys checked in the last verify.",
        ["stream", "table"],
        registry=registry,
    )
    ok = Gauge(
        "cdc_bridge_verify_ok",
        "1 if the last verify found the mismatch within --max-mismatch, else 0.",
        ["stream"],
        registry=registry,
    )
    last = Gauge(
        "cdc_bridge_verify_last_run_timestamp_seconds",
        "When the last verify ran (Unix time).",
        ["stream"],
        registry=registry,
    )
    duration = Gauge(
        "cdc_bridge_verify_duration_seconds",
        "How long the last verify took.",
        ["stream"],
        registry=registry,
    )
    for t in result.tables:
        for outcome, value in (
            ("checked", t.checked),
            ("only_in_table", t.only_in_table),
            ("only_in_stream", t.only_in_stream),
            ("differing", t.differing),
            ("unverifiable", t.unverifiable),
        ):
            rows.labels(result.stream, t.table, outcome).set(value)
        ratio.labels(result.stream, t.table).set(t.mismatch_percent / 100.0)
    ok.labels(result.stream).set(1 if result.ok else 0)
    last.labels(result.stream).set(timestamp)
    duration.labels(result.stream).set(result.duration_seconds)
    return generate_latest(registry).decode()
