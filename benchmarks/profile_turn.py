"""Profile warm turns of our bot with pyinstrument: ``python -m benchmarks.profile_turn``.

    .venv/bin/python -m benchmarks.profile_turn [--turns 2000] [--concurrency 8] [--devhost]
                                                [--workload mixed|new|shared] [--count]

The same services and activities as benchmarks/warm.py (botsim's OpenID/JWKS, fake AAD,
fake Connector in its own process, Azurite). By default ``messages_function.main`` is
called in this process with a real ``azure.functions.HttpRequest``, as the Functions
worker calls it; ``--devhost`` profiles the local host process instead, under load from
here. Prints pyinstrument's text report (and writes an HTML one with ``--html FILE``).

``--count`` measures instead of sampling: CPU ms per turn without any profiler, then, under
cProfile, Python function calls per turn and storage requests per turn (counted at the
storage SDK's transport). ``--workload new`` sends every turn to a new 1:1 conversation,
``shared`` every turn to the 8 group conversations, ``mixed`` (the default) alternates, as
benchmarks/warm.py does.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks import warm


async def turns(
    services: warm.Services, count: int, concurrency: int, run: str, workload: str = "mixed"
) -> float:
    import azure.functions as func

    import messages_function

    headers = warm.headers(services)
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while sent < count:
            n = sent
            sent += 1
            body = json.dumps(warm.activity(services, run, n, workload)).encode()
            request = func.HttpRequest(
                method="POST", url="http://127.0.0.1/api/messages", headers=headers, body=body
            )
            response = messages_function.main(request)
            if inspect.isawaitable(response):
                response = await response
            if response.status_code != 200:
                raise warm.BenchmarkError(f"answered {response.status_code}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def in_process(services: warm.Services, count: int, concurrency: int, html: Path | None) -> None:
    from pyinstrument import Profiler

    os.environ.update(services.env(warm.TARGETS["ours"], 0))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(turns(services, 200, concurrency, "warmup"))
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    cpu = time.process_time()
    profiler.start()
    took = loop.run_until_complete(turns(services, count, concurrency, "profiled"))
    profiler.stop()
    cpu = time.process_time() - cpu
    print(
        f"{count} turns in {took:.2f} s ({count / took:.0f}/s), "
        f"{cpu * 1000 / count:.2f} ms CPU per turn (this process: bot + profiler)"
    )
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    if html:
        html.write_text(profiler.output_html())


def count_turns(services: warm.Services, count: int, concurrency: int, workload: str) -> None:
    """CPU per turn without a profiler; calls and storage requests per turn under cProfile."""
    import cProfile
    import pstats

    from azure.core.pipeline.transport import AioHttpTransport

    requests = 0
    send = AioHttpTransport.send

    async def counted(self, request, **kwargs):  # instrumentation only: counts, then sends
        nonlocal requests
        requests += 1
        return await send(self, request, **kwargs)

    AioHttpTransport.send = counted  # type: ignore[method-assign]
    os.environ.update(services.env(warm.TARGETS["ours"], 0))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(turns(services, 200, concurrency, "warmup", workload))
    cpu = time.process_time()
    took = loop.run_until_complete(turns(services, count, concurrency, "timed", workload))
    cpu = time.process_time() - cpu
    requests = 0
    profiler = cProfile.Profile()
    profiler.enable()
    loop.run_until_complete(turns(services, count, concurrency, "counted", workload))
    profiler.disable()
    calls = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
    print(
        f"workload {workload}, {count} turns at concurrency {concurrency}: "
        f"{count / took:.0f} turns/s, {cpu * 1000 / count:.2f} ms CPU per turn (no profiler); "
        f"{calls / count:,.0f} Python calls and {requests / count:.2f} storage requests per turn"
    )


def devhost(
    services: warm.Services, count: int, concurrency: int, html: Path | None, workload: str
) -> None:
    from tools.azurite import free_port

    port = free_port()
    # The devhost ends with os._exit (no interpreter teardown), so pyinstrument's own
    # runner would never write its report: main() is run under a profiler instead.
    renderer = "output_html()" if html else "output_text(unicode=True, color=False)"
    snippet = (
        "import sys\n"
        "from pyinstrument import Profiler\n"
        "from tools.devhost.__main__ import main\n"
        "profiler = Profiler(interval=0.0005)\n"
        "profiler.start()\n"
        "main(sys.argv[1:])\n"
        "profiler.stop()\n"
        f"report = profiler.{renderer}\n"
        f"open({str(html)!r}, 'w').write(report) if {bool(html)} else print(report)\n"
    )
    args = [sys.executable, "-c", snippet, "--port", str(port), "--functions", "messages_function"]
    target = warm.TARGETS["ours"]
    process = subprocess.Popen(args, cwd=warm.ROOT, env=services.env(target, port))
    server = warm.Server(target, port, process, time.perf_counter())
    try:
        asyncio.run(warm.first_echo(server, services))
        result = asyncio.run(
            warm.load(server, services, "profiled", concurrency, count / 50.0, workload)
        )
        shown = {k: v for k, v in result.items() if k not in ("statuses", "answered")}
        print(json.dumps(shown, indent=1))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_turn", description=__doc__)
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--devhost", action="store_true")
    parser.add_argument("--html", type=Path)
    parser.add_argument("--workload", choices=("mixed", "new", "shared"), default="mixed")
    parser.add_argument("--count", action="store_true")
    args = parser.parse_args()
    with ExitStack() as stack:
        services = warm.start_services(stack, need_storage=True)
        if args.count:
            count_turns(services, args.turns, args.concurrency, args.workload)
        elif args.devhost:
            devhost(services, args.turns, args.concurrency, args.html, args.workload)
        else:
            in_process(services, args.turns, args.concurrency, args.html)
    return 0


if __name__ == "__main__":
    sys.exit(main())
