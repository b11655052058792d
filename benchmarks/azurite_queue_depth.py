"""Azurite's queue: what one operation costs as the queue grows.

    .venv/bin/python -m benchmarks.azurite_queue_depth [--depths 0,250,1000,10000] [--ops 30]

Starts its own Azurite (its data in a temporary folder, free ports), fills one queue to
each depth in turn (messages of 1,500 bytes, about a broadcast child's size) and times, one
at a time, `ops` rounds of put, receive (one message) and delete: the medians per depth.
It measures the emulator, not the bot: the reason the fan-out's flow control also
matters locally (docs/proactive.md, "Flow control"). Writes
benchmarks/results/azurite_queue_depth.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from tools.azurite import Azurite

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "azurite_queue_depth.json"
BODY = "x" * 1500
FILL_PARALLEL = 16


async def measure(connection_string: str, depths: list[int], ops: int) -> list[dict[str, Any]]:
    from azure.storage.queue.aio import QueueClient

    rows = []
    async with QueueClient.from_connection_string(connection_string, "depth") as queue:
        await queue.create_queue()
        gate = asyncio.Semaphore(FILL_PARALLEL)

        async def put() -> None:
            async with gate:
                await queue.send_message(BODY)

        held = 0
        for depth in sorted(depths):
            await asyncio.gather(*(put() for _ in range(depth - held)))
            held = depth
            timings: dict[str, list[float]] = {"put": [], "receive": [], "delete": []}
            for _ in range(ops):
                started = time.perf_counter()
                await queue.send_message(BODY)
                timings["put"].append(time.perf_counter() - started)
                started = time.perf_counter()
                # Visible for long enough that none of the filling messages comes back.
                received = [m async for m in queue.receive_messages(visibility_timeout=600)]
                timings["receive"].append(time.perf_counter() - started)
                started = time.perf_counter()
                await queue.delete_message(received[0])
                timings["delete"].append(time.perf_counter() - started)
            row = {"depth": depth}
            row.update(
                {f"{op}_ms": round(statistics.median(t) * 1000, 1) for op, t in timings.items()}
            )
            rows.append(row)
            print(
                f"{depth:>7} messages: put {row['put_ms']:6.1f} ms, receive "
                f"{row['receive_ms']:6.1f} ms, delete {row['delete_ms']:6.1f} ms",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.azurite_queue_depth", description=__doc__
    )
    parser.add_argument("--depths", default="0,250,500,1000,2000,5000,10000")
    parser.add_argument("--ops", type=int, default=30, help="timed rounds per depth")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    load = round(os.getloadavg()[0], 2)
    with Azurite(in_memory=False) as azurite:
        rows = asyncio.run(measure(azurite.connection_string, depths, args.ops))
    report = {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.azurite_queue_depth",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m": {"start": load, "end": round(os.getloadavg()[0], 2)},
        },
        "storage": "Azurite (data on disk), loopback; medians of one operation at a time",
        "ops_per_depth": args.ops,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    print(f"written to {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
