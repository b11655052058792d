"""Pacing with many instances on one tenant: ``python -m benchmarks.pacing_instances``.

    .venv/bin/python -m benchmarks.pacing_instances [--instances 1,2,4,8,16,32]
                                                    [--limits 50,15] [--seconds 100]

The simulation of tests/unit/test_ratelimit.py, in virtual time: N pacers (each its own
process, as the Functions host scales a queue out) broadcast into one Teams tenant whose
Connector allows ``limit`` requests in any second (a strict window, 429 above it), with
the delays a real host adds. Per N and limit: the share of the limit that got through and
the share of requests answered 429, over the run and after its first 10 s (every instance
starts at the whole limit). Then 20 instances for a minute, of which 19 stop: the share of
the limit the one left gets in each half minute after. Then 1-8 instances taking a
broadcast of 10,000 messages to two tenants as the host's queue listener does, waiting in
a crowded line or putting the message back (``Pacer.crowded_wait``), three seeds each:
the share of the limits from the start to the last outcome. Then 8 and 16 instances
taking a broadcast of 5,000 messages to one tenant, sends requeued after waiting 7 s for
a slot, with and without the room (``Pacer.admission``), three seeds each: the share of
the limit, the sends requeued after that wait, the messages put back. Results (with the pacer's
constants) to benchmarks/results/pacing_instances.json (benchmarks/README.md, "Pacing
with many instances").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from pathlib import Path

from shared import ratelimit, room, tenant_rate
from tests.unit.test_ratelimit import (
    TWO_TENANTS,
    broadcast_through_instances,
    instance_left_after_a_scale_in,
    instances_sharing_a_tenant,
)

RESULTS = Path(__file__).resolve().parent / "results" / "pacing_instances.json"
ONE_TENANT = 5000  # messages of the one-tenant broadcast
SLOT_WAIT = 7.0  # a background send's wait for its slot: its 12-s budget less 5 s kept


async def measure(
    instances: list[int],
    limits: list[int],
    seconds: float,
    *,
    messages: int = ONE_TENANT,
    seeds: int = 3,
) -> dict:
    """`messages`: the one-tenant broadcast's size, and each tenant's in the two-tenant
    one; `seeds`: runs of each broadcast."""
    two = {tenant: messages for tenant in TWO_TENANTS}
    rows = []
    for limit in limits:
        for count in instances:
            achieved, share_429, later = await instances_sharing_a_tenant(
                count, seconds=seconds, limit=limit, jitter=True
            )
            row = {
                "instances": count,
                "limit_per_s": limit,
                "achieved_share_of_limit": round(achieved, 3),
                "share_429": round(share_429, 4),
                "share_429_after_10_s": round(later, 4),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    scale_in = [round(share, 2) for share in await instance_left_after_a_scale_in()]
    print(json.dumps({"one_left_after_20_share_per_half_minute": scale_in}), flush=True)
    two_tenants = []
    for count in instances:
        if count > 8:
            continue  # 32 invocations each and 10,000 messages: past 8 the run takes minutes
        for put_back in (False, True):
            runs = [
                await broadcast_through_instances(count, two, put_back=put_back, seed=seed)
                for seed in range(seeds)
            ]
            row = {
                "instances": count,
                "put_back": put_back,
                "share_of_limits": [round(r.share, 3) for r in runs],
                "share_429": [round(r.share_429, 4) for r in runs],
                "put_back_messages": [r.put_back for r in runs],
            }
            two_tenants.append(row)
            print(json.dumps(row), flush=True)
    one_tenant = []
    for count in instances:
        if count < 8 or count > 16:
            continue  # under 8 the room never holds anything; past 16 minutes per run
        for with_room in (False, True):
            runs = [
                await broadcast_through_instances(
                    count,
                    {"tenant-a": messages},
                    put_back=True,
                    slot_wait=SLOT_WAIT,
                    room=with_room,
                    seed=seed,
                )
                for seed in range(seeds)
            ]
            row = {
                "instances": count,
                "room": with_room,
                "share_of_limit": [round(r.share, 3) for r in runs],
                "requeued_after_the_slot_wait": [r.timed_out for r in runs],
                "put_back_messages": [r.put_back for r in runs],
            }
            one_tenant.append(row)
            print(json.dumps(row), flush=True)
    return {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": seconds,
        "messages": messages,
        "pacer": {
            "probe_share": tenant_rate.PROBE_SHARE,
            "probe_doubling_s": tenant_rate.PROBE_DOUBLING,
            "min_share": tenant_rate.MIN_SHARE,
            "background_share": ratelimit.DEFAULT_BACKGROUND_SHARE,
            "crowded_seconds": ratelimit.CROWDED_SECONDS,
            "room_seconds": room.ROOM_SECONDS,
            "room_margin_s": room.ROOM_MARGIN,
            "slot_wait_s": SLOT_WAIT,
        },
        "sharing_a_tenant": rows,
        "one_left_after_20_share_per_half_minute": scale_in,
        "serving_two_tenants": two_tenants,
        "one_tenant_over_many": one_tenant,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pacing_instances")
    parser.add_argument("--instances", default="1,2,4,8,16,32")
    parser.add_argument("--limits", default="50,15")
    parser.add_argument("--seconds", type=float, default=100.0)
    parser.add_argument("--messages", type=int, default=ONE_TENANT, help="per broadcast tenant")
    parser.add_argument("--seeds", type=int, default=3, help="runs of each broadcast")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    instances = [int(n) for n in args.instances.split(",")]
    limits = [int(n) for n in args.limits.split(",")]
    result = asyncio.run(
        measure(instances, limits, args.seconds, messages=args.messages, seeds=args.seeds)
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
