"""Broadcast through the queue pipeline, with the fake Connector enforcing Teams' limits.

    .venv/bin/python -m benchmarks.broadcast [--conversations 10000] [--processes 1,2,4]
                                             [--tenant-limit 50] [--unthrottled]
                                             [--scheduled 0]

Stores ``--conversations`` Teams channel conversations in 2 tenants (Azurite), then for
each process count starts that many local hosts (``tools.devhost`` serving
``proactive_function`` on one Azurite), enqueues one broadcast to every stored
conversation with ``shared.producer.enqueue`` and polls its delivery report until it is
``done``. The fake Connector (benchmarks/connector_process.py) enforces Teams' windows
per conversation and ``--tenant-limit`` requests per second per tenant, answering 429.
``--scheduled N`` first enqueues N requests a producer delayed by a day (reminders due
tomorrow), which sit in the queue, and in its message count, for the whole run.

Reported per process count: achieved sends/s against the enforced rate (2 tenants x the
limit), from enqueue to the report saying ``done`` and to the last request the Connector
received, delivered, lost (stored conversations the Connector never received the message
in, whatever the report says), duplicated, other texts (anything else that reached a
conversation: counted by conversation and text, so that one never stands in for another),
429s per send, failures in the report, peak RSS per process. ``--unthrottled`` adds a
run of one process with no limits enforced and the bot's own pacing lifted (UNPACED_RATE).
Results: benchmarks/results/broadcast.json.
The SDKs' own proactive loops over the same conversations: benchmarks/broadcast_peers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import warm

TENANTS = ("tenant-a", "tenant-b")
RESULTS = warm.RESULTS / "broadcast.json"
# The hosts' BOT_CONNECTOR_RATE_LIMIT in the unthrottled run. An app is configured with
# the limit its channel enforces; this Connector enforces none, and at Teams' 50/s the
# bot's own pacer would hold the two tenants to 97/s, measuring the pacer instead of the
# pipeline. High enough never to bind here.
UNPACED_RATE = 100_000


def reference(service_url: str, app_id: str, n: int) -> dict[str, Any]:
    tenant = TENANTS[n % len(TENANTS)]
    return {
        "channelId": "msteams",
        "serviceUrl": service_url,
        "conversation": {
            "id": f"19:bench{n}@thread.tacv2",
            "conversationType": "channel",
            "isGroup": True,
            "tenantId": tenant,
        },
        "bot": {"id": f"28:{app_id}", "name": "Bot"},
        "user": {"id": f"29:user{n}", "name": "User"},
        "channelData": {"tenant": {"id": tenant}},
    }


def conversation_id(n: int) -> str:
    """The id of the ``n``-th seeded conversation (:func:`reference`)."""
    return reference("", "", n)["conversation"]["id"]


def count_delivery(
    texts: Mapping[str, int], text: str, conversations: Collection[str]
) -> dict[str, Any]:
    """What the fake Connector received, ``texts`` mapping ``conversation|text`` to a count
    (its ``stats texts``), against the broadcast of ``text`` to ``conversations``.

    ``delivered``: the conversations that received ``text``; ``lost``: the others;
    ``duplicated``: how many times beyond once they received it; ``other_texts``: every
    other request (another text anywhere, or ``text`` in a conversation not among
    ``conversations``), never counted as a delivery. Counted so, a conversation that never
    got the text and another that got a second text (a request due later, an apology) are
    one lost and one other, not a balance of zero.
    """
    targets = set(conversations)
    got: dict[str, int] = {}
    other = 0
    sample: set[str] = set()
    for key, n in texts.items():
        conversation, _, body = key.partition("|")
        if body == text and conversation in targets:
            got[conversation] = got.get(conversation, 0) + n
        else:
            other += n
            sample.add(f"{conversation}: {body}"[:120])
    return {
        "delivered": len(got),
        "lost": len(targets) - len(got),
        "duplicated": sum(n - 1 for n in got.values()),
        "other_texts": other,
        "other_sample": sorted(sample)[:3],
    }


async def schedule_for_tomorrow(settings: Any, count: int) -> None:
    """`count` requests a producer delayed by a day: queued, counted, not due in this run."""
    from shared.producer import enqueue
    from shared.storage import close_shared_clients

    gate = asyncio.Semaphore(32)
    tomorrow = 24 * 3600.0

    async def one(n: int) -> None:
        request = {"to": {"conversation": f"msteams/19:bench{n}@thread.tacv2"}, "text": "later"}
        async with gate:
            await enqueue(request, settings=settings, delay=tomorrow)

    try:
        await asyncio.gather(*(one(n) for n in range(count)))
    finally:
        await close_shared_clients()


async def seed(settings: Any, service_url: str, app_id: str, count: int) -> None:
    from shared.references import BlobReferenceStore

    store = BlobReferenceStore(settings)
    gate = asyncio.Semaphore(32)

    async def one(n: int) -> None:
        async with gate:
            await store.upsert(reference(service_url, app_id, n))

    try:
        await asyncio.gather(*(one(n) for n in range(count)))
    finally:
        await store.close()


# Seconds between report reads while the Connector is short of the expected count but
# still receiving. The report lists every outcome blob, thousands of them, on the one
# Azurite that every host's claims and ledger writes also wait on. It was read every
# 60 s; now only when the Connector goes quiet (or every REPORT_EVERY seconds), so that
# the producer's polling is not part of what is measured.
REPORT_EVERY = 300.0
QUIET_SECONDS = 5.0  # the Connector received nothing this long: read the report


async def broadcast(
    settings: Any,
    text: str,
    give_up_after: float,
    received: Callable[[str], int] | None = None,
    expected: int = 0,
    quiet: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Enqueue one broadcast and wait for its report to say `done`.

    The report is one listing of every outcome blob (thousands, each parsed from XML),
    which costs the storage emulator as much as a few hundred deliveries. So while the
    fake Connector (`received(text)`: how many conversations it has received `text` in) is short
    of `expected` and still receiving (`quiet`: seconds since its last request), the
    report is read only every REPORT_EVERY seconds; then twice a second.
    """
    from shared.producer import enqueue, read_report
    from shared.references import StoreError
    from shared.storage import close_shared_clients

    failed_reads: list[str] = []
    started = time.perf_counter()
    request_id = await enqueue({"to": {"broadcast": {}}, "text": text}, settings=settings)
    report: dict[str, Any] | None = None
    deadline = started + give_up_after
    last_read = started
    timeline: list[tuple[float, int]] = []  # (seconds since enqueue, conversations reached)
    # Each report read: (began, ended) in seconds since enqueue, the state, targets finished.
    reads: list[tuple[float, float, str | None, int]] = []
    while time.perf_counter() < deadline:  # polled: the report is a blob, not an event
        await asyncio.sleep(0.5 if received is not None else 1.0)
        if received is not None:
            reached = received(text)
            timeline.append((round(time.perf_counter() - started, 1), reached))
        short = received is not None and reached < expected
        if short and quiet is not None and quiet() >= QUIET_SECONDS:
            short = False  # nothing arriving: stalled, failed or waiting on requeues
        if short and time.perf_counter() - last_read < REPORT_EVERY:
            continue
        last_read = time.perf_counter()
        try:
            report = await read_report(request_id, settings=settings)
        except StoreError as error:  # the emulator busy past a call's timeout: read again
            failed_reads.append(str(error)[:120])
            continue
        finished = sum(report.get(k, 0) for k in ("delivered", "pruned", "failed")) if report else 0
        reads.append(
            (
                round(last_read - started, 2),
                round(time.perf_counter() - started, 2),
                report.get("state") if report else None,
                finished,
            )
        )
        if report and report.get("state") == "done":
            break
    await close_shared_clients()
    return {
        "text": text,
        "started": started,
        "seconds": time.perf_counter() - started,
        "report": report,
        "report_reads_failed": len(failed_reads),
        "report_reads": reads,
        "timeline": timeline,
    }


