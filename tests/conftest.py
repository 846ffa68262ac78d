"""Shared pytest configuration: real-server fixtures live in tests/fixtures/servers.py."""

pytest_plugins = ("tests.fixtures.servers",)
