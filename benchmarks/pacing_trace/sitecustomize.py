"""Pacing trace for the broadcast benchmark (measurement only, never deployed).

``python -m benchmarks.broadcast --trace DIR`` puts this folder first on the hosts'
PYTHONPATH, so Python imports it at start-up in every host process; with
``BENCH_PACING_TRACE`` set it wraps the pacer and the Connector client to write one JSON
line per grant, per request, per 429, per put-back, per wait in a tenant's room and per
send that found no slot in time to ``DIR/host-<pid>.jsonl``
(benchmarks/pacing_report.py reads them with the fake Connector's arrivals).
"""

from __future__ import annotations

import os

_DIR = os.environ.get("BENCH_PACING_TRACE")


def _install(directory: str) -> None:
    import contextvars
    import json
    import time

    from shared.connector import client as client_module
    from shared.ratelimit import Pacer, PacingTimeout

    out = open(os.path.join(directory, f"host-{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
    slept: contextvars.ContextVar[float] = contextvars.ContextVar("slept", default=0.0)
    last: contextvars.ContextVar[tuple] = contextvars.ContextVar("last", default=(None, None))

    def write(record: dict) -> None:
        out.write(json.dumps(record) + "\n")

    original_wait = Pacer._wait_until

    async def wait_until(self, wait_time, deadline, *rest, **named):
        start = time.monotonic()
        result = await original_wait(self, wait_time, deadline, *rest, **named)
        slept.set(slept.get() + (time.monotonic() - start))
        return result

    original_grant = Pacer._grant

    def grant(self, lane, conversation, background, now, late=False):
        before = lane._next
        rate = lane.rate(now)
        waiters = len(getattr(lane.line._lock, "_waiters", None) or ())
        granted = original_grant(self, lane, conversation, background, now, late)
        write(
            {
                "k": "grant",
                "t": now,
                "next_before": before if before != float("-inf") else None,
                "rate": rate,
                "bg": background,
                "late": late,
                "slept": round(slept.get(), 4),
                "waiters": waiters,
                "lane": id(lane),
            }
        )
        slept.set(0.0)
        last.set((now, id(lane)))
        return granted

    original_throttled = Pacer.throttled

    def throttled(self, scope, retry_after, sent_at, left_at=None):
        cuts = self.cuts
        original_throttled(self, scope, retry_after, sent_at, left_at)
        lane = self.lane(scope)
        write(
            {
                "k": "429",
                "t": time.monotonic(),
                "tenant": scope.tenant_id,
                "conv": scope.conversation,
                "sent_at": sent_at,
                "cut": self.cuts > cuts,
                "rate_after": lane.rate(time.monotonic()),
            }
        )

    original_crowded = Pacer.crowded_wait

    def crowded_wait(self, scope):
        wait = original_crowded(self, scope)
        if wait > 0:
            write({"k": "put_back", "t": time.monotonic(), "tenant": scope.tenant_id, "wait": wait})
        return wait

    original_acquire = Pacer.acquire

    async def acquire(self, scope, **named):
        try:
            return await original_acquire(self, scope, **named)
        except PacingTimeout:
            write({"k": "timeout", "t": time.monotonic(), "tenant": scope.tenant_id})
            raise

    try:
        from shared import room
    except ImportError:  # a version before the room
        room = None

    async def let_out(*args):
        start = time.monotonic()
        out = await original_let_out(*args)
        write({"k": "room", "t": start, "waited": time.monotonic() - start, "let_out": out})
        return out

    original_send = client_module.send_once

    async def send(session, operation, method, url, *rest, departure, **named):
        start = time.monotonic()
        answer = await original_send(
            session, operation, method, url, *rest, departure=departure, **named
        )
        write(
            {
                "k": "send",
                "start": start,
                "end": time.monotonic(),
                "status": getattr(answer, "status", None),
                "path": url.raw_path,
                "left": departure.at,
                "grant": last.get()[0],
                "lane": last.get()[1],
            }
        )
        return answer

    Pacer._wait_until = wait_until
    Pacer._grant = grant
    Pacer.throttled = throttled
    Pacer.crowded_wait = crowded_wait
    Pacer.acquire = acquire
    if room is not None:
        original_let_out = room._let_out
        room._let_out = let_out
    client_module.send_once = send


if _DIR:
    _install(_DIR)