def run_once(
    services: warm.Services,
    env: dict[str, str],
    processes: int,
    count: int,
    timeout: float,
    trace: Path | None = None,
) -> dict[str, Any]:
    from shared.config import Settings

    settings = Settings.from_env(env)
    services.connector.reset()
    target = warm.TARGETS["ours"]
    servers = []
    try:
        for _ in range(processes):
            server = warm.spawn(target, services, functions=("proactive_function",), extra=env)
            servers.append(server)
        for server in servers:
            asyncio.run(warm.wait_listening(server))
        host_cpu = sum(server.cpu_seconds() for server in servers)
        storage_cpu = services.storage_cpu_seconds()
        text = f"news {uuid.uuid4().hex[:8]}"
        received = services.connector.conversations_with
        quiet = lambda: services.connector.stats()["idle_for"] or 0.0  # noqa: E731
        outcome = asyncio.run(broadcast(settings, text, timeout, received, count, quiet))
        stats_at = time.perf_counter()
        stats = services.connector.stats(texts=True)
        # From enqueue to the last request the Connector received (the report's last
        # outcomes and its reading come after it).
        to_last_send = stats_at - outcome["started"] - (stats["idle_for"] or 0.0)
        host_cpu = sum(server.cpu_seconds() for server in servers) - host_cpu
        storage_cpu = services.storage_cpu_seconds() - storage_cpu
        memory = [server.memory_kib().get("VmHWM", 0) / 1024 for server in servers]
        if trace is not None:
            arrivals = services.connector.command("arrivals")["arrivals"]
            (trace / "connector.json").write_text(json.dumps(arrivals))
    finally:
        for server in servers:
            server.stop()
    report = outcome["report"] or {}
    sends = stats["received"] + stats["throttled"]
    # Counted at the Connector, by conversation and text: every stored conversation should
    # get the broadcast's text once, and nothing else should reach anyone.
    counted = count_delivery(
        stats.get("texts") or {}, outcome["text"], [conversation_id(n) for n in range(count)]
    )
    reached = counted["delivered"]
    return {
        "processes": processes,
        "seconds": round(outcome["seconds"], 1),
        "state": report.get("state"),
        "targets": report.get("targets"),
        "delivered": report.get("delivered", 0),  # as the report counts it
        "failed": report.get("failed"),
        # From enqueue to the report saying done (polled each second): fan-out included.
        "sends_per_s": round(reached / outcome["seconds"], 1),
        "seconds_to_last_send": round(to_last_send, 1),
        "sends_per_s_to_last_send": round(reached / max(to_last_send, 1e-9), 1),
        "received": stats["received"],  # every request answered 2xx, whatever its text
        "distinct": stats["distinct"],  # different conversation + text pairs among them
        "conversations": count,
        "connector_delivered": reached,  # stored conversations that received the text
        "lost": counted["lost"],
        "complete": report.get("state") == "done" and report.get("targets") == count,
        "duplicated": counted["duplicated"],
        "other_texts_received": counted["other_texts"],
        "other_texts_sample": counted["other_sample"],
        "throttled_429": stats["throttled"],
        "share_429": round(stats["throttled"] / sends, 4) if sends else 0.0,
        # CPU per delivered send, from /proc: what the rate is made of on a shared machine.
        "host_cpu_ms_per_send": round(host_cpu * 1000 / max(1, reached), 2),
        "azurite_cpu_ms_per_send": round(storage_cpu * 1000 / max(1, reached), 2),
        "peak_rss_mib": [round(m, 1) for m in memory],
        "load_average_1m": round(os.getloadavg()[0], 2),
        "failures_sample": (report.get("failures") or [])[:3],
        "report_reads_failed": outcome["report_reads_failed"],
        "report_reads": outcome["report_reads"],
        # Between 10 % and 90 % of the conversations reached: the pace while sending, without
        # the fan-out's first page and the last stragglers (requeued 429s) at either end.
        "steady_sends_per_s": steady_rate(outcome["timeline"], count),
    }


