"""Sum up a pacing trace written by ``python -m benchmarks.broadcast --trace FOLDER``.

    .venv/bin/python -m benchmarks.pacing_report FOLDER [--limit 15]

For each run folder: per Teams tenant, how long the hosts' background line stood empty
(no request waiting while a slot was free: supply, not pacing, set the pace), the delay
from a grant to the request's arrival at the fake Connector (what the tenant's strict
1-s window sees), and for each 429 whether the grants themselves broke the window
(the pacers together granted too much: convergence) or only the arrivals did (jitter
between grant and arrival).
"""

from __future__ import annotations

import argparse
import json
import statistics
from bisect import bisect_left, bisect_right
from collections import defaultdict
from pathlib import Path
from urllib.parse import unquote


def quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return (
        f"p50 {at(0.5):.1f} ms, p90 {at(0.9):.1f}, p99 {at(0.99):.1f}, max {ordered[-1] * 1000:.1f}"
    )


def conversation_of(path: str) -> str:
    return unquote(path.split("/v3/conversations/", 1)[1].split("/", 1)[0])


def report(folder: Path, limit: int) -> None:
    arrivals = json.loads((folder / "connector.json").read_text())
    hosts = sorted(folder.glob("host-*.jsonl"))
    by_conversation: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for t, status, conversation, tenant in arrivals:
        if conversation:
            by_conversation[conversation].append((t, status, tenant))
    lane_tenant: dict[tuple[str, int], str] = {}
    grants: dict[str, list[float]] = defaultdict(list)  # tenant -> background grant times
    delays: list[float] = []
    write_delays: list[float] = []
    idle: dict[str, float] = defaultdict(float)
    overshoot: list[float] = []
    per_host_grants: list[tuple[str, list[dict]]] = []
    causes = {"granted over the limit": 0, "arrivals bunched": 0}
    put_backs: list[dict] = []  # broadcast children put back rather than wait (crowded_wait)
    rooms: list[dict] = []  # broadcast children that waited in a tenant's room (admission)
    timeouts = 0  # sends that found no slot within their wait (requeued as throttled)
    first = last = None
    for host in hosts:
        records = [json.loads(line) for line in host.read_text().splitlines() if line]
        sends = [r for r in records if r["k"] == "send" and "/activities" in r["path"]]
        for send in sends:
            conversation = conversation_of(send["path"])
            for t, _status, tenant in by_conversation.get(conversation, ()):
                if send["start"] - 0.001 <= t <= send["end"] + 0.001:
                    lane_tenant[(host.name, send["lane"])] = tenant
                    if send["grant"] is not None:
                        delays.append(t - send["grant"])
                        write_delays.append(send["start"] - send["grant"])
                    break
        bg = [r for r in records if r["k"] == "grant" and r["bg"]]
        per_host_grants.append((host.name, bg))
        put_backs.extend(r for r in records if r["k"] == "put_back")
        rooms.extend(r for r in records if r["k"] == "room")
        timeouts += sum(r["k"] == "timeout" for r in records)
        for record in bg:
            tenant = lane_tenant.get((host.name, record["lane"]), "?")
            grants[tenant].append(record["t"])
            before = record["next_before"]
            if before is not None:
                late = record["t"] - before
                if record["slept"] > 0:
                    overshoot.append(late)
                elif record["waiters"] == 0 and late > 0:
                    idle[tenant] += late
            first = record["t"] if first is None else min(first, record["t"])
            last = record["t"] if last is None else max(last, record["t"])
    for tenant_grants in grants.values():
        tenant_grants.sort()
    throttled = [(t, tenant) for t, status, _c, tenant in arrivals if status == 429]
    for t, tenant in throttled:
        times = grants.get(tenant, [])
        # The grants of the requests that were in the tenant's window when this one arrived.
        count = bisect_right(times, t) - bisect_left(times, t - 1.0)
        causes["granted over the limit" if count > limit else "arrivals bunched"] += 1
    span = (last - first) if first is not None else 0.0
    print(f"== {folder.name}: {len(hosts)} host(s), {len(arrivals)} requests, {span:.0f} s")
    for tenant in sorted(grants, key=str):
        print(
            f"  tenant {tenant}: {len(grants[tenant])} background grants, "
            f"line empty {idle[tenant]:.1f} s ({100 * idle[tenant] / max(span, 1e-9):.0f} %)"
        )
    print(f"  grant -> arrival: {quantiles(delays)}")
    print(f"  grant -> request start: {quantiles(write_delays)}")
    print(f"  wake-up after a wait, late by: {quantiles(overshoot)}")
    print(f"  429s: {len(throttled)}: {dict(causes)}")
    waits = [r["wait"] for r in put_backs]
    print(f"  put back rather than wait: {len(put_backs)}, for {quantiles(waits)}")
    waited = [r["waited"] for r in rooms]
    put_back = sum(not r["let_out"] for r in rooms)
    print(f"  waited in a room: {len(rooms)} ({put_back} put back), for {quantiles(waited)}")
    print(f"  no send slot in time (requeued as throttled): {timeouts}")
    for name, bg in per_host_grants:
        rates = [r["rate"] for r in bg if r["rate"]]
        if rates:
            print(
                f"  {name}: {len(bg)} grants, rate mean {statistics.fmean(rates):.1f}/s, "
                f"min {min(rates):.1f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pacing_report")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--limit", type=int, default=15, help="the tenant limit enforced")
    args = parser.parse_args(argv)
    runs = [args.folder] if (args.folder / "connector.json").exists() else []
    runs += sorted(p.parent for p in args.folder.glob("*/connector.json"))
    for run in runs:
        report(run, args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
