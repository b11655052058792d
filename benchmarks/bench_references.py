"""The conversation-reference store on Azurite at 10,000 references.

    .venv/bin/python -m benchmarks.bench_references [--count 10000] [--concurrency 32]

Starts its own Azurite (in memory: blobs only, see warm.start_services; free ports), then
measures with BlobReferenceStore:

- upsert (create) throughput of `count` new references (20% 1:1, which also write the
  user index), `concurrency` upserts in flight;
- a repeated message (only the activityId differs) with a warm cache, and with a cold cache
  (a new store instance: one read per reference, no write);
- `list` by channel (page sizes 100 and 1,000) and by channel + tenant (page size 100):
  latency of every page, total time, and a check that every reference is listed exactly once;
- `find_by_user` (by user id and by AAD object id) and `get` latency.

Writes benchmarks/results/references.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shared.config import Settings, StorageSettings
from shared.references import BlobReferenceStore
from tools.azurite import Azurite

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "references.json"
TENANTS = 10
PERSONAL_EVERY = 5  # every 5th reference is a 1:1 conversation


def make_reference(i: int, activity_id: str = "1") -> dict[str, Any]:
    personal = i % PERSONAL_EVERY == 0
    conversation_id = f"a:1{i:08d}-personal" if personal else f"19:{i:08d}@thread.tacv2"
    return {
        "channelId": "msteams",
        "serviceUrl": "https://smba.trafficmanager.net/emea/",
        "activityId": activity_id,
        "conversation": {
            "id": conversation_id,
            "conversationType": "personal" if personal else "channel",
            "isGroup": not personal,
            "tenantId": f"tenant-{i % TENANTS}",
        },
        "user": {"id": f"29:user-{i}", "aadObjectId": f"aad-{i}", "name": f"User {i}"},
        "bot": {"id": "28:bench-bot", "name": "Bench"},
    }


def key_of(i: int) -> str:
    ref = make_reference(i)
    return f"msteams/{ref['conversation']['id']}"


def summary_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)

    return {
        "n": len(samples),
        "mean": round(statistics.fmean(samples) * 1000, 2),
        "p50": pct(0.50),
        "p95": pct(0.95),
        "max": round(ordered[-1] * 1000, 2),
    }


async def run_all(
    count: int, concurrency: int, factory: Callable[[], Awaitable[Any]] | None = None
) -> tuple[float, list[float]]:
    """Run `factory(i)` for i in range(count), `concurrency` at a time: (wall s, latencies)."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with semaphore:
            started = time.perf_counter()
            await factory(i)  # type: ignore[misc]
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - started, latencies


async def measure_listing(store: BlobReferenceStore, page_size: int, **filters) -> dict:
    keys: list[str] = []
    pages: list[float] = []
    continuation = None
    started = time.perf_counter()
    while True:
        t = time.perf_counter()
        page = await store.list(page_size=page_size, continuation=continuation, **filters)
        pages.append(time.perf_counter() - t)
        keys += [item.key for item in page.items]
        continuation = page.continuation
        if continuation is None:
            break
    return {
        "filters": filters,
        "page_size": page_size,
        "items": len(keys),
        "unique": len(set(keys)),
        "pages": len(pages),
        "total_s": round(time.perf_counter() - started, 3),
        "page_latency_ms": summary_ms(pages),
    }


async def bench(connection_string: str, count: int, concurrency: int) -> dict[str, Any]:
    settings = Settings(
        storage=StorageSettings(connection_string=connection_string),
        references_container="bench-references",
    )
    # Large enough to hold every reference: "warm" means each was seen recently (the
    # store's default holds 1,024, the most recent an instance recorded).
    store = BlobReferenceStore(settings, cache_size=2 * count)
    results: dict[str, Any] = {}
    try:

        async def create(i: int) -> None:
            assert await store.upsert(make_reference(i))

        wall, latencies = await run_all(count, concurrency, create)
        results["upsert_create"] = {
            "count": count,
            "concurrency": concurrency,
            "total_s": round(wall, 3),
            "per_second": round(count / wall, 1),
            "latency_ms": summary_ms(latencies),
        }

        async def repeat_warm(i: int) -> None:
            assert not await store.upsert(make_reference(i, activity_id="2"))

        wall, latencies = await run_all(count, concurrency, repeat_warm)
        results["upsert_unchanged_warm_cache"] = {
            "count": count,
            "total_s": round(wall, 3),
            "per_second": round(count / wall, 1),
            "latency_ms": summary_ms(latencies),
        }

        cold = BlobReferenceStore(settings)
        sample = min(count, 2000)

        async def repeat_cold(i: int) -> None:
            assert not await cold.upsert(make_reference(i, activity_id="3"))

        try:
            wall, latencies = await run_all(sample, concurrency, repeat_cold)
        finally:
            await cold.close()
        results["upsert_unchanged_cold_cache"] = {
            "count": sample,
            "total_s": round(wall, 3),
            "per_second": round(sample / wall, 1),
            "latency_ms": summary_ms(latencies),
        }

        listings = [
            await measure_listing(store, 100, channel_id="msteams"),
            await measure_listing(store, 1000, channel_id="msteams"),
            await measure_listing(store, 100, channel_id="msteams", tenant_id="tenant-3"),
        ]
        for listing in listings:
            want = count if "tenant_id" not in listing["filters"] else count // TENANTS
            listing["correct"] = listing["items"] == listing["unique"] == want
        results["list"] = listings

        rng = random.Random(7)
        personal = [i for i in range(count) if i % PERSONAL_EVERY == 0]
        lookups = [rng.choice(personal) for _ in range(300)]
        find_latencies: list[float] = []
        for n, i in enumerate(lookups):
            started = time.perf_counter()
            if n % 2:
                found = await store.find_by_user(channel_id="msteams", user_id=f"29:user-{i}")
            else:
                found = await store.find_by_user(channel_id="msteams", aad_object_id=f"aad-{i}")
            find_latencies.append(time.perf_counter() - started)
            assert found is not None and found.key == key_of(i)
        results["find_by_user_latency_ms"] = summary_ms(find_latencies)

        get_latencies: list[float] = []
        for i in (rng.randrange(count) for _ in range(300)):
            started = time.perf_counter()
            assert (await store.get(key_of(i))) is not None
            get_latencies.append(time.perf_counter() - started)
        results["get_latency_ms"] = summary_ms(get_latencies)
    finally:
        await store.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load_start = os.getloadavg()[0]
    with Azurite() as azurite:
        results = asyncio.run(bench(azurite.connection_string, args.count, args.concurrency))
    report = {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bench_references " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        },
        "storage": "Azurite (in-memory), loopback",
        "references": args.count,
        "tenants": TENANTS,
        "personal_share": 1 / PERSONAL_EVERY,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    ok = all(listing["correct"] for listing in results["list"])
    print(f"listing correct: {ok}; results written to {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
