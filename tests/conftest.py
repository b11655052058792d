"""Shared fixtures. The fake services' fixtures live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.storage",
]
