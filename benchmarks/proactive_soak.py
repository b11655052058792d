"""Soak: one broadcast to many conversations through the whole proactive path.

    .venv/bin/python -m benchmarks.proactive_soak [--count 10000] [--hosts 2] [--output FILE]

Starts its own Azurite, the fake AAD (HTTPS, MSAL) and botsim's fake Connector enforcing
the Teams per-conversation limits plus a global limit of 50 requests/s (answering 429 with
`Retry-After` beyond it), stores `count` conversation references, starts `hosts` local
Functions hosts (`python -m tools.devhost --functions proactive_function`) on the repo's
host.json, enqueues one broadcast through shared.producer and waits for its report.

Prints and writes `--output` (default benchmarks/results/proactive_soak.json): the report, how many
conversations received the message (exactly once / twice / never), the 429s the fake
answered, what went to the poison queue, and the time to done. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from azure.storage.queue import QueueClient

from shared import producer
from shared.config import Settings
from shared.references import BlobReferenceStore, StoreError
from shared.storage import close_shared_clients
from shared.windows import Window
from tools.azurite import Azurite, free_port
from tools.botsim.aad import FakeAAD
from tools.botsim.connector import FakeConnector

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "proactive_soak.json"
TEXT = "soak"


def reference(url: str, i: int) -> dict:
    return {
        "channelId": "msteams",
        "serviceUrl": url,
        "conversation": {"id": f"19:soak-{i:06d}@thread.tacv2", "conversationType": "channel"},
        "bot": {"id": "28:bot"},
    }


async def store_all(settings: Settings, url: str, count: int) -> None:
    store = BlobReferenceStore(settings, cache_size=0)
    semaphore = asyncio.Semaphore(64)

    async def put(i: int) -> None:
        async with semaphore:
            await store.upsert(reference(url, i))

    try:
        await asyncio.gather(*(put(i) for i in range(count)))
    finally:
        await store.close()


def start_host(env: dict[str, str], logs: Path) -> subprocess.Popen:
    port = free_port()
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    out = open(logs / f"host-{port}.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.devhost",
            "--port",
            str(port),
            "--functions",
            "proactive_function",
        ],
        cwd=ROOT,
        env={**keep, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while b"Host started on" not in (logs / f"host-{port}.log").read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"a host did not start; see {logs}")
        time.sleep(0.1)
    return process


async def run(count: int, hosts: int, logs: Path) -> dict:
    app_id, secret = str(uuid.uuid4()), uuid.uuid4().hex
    with (
        Azurite(in_memory=False) as azurite,
        FakeAAD() as aad,
        FakeConnector(enforce_limits=True, global_limit=Window(50, 1.0)) as connector,
    ):
        aad.register_secret(app_id, secret)
        connector.auth_check = aad.is_valid_token
        env = {
            "MicrosoftAppId": app_id,
            "MicrosoftAppPassword": secret,
            "BOT_LOGIN_AUTHORITY": aad.url,
            "BOT_TRUSTED_SERVICE_URLS": connector.url,
            "AzureWebJobsStorage": azurite.connection_string,
            "BOT_REFERENCES_CONTAINER": "soak-refs",
            "BOT_PROACTIVE_QUEUE": "soak",
            "REQUESTS_CA_BUNDLE": aad.ca_path,
            "SSL_CERT_FILE": aad.ca_path,
        }
        settings = Settings.from_env(env)
        started = time.monotonic()
        await store_all(settings, connector.url, count)
        stored_in = time.monotonic() - started
        processes = [start_host(env, logs) for _ in range(hosts)]
        try:
            started = time.monotonic()
            request_id = await producer.enqueue(
                {"to": {"broadcast": {}}, "text": TEXT}, settings=settings
            )
            report = None
            while time.monotonic() - started < 3600:
                try:
                    report = await producer.read_report(request_id, settings=settings)
                except StoreError:  # a local emulator under this load can be slow to answer
                    report = None
                if report and report["state"] == "done":
                    break
                await asyncio.sleep(2)
            elapsed = time.monotonic() - started
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)
            await close_shared_clients()
        sent = Counter(
            r.conversation_id
            for r in connector.requests
            if r.operation == "sendToConversation" and r.status < 300
        )
        throttled = sum(r.status == 429 for r in connector.requests)
        poison = QueueClient.from_connection_string(azurite.connection_string, "soak-poison")
        try:
            poisoned = len(poison.peek_messages(max_messages=32))
        except Exception:
            poisoned = 0
        finally:
            poison.close()
    counts = Counter(sent.values())
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "conversations": count,
        "hosts": hosts,
        "stored_in_s": round(stored_in, 1),
        "done_in_s": round(elapsed, 1),
        "report": {k: v for k, v in (report or {}).items() if k != "failures"},
        "received_once": counts.get(1, 0),
        "received_twice_or_more": sum(n for times, n in counts.items() if times > 1),
        "never_received": count - len(sent),
        "answered_429": throttled,
        "poisoned": poisoned,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proactive_soak")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help="where the result goes (default: benchmarks/results/proactive_soak.json)",
    )
    args = parser.parse_args()
    logs = ROOT / ".tools" / "soak-logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args.count, args.hosts, logs))
    print(json.dumps(result, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    state = (result["report"] or {}).get("state")
    if result["received_once"] != args.count or state != "done" or result["poisoned"]:
        print(
            f"soak failed: {result['never_received']} never received, "
            f"{result['received_twice_or_more']} received more than once, "
            f"report {state}, {result['poisoned']} poisoned",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
