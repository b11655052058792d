"""botsim's fake Connector in a process of its own, for the throughput benchmarks.

In its own process it does not share an interpreter lock with the load generator, so
neither slows the other's clock. Prints ``{"url": ...}`` once listening, then answers
commands on stdin, one per line, each with one JSON line on stdout:

- ``stats``: replies counted since the last reset: ``received`` (activities the bots
  posted), ``distinct`` (different texts), ``authorized`` (with a bearer token that
  botsim's fake AAD issued... as far as the header shows: present and a JWT), and
  ``texts`` (text -> how many times, only when asked with ``stats texts``);
- ``reset``: forget what was counted;
- ``quit``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

from tools.botsim.connector import FakeConnector, RecordedRequest


def main() -> None:
    lock = threading.Lock()
    texts: Counter[str] = Counter()
    counts = {"received": 0, "authorized": 0, "last": 0.0}

    def count(request: RecordedRequest) -> None:
        activity = request.json if isinstance(request.json, dict) else {}
        authorization = request.authorization or ""
        with lock:
            counts["received"] += 1
            counts["last"] = time.monotonic()
            if authorization.startswith("Bearer ") and len(authorization) > 20:
                counts["authorized"] += 1
            texts[str(activity.get("text"))] += 1

    with FakeConnector() as connector:
        connector.subscribe(count)
        print(json.dumps({"url": connector.url}), flush=True)
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            with lock:
                if command[0] == "reset":
                    texts.clear()
                    counts.update(received=0, authorized=0, last=0.0)
                    connector.reset()
                    connector.subscribe(count)
                    answer: dict = {"ok": True}
                else:
                    answer = {
                        "received": counts["received"],
                        "authorized": counts["authorized"],
                        "distinct": len(texts),
                        "idle_for": time.monotonic() - counts["last"] if counts["last"] else None,
                    }
                    if command[1:] == ["texts"]:
                        answer["texts"] = dict(texts)
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
