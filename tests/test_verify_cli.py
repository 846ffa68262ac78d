"""``cdc-bridge verify`` refusals that need no server: each exits 2 with one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from cdc_bridge.cli import main


def _config(tmp_path: Path, **table: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                # Nothing listens there: each refusal comes before any connection.
                "postgres": {"dsn": "postgresql://cdc@127.0.0.1:1/app"},
                "nats": {"url": "nats://127.0.0.1:1", "stream": "S"},
                "tables": {"public.t": table, "public.u": {}},
            }
        ),
        encoding="utf-8",
    )
    return path


def test_a_table_without_deletes_in_the_stream_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, ops=["insert", "update"])
    result = CliRunner().invoke(main, ["verify", "-c", str(config)])
    assert result.exit_code == 2
    assert result.stderr == (
        "cdc-bridge: error: tables.public.t.ops leaves out delete, truncate: the stream "
        "does not mirror public.t, so verify cannot compare it (name the other tables: "
        "cdc-bridge verify TABLE ...)\n"
    )


def test_option_conflicts_and_unknown_tables(tmp_path: Path) -> None:
    config = str(_config(tmp_path))
    runner = CliRunner()
    both = runner.invoke(main, ["verify", "-c", config, "--json", "--metrics"])
    assert (both.exit_code, both.stderr) == (
        2,
        "cdc-bridge: error: --json and --metrics cannot be combined\n",
    )
    sample = runner.invoke(main, ["verify", "-c", config, "--sample", "5", "--full"])
    assert (sample.exit_code, sample.stderr) == (
        2,
        "cdc-bridge: error: --sample and --full cannot be combined\n",
    )
    unknown = runner.invoke(main, ["verify", "-c", config, "public.x"])
    assert (unknown.exit_code, unknown.stderr) == (
        2,
        "cdc-bridge: error: table public.x is not in the config's tables: (configured: "
        "public.t, public.u)\n",
    )


def test_an_unreachable_server_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["verify", "-c", str(_config(tmp_path))])
    assert result.exit_code == 2
    assert result.stderr.startswith("cdc-bridge: error: cannot connect to PostgreSQL: ")
    assert result.stderr.count("\n") == 1
