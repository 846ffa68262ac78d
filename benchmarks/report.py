"""Turns a benchmark result into <stamp>.json, a markdown table (<stamp>.md) and charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["markdown", "write_reports"]


def _fmt(value: float) -> str:
    return f"{value:,.0f}"


def _cpu(seconds: float | None) -> str:
    """CPU seconds; "—" where there is none to show (no NATS, or a result from before)."""
    return "—" if seconds is None else f"{seconds:.2f}"


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# cdc-bridge benchmark, {report['date']}",
        "",
        f"{machine['cpus']} CPUs ({machine['cpu']}), Python {machine['python']}, "
        f"PostgreSQL {report.get('postgres', '?')}; all servers and contenders on this machine.",
        "",
    ]
    for case in report["cases"]:
        lines += [
            f"## {case['case']}: {case['changes']:,} changes, {case['tx_size']:,} per "
            f"transaction, mix {case['mix']} (insert/update/delete)",
            "",
            "| contender | rows/s (median) | min-max | warm rows/s | s | CPU s | peak RSS MiB "
            "| walsender CPU s | nats-server CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in case["contenders"].items():
            if not s["ok"]:
                lines.append(f"| {name} | — | {s['error'][:160]} | | | | | | |")
                continue
            lines.append(
                f"| {name} | {_fmt(s['rows_per_s'])} | {_fmt(s['rows_per_s_min'])}-"
                f"{_fmt(s['rows_per_s_max'])} | {_fmt(s['warm_rows_per_s'])} | "
                f"{s['seconds']:.2f} | {s['cpu_s']:.2f} | {s['peak_rss_mib']:.0f} | "
                f"{_cpu(s.get('walsender_cpu_s'))} | {_cpu(s.get('nats_cpu_s'))} |"
            )
        if case["ratios"]:
            lines += ["", "| ratio (within each run) | median | min-max |", "|---|---:|---:|"]
            for pair, r in case["ratios"].items():
                lines.append(f"| {pair} | {r['median']:.2f} | {r['min']:.2f}-{r['max']:.2f} |")
        lines.append("")
    variants = report.get("latency_variants") or (
        [report["latency"] | {"variant": "batches"}] if report.get("latency") else []
    )
    if variants:
        first = next((v for v in variants if "skipped" not in v), variants[0])
        lines += [
            f"## latency: cdc-bridge at {first.get('rate', 0):,.0f} changes/s for "
            f"{first.get('seconds', 0):.0f}s, {first.get('tx_size', 0)} per transaction",
            "",
            "Commit → PubAck, exact per message (JetStream's stored time - commit_ts); the "
            "bridge's own histogram (bucket-interpolated) in brackets.",
            "",
            "| variant | p50 ms | p99 ms | p99.9 ms | n | CPU s | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for v in variants:
            if "skipped" in v:
                lines.append(f"| {v['variant']} | skipped: {v['skipped']} | | | | | |")
                continue
            h, s = v["histogram"], v["stored"]
            cells = [f"{s[q] * 1e3:.1f} ({h.get(q, 0) * 1e3:.1f})" for q in ("p50", "p99", "p99.9")]
            lines.append(
                f"| {v['variant']} | {' | '.join(cells)} | {s['count']:,.0f} | "
                f"{v['cpu_s']:.1f} | {v['peak_rss_mib']:.0f} |"
            )
        lines += [
            "",
            "Variants: `batches` = the default configuration (atomic batches on, file "
            "store on this machine's disk); `no-batches` = `nats.atomic_batches: false`; "
            "`batches-tmpfs` = batches on, the JetStream store on tmpfs.",
            "",
        ]
    big = report.get("big_transaction")
    if big:
        lines += ["## big transaction", ""]
        if big["ok"]:
            lines.append(
                f"One transaction of {big['rows']:,} inserts: all in the stream "
                f"{big['seconds_after_commit']:.1f}s after the commit "
                f"({_fmt(big['rows_per_s'])} rows/s), bridge peak RSS {big['peak_rss_mib']} MiB."
            )
        else:
            lines.append(f"Failed: {big['error'][-300:]}")
        lines.append("")
    return "\n".join(lines)


def _charts(report: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for case in report["cases"]:
        names = [n for n, s in case["contenders"].items() if s["ok"]]
        if not names:
            continue
        stats = [case["contenders"][n] for n in names]
        medians = [s["rows_per_s"] for s in stats]
        errors = [
            [m - s["rows_per_s_min"] for m, s in zip(medians, stats, strict=True)],
            [s["rows_per_s_max"] - m for m, s in zip(medians, stats, strict=True)],
        ]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.bar(names, medians, yerr=errors, capsize=4, color="#4878a8")
        ax1.set_ylabel("rows/s (median, min-max)")
        ax1.set_title(f"{case['case']}: {case['changes']:,} changes, {case['tx_size']}/tx")
        ax2.bar(names, [s["peak_rss_mib"] for s in stats], color="#a86048")
        ax2.set_ylabel("peak RSS (MiB)")
        ax2.set_title("memory")
        fig.tight_layout()
        path = out / f"{stamp}-{case['case']}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_reports(report: dict[str, Any], out: Path, stamp: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stamp}.json", "md": out / f"{stamp}.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    for i, chart in enumerate(_charts(report, out, stamp)):
        paths[f"png{i}"] = chart
    return paths
