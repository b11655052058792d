"""A process's first turn runs with the garbage collector paused, then freezes what the
process loaded (shared/warmup.py); the local host does the same for its start.

What an operator would notice is speed (benchmarks/README.md, "Cold start through the
local host"); what these tests pin down is what that rests on: the collector is paused
for the first turn only, always comes back (whatever the turn did), is never turned on
when the host had turned it off, and the process's objects end in the permanent
generation.
"""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from shared import messages, warmup
from shared.http import HttpRequest
from shared.runtime import Runtime


@pytest.fixture(autouse=True)
def collector():
    """Each test starts with a running collector and nothing frozen, and leaves it so."""
    gc.enable()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable()


def test_the_first_turn_runs_paused_then_the_process_is_frozen():
    first = warmup.FirstTurn()
    with first.turn():
        assert not gc.isenabled()
        assert gc.get_freeze_count() == 0
    assert gc.isenabled()
    assert gc.get_freeze_count() > 1000  # the modules, classes and functions loaded

    gc.unfreeze()
    with first.turn():  # a later turn: nothing changes
        assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_turns_that_overlap_the_first_run_paused_and_the_first_one_settles():
    first = warmup.FirstTurn()
    outer = first.turn()
    outer.__enter__()
    with first.turn():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the overlapping turn ended, the first one has not
    outer.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_first_turn_that_raises_still_resumes_the_collector():
    first = warmup.FirstTurn()
    with pytest.raises(RuntimeError), first.turn():
        raise RuntimeError("the turn failed")
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0


def test_a_collector_turned_off_by_the_host_stays_off():
    gc.disable()
    first = warmup.FirstTurn()
    with first.turn():
        pass
    assert not gc.isenabled()


async def test_the_messages_endpoint_pauses_for_the_process_first_request_only(monkeypatch):
    monkeypatch.setattr(warmup, "FIRST_TURN", warmup.FirstTurn())
    seen: list[bool] = []

    def runtime() -> Runtime:  # the app's runtime getter, called inside the request
        seen.append(gc.isenabled())
        raise RuntimeError("no bot here")  # answered as a clean 500

    request = HttpRequest.create(
        "POST", {"Content-Type": "application/json"}, b"{}", "http://localhost/api/messages"
    )
    first = await messages.handle_messages(request, runtime)
    second = await messages.handle_messages(request, runtime)

    assert (first.status, second.status) == (500, 500)
    assert seen == [False, True]
    assert gc.isenabled() and gc.get_freeze_count() > 0


def test_the_local_host_leaves_the_collector_as_it_found_it_when_it_cannot_start():
    code = (
        "import gc, sys\n"
        "from tools.devhost.__main__ import main\n"
        "status = main(['--root', 'no-such-folder', '--port', '0'])\n"
        "print(status, gc.isenabled())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.split() == ["1", "True"], done.stderr


def test_ctrl_c_while_the_local_host_starts_ends_it_quietly():
    # Ctrl-C in the first second of `make run` landed in the host's start, before its own
    # handlers: a 30-line traceback. The start is replaced by one that meets the Ctrl-C
    # (its moment cannot be hit reliably from outside), in a process of its own.
    code = (
        "import sys\n"
        "import tools.devhost.__main__ as host\n"
        "async def starting(args, collect):\n"
        "    raise KeyboardInterrupt\n"
        "host.run = starting\n"
        "sys.exit(host.main(['--root', '.', '--port', '0']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 130
    assert done.stderr == "" and done.stdout == ""
