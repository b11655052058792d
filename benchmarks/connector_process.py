"""botsim's fake Connector in a process of its own, for the benchmarks.

In its own process it does not share an interpreter lock with the load generator, so
neither slows the other's clock. ``--teams-limits`` and ``--tenant-limit N`` make it
enforce Teams' limits with 429s (for a broadcast benchmark); ``--conversation-tenants
FILE`` (a JSON object, conversation id -> tenant) tells the tenant limit which tenant a
request counts against when its body names none, as Teams knows it from the
conversation. Prints ``{"url": ...}``
once listening, then answers commands on stdin, one per line, each with one JSON line
on stdout:

- ``stats``: what arrived since the last reset: ``received`` (activities the bots
  posted), ``distinct`` (different conversation + text pairs), ``authorized``
  (carrying an ``Authorization: Bearer`` header, whatever its token),
  ``idle_for`` (seconds since the last one), ``throttled`` (requests answered 429 for
  breaking an enforced limit); with ``texts`` (``stats texts``) also ``texts``
  (conversation|text -> count received) and ``throttled_texts`` (conversation|text ->
  count answered 429); with ``tokens`` also ``tokens`` (bearer token -> count received,
  "" for none). The fake AAD that issued the tokens lives in the benchmark's process,
  which checks them there (``warm.ConnectorProcess``: ``authorized`` becomes the
  replies carrying a token the fake AAD issued for the Connector, unexpired);
- ``delivered TEXT``: ``conversations``, how many conversations received TEXT (the rest
  of the line) at least once: a broadcast's progress, cheaper than ``stats texts``;
- ``arrivals``: ``[time, status, conversation id, tenant]`` of every request since the last
  reset, time as the machine's monotonic clock (the hosts' pacing trace uses the same);
- ``reset``: forget what was counted;
- ``quit``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from shared.windows import Window
from tools.botsim.connector import FakeConnector, RecordedRequest
from tools.botsim.connector import _tenant as request_tenant


def throttled_texts(connector: FakeConnector) -> dict[str, int]:
    """conversation|text -> how many times it was answered 429: who retried, who lost it."""
    throttled: Counter[str] = Counter()
    for request in connector.requests:
        if request.status == 429 and isinstance(request.json, dict):
            throttled[f"{request.conversation_id}|{request.json.get('text')}"] += 1
    return dict(throttled)


def _tenant_of(request: RecordedRequest, tenants: dict[str, str]) -> str | None:
    tenant = request_tenant(request.json)  # as the tenant limit counts it
    if tenant is None and request.conversation_id is not None:
        tenant = tenants.get(request.conversation_id.split(";", 1)[0])
    return tenant


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.connector_process")
    parser.add_argument(
        "--teams-limits",
        action="store_true",
        help="enforce Teams' per-conversation windows (7/1 s, 8/2 s, 60/30 s, 1,800/h) with 429s",
    )
    parser.add_argument(
        "--tenant-limit",
        type=int,
        default=0,
        help="requests per second per Teams tenant named in the body (Teams: about 50)",
    )
    parser.add_argument(
        "--conversation-tenants",
        type=Path,
        help="JSON object: conversation id -> tenant, for requests whose body names no tenant",
    )
    args = parser.parse_args()
    tenants = json.loads(args.conversation_tenants.read_text()) if args.conversation_tenants else {}
    lock = threading.Lock()
    texts: Counter[str] = Counter()
    reached: Counter[str] = Counter()  # text -> conversations it reached
    tokens: Counter[str] = Counter()  # bearer token ("" for none) -> requests
    counts = {"received": 0, "authorized": 0, "last": 0.0}

    def count(request: RecordedRequest) -> None:
        activity = request.json if isinstance(request.json, dict) else {}
        authorization = request.authorization or ""
        with lock:
            counts["received"] += 1
            counts["last"] = time.monotonic()
            bearer = authorization.startswith("Bearer ")
            if bearer and len(authorization) > 20:
                counts["authorized"] += 1
            tokens[authorization[len("Bearer ") :] if bearer else ""] += 1
            # One key per conversation and text: a broadcast sends one text to many.
            key = f"{request.conversation_id}|{activity.get('text')}"
            if key not in texts:
                reached[str(activity.get("text"))] += 1
            texts[key] += 1

    def configure(connector: FakeConnector) -> None:
        connector.enforce_limits = args.teams_limits
        connector.tenant_limit = Window(args.tenant_limit, 1.0) if args.tenant_limit else None
        connector.conversation_tenants = dict(tenants)
        connector.subscribe(count)

    with FakeConnector() as connector:
        configure(connector)
        print(json.dumps({"url": connector.url}), flush=True)
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            with lock:
                if command[0] == "reset":
                    texts.clear()
                    reached.clear()
                    tokens.clear()
                    counts.update(received=0, authorized=0, last=0.0)
                    connector.reset()
                    configure(connector)
                    answer: dict = {"ok": True}
                elif command[0] == "delivered":
                    answer = {"conversations": reached[line.rstrip("\n").partition(" ")[2]]}
                elif command[0] == "arrivals":
                    answer = {
                        "arrivals": [
                            [r.time, r.status, r.conversation_id, _tenant_of(r, tenants)]
                            for r in connector.requests
                        ]
                    }
                else:
                    answer = {
                        "received": counts["received"],
                        "authorized": counts["authorized"],
                        "distinct": len(texts),
                        "idle_for": time.monotonic() - counts["last"] if counts["last"] else None,
                        "throttled": len(connector.violations),  # answered 429
                    }
                    if "texts" in command[1:]:
                        answer["texts"] = dict(texts)
                        answer["throttled_texts"] = throttled_texts(connector)
                    if "tokens" in command[1:]:
                        answer["tokens"] = dict(tokens)
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
