"""Child process of the benchmark: import one bot, handle ONE activity, print the status.

``python -m benchmarks.sdk.run_once <module>`` where ``<module>`` exposes
``async handle(body: bytes, headers: Mapping[str, str]) -> int``. The request comes from the
environment (BENCH_BODY, BENCH_AUTHORIZATION), so nothing but the bot is read from disk.
BENCH_PRELOAD (comma-separated modules) are imported first and timed apart: what a host
process has loaded before it loads the bot (the Functions worker's asyncio and
azure.functions).

Prints one JSON line: {"status": N, "preload_ms": T, "loaded": [...]} where ``loaded`` lists
which of the heavy packages in :data:`WATCHED` the process had imported when it answered.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

WATCHED = (
    "aiohttp",
    "msal",
    "azure.identity",
    "azure.storage.blob",
    "azure.storage.queue",
    "cryptography",
    "jwt",
    "requests",
    "pydantic",
    "msrest",
)


def main() -> None:
    started = time.perf_counter()
    for name in filter(None, os.environ.get("BENCH_PRELOAD", "").split(",")):
        importlib.import_module(name)
    preload_ms = (time.perf_counter() - started) * 1000.0
    import asyncio  # counted with the bot unless the host preloads it (BENCH_PRELOAD)

    bot = importlib.import_module(sys.argv[1])
    headers = {"Content-Type": "application/json"}
    if os.environ.get("BENCH_AUTHORIZATION"):
        headers["Authorization"] = os.environ["BENCH_AUTHORIZATION"]
    status = asyncio.run(bot.handle(os.environ["BENCH_BODY"].encode(), headers))
    loaded = [name for name in WATCHED if name in sys.modules]
    print(json.dumps({"status": status, "preload_ms": preload_ms, "loaded": loaded}), flush=True)


if __name__ == "__main__":
    main()
