"""Where a broadcast's time goes: the queue pipeline in-process, every storage call counted.

    .venv/bin/python -m benchmarks.profile_broadcast [--conversations 1000] [--profile]
                                                     [--batch-size 32] [--threshold 16]
                                                     [--bot-rate-limit N]

Starts Azurite and the fake Connector (no limits enforced, and the bot's own pacing lifted
unless ``--bot-rate-limit`` sets it), stores ``--conversations``
Teams channel conversations, then runs the local host's queue listener for
``proactive_function`` in this process (as ``python -m tools.devhost`` does), enqueues one
broadcast with ``shared.producer.enqueue`` and waits for its report to say ``done``.

Every storage request is counted at the transport (the Azure SDK's aiohttp transport,
wrapped here: method, service, what kind of call, how long it took, HTTP status), and
Azurite's CPU time is read from ``/proc`` before and after. Printed: sends/s, storage
calls per delivered message by kind, their latency, invocation durations, CPU seconds of
this process and of Azurite. ``--profile`` adds a pyinstrument profile of the run
(benchmarks/results/profile_broadcast.html). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import broadcast, warm

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class StorageCalls:
    """Counts and times every request the Azure SDK's aiohttp transport sends."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.statuses: Counter[str] = Counter()
        self.in_flight = 0
        self.peak_in_flight = 0

    def install(self) -> None:
        from azure.core.pipeline.transport import AioHttpTransport

        original = AioHttpTransport.send
        calls = self

        async def send(transport: Any, request: Any, **kwargs: Any) -> Any:
            kind = classify(request.method, request.url)
            calls.in_flight += 1
            calls.peak_in_flight = max(calls.peak_in_flight, calls.in_flight)
            started = time.perf_counter()
            try:
                response = await original(transport, request, **kwargs)
            finally:
                calls.in_flight -= 1
                calls.latency[kind].append(time.perf_counter() - started)
            calls.statuses[f"{kind} {response.status_code}"] += 1
            return response

        AioHttpTransport.send = send  # type: ignore[method-assign]

    def reset(self) -> None:
        self.latency.clear()
        self.statuses.clear()
        self.peak_in_flight = self.in_flight


def classify(method: str, url: str) -> str:
    """A short name for one storage request (no account, no message ids)."""
    path = url.split("?", 1)[0]
    query = url.partition("?")[2]
    if "/messages" in path:
        if method == "GET":
            return "queue receive"
        if method == "POST":
            return "queue put"
        if method == "DELETE":
            return "queue delete"
        return f"queue {method.lower()}"
    if "comp=list" in query:
        return "blob list"
    for part in ("/claim/", "/out/", "/dup/", "/head.json", "/started.json"):
        if part in path:
            return f"blob {method.lower()} {part.strip('/')}"
    if "/proactive/" not in path and method == "GET":
        return "blob get reference"
    return f"blob {method.lower()} other"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


