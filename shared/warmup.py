"""CPython's cyclic garbage collector while a process warms up.

A cold process spends most of its first turn importing (the JWT library, MSAL, the storage
SDK) and the host before it. Every few hundred new objects the collector runs, and each of
its full passes walks every object loaded so far: modules, classes, functions that live as
long as the process and are never garbage. On a cold turn through the local host that was
about a tenth of the CPU before the answer (benchmarks/README.md, "Cold start through the
local host"). So the collector is paused while the process warms up; once it has, what it
loaded is moved out of the collector's way for good (`gc.freeze`, the permanent
generation) and the collector runs again, on the objects turns create from then on. The
warm path gains too: full passes no longer walk the process's modules.

A pause never turns on a collector that someone else turned off: it resumes only what it
paused. What is frozen is never collected, so the rare cycle that is garbage at the moment
of the freeze stays in memory, once per process. The first request ends the warm-up
whatever it was: when it is refused before its turn (a 400, a 401), the imports of the
first real turn run with the collector on, which is slower but changes nothing else.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def pause() -> bool:
    """Pause the collector; True when this call paused it (it was running)."""
    running = gc.isenabled()
    gc.disable()
    return running


def settle(paused: bool) -> None:
    """The process has warmed up: freeze what it loaded, resume what :func:`pause` paused."""
    gc.freeze()
    if paused:
        gc.enable()


class FirstTurn:
    """The first turn of a process runs with the collector paused; later ones as usual.

    Turns that overlap the first one run while it is paused too; the first to start is the
    one whose end settles the process, whether it answered or raised.
    """

    __slots__ = ("_started",)

    def __init__(self, *, warm: bool = False) -> None:
        self._started = warm  # warm: a process whose objects are not the bot's (tests)

    @contextmanager
    def turn(self) -> Iterator[None]:
        if self._started:
            yield
            return
        self._started = True
        paused = pause()
        try:
            yield
        finally:
            settle(paused)


FIRST_TURN = FirstTurn()  # the process's: the messages endpoint's first request
