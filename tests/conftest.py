"""Shared pytest configuration: real-server fixtures live in tests/fixtures/servers.py."""

from __future__ import annotations

import pytest

pytest_plugins = ("tests.fixtures.servers",)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long-faults",
        action="store_true",
        default=False,
        help="also run the long fault-test variants (marked long_faults)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # CI runs a fixed subset of the fault suite; `make test-faults` runs all of it.
    if config.getoption("--long-faults"):
        return
    long_variants = [item for item in items if item.get_closest_marker("long_faults")]
    if long_variants:
        config.hook.pytest_deselected(items=long_variants)
        items[:] = [item for item in items if not item.get_closest_marker("long_faults")]
