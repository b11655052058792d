"""The loop every peer's broadcast runs, in the peer's own venv: one message per reference.

``python -m benchmarks.peers.<peer>_broadcast REFERENCES TEXT CONCURRENCY`` reads the
ConversationReference JSON that benchmarks/broadcast_peers.py wrote (a list, the same
references ours stores in Blob storage; the SDKs keep no store of their own) and sends
TEXT to each, the way the SDK's docs show a bot author doing it, through the SDK's
``send(reference, text)`` given here:

- CONCURRENCY 1: a plain ``for`` loop, one send awaited after the other (what the SDKs'
  proactive samples do);
- CONCURRENCY N > 1: ``asyncio.gather`` over every reference, at most N in flight (a
  semaphore), what an author wanting speed would reasonably write.

A send that raises is counted by the HTTP status its exception carries (or the
exception's type name) and the loop goes on: the message is not sent again (the SDKs
keep no outbox). Prints one JSON line: the loop's wall time, CPU time (user + system,
this process) during the loop, peak RSS (the whole process's, imports and the loaded
references included), what loading the references added to the RSS
(``references_rss_mib``: ours never holds them all, it reads them from storage a page
at a time) and the failures by status.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Send = Callable[[dict[str, Any], str], Awaitable[object]]


def status_of(error: BaseException) -> str:
    """The HTTP status an SDK's exception carries, under whichever name the SDK uses."""
    for holder in (error, getattr(error, "response", None)):
        for name in ("status", "status_code"):
            value = getattr(holder, name, None)
            if isinstance(value, int):
                return str(value)
    return type(error).__name__


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: after fork + exec it
    still holds the forking parent's peak, the benchmark's own."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    """This process's RSS now (VmRSS)."""
    return _status_mib("VmRSS")


def _status_mib(name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(send: Send, references: list[dict[str, Any]], text: str, concurrency: int) -> dict:
    failures: Counter[str] = Counter()

    async def one(reference: dict[str, Any]) -> None:
        try:
            await send(reference, text)
        except Exception as error:  # counted, not retried: what the loop's author would get
            failures[status_of(error)] += 1

    gate = asyncio.Semaphore(max(1, concurrency))

    async def bounded(reference: dict[str, Any]) -> None:
        async with gate:
            await one(reference)

    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    if concurrency <= 1:
        for reference in references:
            await one(reference)
    else:
        await asyncio.gather(*(bounded(reference) for reference in references))
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    return {
        "attempted": len(references),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mib": peak_rss_mib(),
    }


def main(
    send: Send, argv: list[str] | None = None, setup: Callable[[], Awaitable[None]] | None = None
) -> None:
    path, text, concurrency = argv or sys.argv[1:4]
    before = rss_mib()
    references = json.loads(Path(path).read_text())
    loaded = rss_mib() - before

    async def go() -> dict:
        if setup is not None:
            await setup()
        return await run(send, references, text, int(concurrency))

    result = asyncio.run(go())
    result["references_rss_mib"] = round(max(0.0, loaded), 1)
    print(json.dumps(result), flush=True)
