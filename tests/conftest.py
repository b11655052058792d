"""Shared fixtures. The fake services' fixtures live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.storage",
    "tests.fixtures.identity",
    "tests.fixtures.connector",
    "tests.fixtures.aad",
]