async def run_pipeline(
    env: dict[str, str],
    calls: StorageCalls,
    args: argparse.Namespace,
    received: Callable[[str], int] | None,
) -> dict[str, Any]:
    """The local host's queue listener in this loop, one broadcast, until its report is done."""
    from concurrent.futures import ThreadPoolExecutor

    from shared.config import Settings
    from shared.storage import close_shared_clients
    from tools.devhost.app import load_app
    from tools.devhost.host import _listeners
    from tools.devhost.invoker import Invoker
    from tools.devhost.settings import apply_settings, load_local_settings

    os.environ.update(env)
    settings_map = apply_settings(load_local_settings(ROOT), os.environ)
    app = load_app(ROOT, settings_map, ["proactive_function"])
    queues = dataclasses.replace(
        app.config.queues, batch_size=args.batch_size, new_batch_threshold=args.threshold
    )
    app = dataclasses.replace(app, config=dataclasses.replace(app.config, queues=queues))
    invoker = Invoker(ThreadPoolExecutor(4))
    durations: list[float] = []
    original_invoke = invoker.invoke

    async def timed_invoke(*a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original_invoke(*a, **k)
        finally:
            durations.append(time.perf_counter() - started)

    invoker.invoke = timed_invoke  # type: ignore[method-assign]
    listeners, clients = _listeners(app, settings_map, invoker)
    tasks = [asyncio.create_task(listener.run()) for listener in listeners]
    await asyncio.sleep(0.5)
    calls.reset()
    outcome = await broadcast.broadcast(
        Settings.from_env(env), "news", args.timeout, received, args.conversations
    )
    for listener in listeners:
        listener.stop()
    await asyncio.gather(*tasks)
    await invoker.drain(5.0)
    for client in clients:
        await client.close()
    import app as bot_app

    await bot_app.runtime().close()
    await close_shared_clients()
    return {**outcome, "durations": durations}


async def storage_only(connection_string: str, count: int, concurrency: int) -> dict[str, Any]:
    """`count` blob reads of one small blob through the SDK: CPU per call on each side."""
    from shared.config import StorageSettings
    from shared.storage import close_client, create_blob_service

    service = create_blob_service(StorageSettings(connection_string=connection_string))
    container = service.get_container_client("conversation-references")
    blob = container.get_blob_client("profile/one.json")
    await blob.upload_blob(b'{"a": 1}', overwrite=True)
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await (await blob.download_blob()).readall()

    await asyncio.gather(*(one() for _ in range(50)))  # warm: connections, imports
    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    result = {
        "seconds": time.perf_counter() - started,
        "client_cpu_seconds": time.process_time() - cpu,
    }
    await close_client(service)
    return result


def measure_storage(count: int, concurrency: int) -> None:
    from tools.azurite import Azurite, ensure_resources

    with Azurite(in_memory=False) as azurite:
        ensure_resources(azurite.connection_string, [], ["conversation-references"])
        assert azurite.process is not None
        before = cpu_seconds(azurite.process.pid)
        result = asyncio.run(storage_only(azurite.connection_string, count, concurrency))
        azurite_cpu = cpu_seconds(azurite.process.pid) - before
    print(
        json.dumps(
            {
                "blob_reads": count,
                "concurrency": concurrency,
                "reads_per_s": round(count / result["seconds"], 1),
                "client_cpu_ms_per_read": round(result["client_cpu_seconds"] / count * 1000, 2),
                "azurite_cpu_ms_per_read": round(azurite_cpu / count * 1000, 2),
                "load_average_1m": round(os.getloadavg()[0], 2),
            },
            indent=2,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_broadcast")
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threshold", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--bot-rate-limit",
        type=float,
        default=broadcast.UNPACED_RATE,
        help="the host's BOT_CONNECTOR_RATE_LIMIT (default: too high to bind; 50 is Teams')",
    )
    parser.add_argument("--profile", action="store_true", help="pyinstrument the run")
    parser.add_argument(
        "--poll-report",
        action="store_true",
        help="read the report every second, as the benchmark did before (for comparison)",
    )
    parser.add_argument(
        "--count-calls",
        action="store_true",
        help="count Python function calls with cProfile (deterministic, unlike CPU time)",
    )
    parser.add_argument(
        "--storage-only",
        type=int,
        metavar="N",
        help="only N blob reads through the SDK at --threshold concurrency",
    )
    args = parser.parse_args(argv)
    if args.storage_only:
        measure_storage(args.storage_only, max(1, args.threshold))
        return 0
    calls = StorageCalls()
    calls.install()
    with ExitStack() as stack:
        from tools.azurite import Azurite, ensure_resources

        services = warm.start_services(stack, need_storage=False)
        azurite = stack.enter_context(Azurite(in_memory=False))
        ensure_resources(azurite.connection_string, [], ["conversation-references"])
        services = dataclasses.replace(services, storage=azurite.connection_string)
        suffix = uuid.uuid4().hex[:8]
        env = {
            **services.env(warm.TARGETS["ours"], 0),
            "BOT_PROACTIVE_QUEUE": f"prof-{suffix}",
            "BOT_REFERENCES_CONTAINER": f"prof-{suffix}",
            "BOT_CONNECTOR_RATE_LIMIT": str(args.bot_rate_limit),
        }
        from shared.config import Settings

        asyncio.run(
            broadcast.seed(
                Settings.from_env(env), services.connector_url, services.app_id, args.conversations
            )
        )
        services.connector.reset()
        assert azurite.process is not None
        azurite_cpu, own_cpu = cpu_seconds(azurite.process.pid), time.process_time()
        profiler = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled")
            profiler.start()
        counter = None
        if args.count_calls:
            import cProfile

            counter = cProfile.Profile()
            counter.enable()
        received = None if args.poll_report else services.connector.conversations_with
        outcome = asyncio.run(run_pipeline(env, calls, args, received))
        if counter is not None:
            counter.disable()
        if profiler is not None:
            profiler.stop()
            out = warm.RESULTS / "profile_broadcast.html"
            out.write_text(profiler.output_html())
            print(profiler.output_text(unicode=False, show_all=False)[:12000])
        azurite_cpu = cpu_seconds(azurite.process.pid) - azurite_cpu
        own_cpu = time.process_time() - own_cpu
        stats = services.connector.stats()
    report = outcome["report"] or {}
    delivered = report.get("delivered") or 0
    seconds = outcome["seconds"]
    per_message = {
        kind: round(len(values) / max(1, delivered), 3)
        for kind, values in sorted(calls.latency.items())
    }
    latency_ms = {
        kind: {
            "p50": round(statistics.median(values) * 1000, 1),
            "p90": round(percentile(values, 0.9) * 1000, 1),
        }
        for kind, values in sorted(calls.latency.items())
    }
    total_calls = sum(len(values) for values in calls.latency.values())
    durations = outcome["durations"]
    result = {
        "conversations": args.conversations,
        "batch_size": args.batch_size,
        "new_batch_threshold": args.threshold,
        "state": report.get("state"),
        "delivered": delivered,
        "received_by_connector": stats["received"],
        "distinct": stats["distinct"],
        "seconds": round(seconds, 1),
        "sends_per_s": round(stats["distinct"] / seconds, 1),
        "storage_calls": total_calls,
        "storage_calls_per_delivered": round(total_calls / max(1, delivered), 2),
        "storage_calls_per_s": round(total_calls / seconds, 1),
        "peak_storage_requests_in_flight": calls.peak_in_flight,
        "per_delivered_by_kind": per_message,
        "latency_ms_by_kind": latency_ms,
        "statuses": dict(sorted(calls.statuses.items())),
        "invocations": len(durations),
        "invocation_ms": {
            "p50": round(statistics.median(durations) * 1000, 1) if durations else None,
            "p90": round(percentile(durations, 0.9) * 1000, 1),
        },
        "cpu_seconds": {"this_process": round(own_cpu, 2), "azurite": round(azurite_cpu, 2)},
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if counter is not None:
        import pstats

        counter.dump_stats(warm.RESULTS / "profile_broadcast.pstats")
        total = pstats.Stats(counter).total_calls  # type: ignore[attr-defined]
        result["python_calls_per_delivered"] = round(total / max(1, delivered))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