def steady_rate(timeline: list[tuple[float, int]], count: int) -> float | None:
    low = next(((t, n) for t, n in timeline if n >= count * 0.1), None)
    high = next(((t, n) for t, n in timeline if n >= count * 0.9), None)
    if low is None or high is None or high[0] <= low[0]:
        return None
    return round((high[1] - low[1]) / (high[0] - low[0]), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.broadcast", description=__doc__)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument(
        "--processes", default="1,2,4", help="host process counts, comma-separated ('': none)"
    )
    parser.add_argument("--tenant-limit", type=int, default=50)
    parser.add_argument(
        "--bot-rate-limit",
        type=float,
        help="the hosts' BOT_CONNECTOR_RATE_LIMIT in the runs with limits enforced (default: "
        "--tenant-limit, as an app is configured with the limit its channel enforces; the "
        "unthrottled run uses UNPACED_RATE)",
    )
    parser.add_argument("--unthrottled", action="store_true")
    parser.add_argument(
        "--scheduled",
        type=int,
        default=0,
        help="requests delayed by a day, enqueued before the broadcast (default 0)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="per broadcast, seconds")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--trace",
        type=Path,
        help="folder for a pacing trace per run (benchmarks/pacing_trace; measurement only): "
        "each grant, request, 429 and put-back in the hosts, each arrival at the fake Connector; "
        "summed up by python -m benchmarks.pacing_report FOLDER",
    )
    args = parser.parse_args(argv)
    counts = [int(p) for p in args.processes.split(",") if p.strip()]
    if not counts and not args.unthrottled:
        parser.error("nothing to run: give --processes or --unthrottled")
    report: dict[str, Any] = {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.broadcast " + shlex.join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_start": round(os.getloadavg()[0], 2),
        },
        "conversations": args.conversations,
        "tenants": len(TENANTS),
        "tenant_limit_per_s": args.tenant_limit,
        "bot_rate_limit_per_s": args.bot_rate_limit or args.tenant_limit,
        "enforced_rate_per_s": args.tenant_limit * len(TENANTS),
        "scheduled_for_tomorrow": args.scheduled,
        "runs": [],
    }
    limits = ["--teams-limits", "--tenant-limit", str(args.tenant_limit)]
    # Each run on a fresh Azurite, seeded anew: Azurite's cost per call grows with what it
    # already stores (a second broadcast on the same one cost it twice the CPU per send).
    plan = [(processes, limits) for processes in counts]
    if args.unthrottled:
        plan.append((1, []))
    paced_rate = args.bot_rate_limit or args.tenant_limit
    for processes, connector_args in plan:
        with ExitStack() as stack:
            services = warm.start_services(
                stack, need_storage=True, connector_args=connector_args, queue_traffic=True
            )
            suffix = uuid.uuid4().hex[:8]
            env = {
                **services.env(warm.TARGETS["ours"], 0),
                "BOT_PROACTIVE_QUEUE": f"bench-{suffix}",
                "BOT_REFERENCES_CONTAINER": f"bench-{suffix}",
                "BOT_CONNECTOR_RATE_LIMIT": str(paced_rate if connector_args else UNPACED_RATE),
            }
            trace = None
            if args.trace is not None:
                trace = args.trace / f"{processes}-hosts-{suffix}"
                trace.mkdir(parents=True, exist_ok=True)
                env["BENCH_PACING_TRACE"] = str(trace.resolve())
                here = Path(__file__).resolve().parent / "pacing_trace"
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(here), str(warm.ROOT), env.get("PYTHONPATH", "")) if p
                )
            from shared.config import Settings

            print(f"storing {args.conversations} conversations ...", flush=True)
            started = time.perf_counter()
            settings = Settings.from_env(env)
            asyncio.run(seed(settings, services.connector_url, services.app_id, args.conversations))
            report["seed_seconds"] = round(time.perf_counter() - started, 1)
            if args.scheduled:
                print(f"enqueueing {args.scheduled} requests due tomorrow ...", flush=True)
                asyncio.run(schedule_for_tomorrow(settings, args.scheduled))
            print(f"broadcast with {processes} process(es) ...", flush=True)
            result = run_once(services, env, processes, args.conversations, args.timeout, trace)
        if connector_args:
            result["achieved_share_of_enforced"] = round(
                result["sends_per_s"] / report["enforced_rate_per_s"], 3
            )
            result["share_of_enforced_to_last_send"] = round(
                result["sends_per_s_to_last_send"] / report["enforced_rate_per_s"], 3
            )
            if result["steady_sends_per_s"] is not None:
                result["steady_share_of_enforced"] = round(
                    result["steady_sends_per_s"] / report["enforced_rate_per_s"], 3
                )
            report["runs"].append(result)
        else:
            result["bot_rate_limit_per_s"] = UNPACED_RATE
            report["unthrottled"] = result
        print(json.dumps(result), flush=True)
    report["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    runs = [*report["runs"], *([report["unthrottled"]] if "unthrottled" in report else [])]
    unfinished = [r["processes"] for r in runs if not r["complete"] or r["lost"]]
    if unfinished:
        print(f"runs with {unfinished} process(es) did not finish or lost messages", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
