"""Shared fixtures (the fake services' fixtures live in tests/fixtures/), and a session check
that the suite leaves no process behind: Azurite, local hosts and helpers must all be gone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import warmup
from shared.config import AZURE_HOST_MARKERS
from shared.logs import REFUSALS, REPEATED

pytest_plugins = [
    "tests.fixtures.storage",
    "tests.fixtures.identity",
    "tests.fixtures.connector",
    "tests.fixtures.aad",
]

# The messages endpoint pauses the garbage collector for a process's first turn and then
# freezes what the process has loaded (shared/warmup.py). This process is pytest's, not a
# bot's: its first turn would be some test's, and the freeze would keep every object of
# the run so far. tests/unit/test_warmup.py tests the first turn on its own; the local
# hosts the end-to-end tests start are bot processes and run it for real.
warmup.FIRST_TURN = warmup.FirstTurn(warm=True)

# The suite runs the bot locally, in unauthenticated mode among others, wherever it runs: a
# hosting-platform variable inherited from the machine (a container's CONTAINER_NAME) would
# make every such bot refuse to start as if on Azure. Tests that mean Azure set their own.
for _marker in AZURE_HOST_MARKERS:
    os.environ.pop(_marker, None)


@pytest.fixture(autouse=True)
def _each_test_logs_its_own_warnings():
    """A warning repeated by every message is logged once a minute per process
    (shared/logs.py): each test starts that minute afresh, as a process of its own."""
    REPEATED.clear()
    REFUSALS.clear()


def _children(pid: int) -> list[str]:
    """Live (not zombie) child processes of `pid`, as "pid command" strings."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # the process ended while we looked
        text = command.decode(errors="replace").strip()
        # multiprocessing's resource tracker ends by itself when this process exits.
        if "multiprocessing.resource_tracker" not in text:
            found.append(f"{stat.parent.name} {text[:120]}")
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if not Path("/proc").is_dir():
        return  # not Linux: nothing to look at
    left = _children(os.getpid())
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write("\n")
            reporter.write_line("processes left behind by the tests:", red=True)
            for line in left:
                reporter.write_line(f"  {line}", red=True)
