"""Pacing against a far Connector: ``python -m benchmarks.far_connector``.

    .venv/bin/python -m benchmarks.far_connector [--spread 0.8] [--seconds 30]
                                                 [--limit 15] [--senders 24]

One process broadcasts through the Connector client's background view into botsim's fake
Connector, which enforces ``--limit`` requests per second per Teams tenant in a strict 1-s
window (429 above it) and answers each request 50 ms + up to ``--spread`` seconds after it
arrived, as a far Connector with its own jitter would. Real aiohttp both ways, the pacer
as deployed (``BOT_CONNECTOR_RATE_LIMIT`` = ``--limit``). Prints the share of the limit
that reached the Connector from the 5th second on, and the 429s. A pacing that took a
slow answer for a late departure loses rate here; one that counts requests from when they
left does not (benchmarks/README.md, "Pacing against a far Connector").
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from aiohttp import web

from shared.config import Settings
from shared.connector import ConnectorClient, ConnectorError
from shared.windows import Window
from tools.botsim.connector import FakeConnector

START_SECONDS = 5.0  # the first seconds, before the line is full, are not counted


class FarConnector(FakeConnector):
    """The fake Connector, answering each request 50 ms + up to ``spread`` s late."""

    def __init__(self, spread: float, seed: int, **options) -> None:
        super().__init__(**options)
        self._spread = spread
        self._rng = random.Random(seed)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = await super()._handle(request)
        await asyncio.sleep(0.05 + self._rng.random() * self._spread)
        return response


async def broadcast(spread: float, seconds: float, limit: int, senders: int) -> dict:
    with FarConnector(spread, seed=1, tenant_limit=Window(limit, 1.0)) as fake:
        settings = Settings.from_env(
            {
                "BOT_ALLOW_UNAUTHENTICATED": "true",
                "BOT_TRUSTED_SERVICE_URLS": fake.url,
                "BOT_CONNECTOR_RATE_LIMIT": str(limit),
            }
        )
        client = ConnectorClient(settings, None)
        background = client.background()
        conversations = iter(range(10**9))
        start = time.monotonic()
        failed = 0

        async def sender() -> None:
            nonlocal failed
            while time.monotonic() - start < seconds:
                conversation = {"id": f"a:{next(conversations)}", "tenantId": "far"}
                activity = {"channelId": "msteams", "conversation": conversation, "text": "x"}
                try:
                    await background.send_to_conversation(fake.url, conversation["id"], activity)
                except ConnectorError:
                    failed += 1

        try:
            await asyncio.gather(*(sender() for _ in range(senders)))
        finally:
            await client.close()
        counted = [
            r
            for r in fake.requests
            if r.status == 200 and start + START_SECONDS <= r.time < start + seconds
        ]
        return {
            "spread": spread,
            "share_of_limit": len(counted) / (seconds - START_SECONDS) / limit,
            "throttled": len(fake.violations),
            "requests": len(fake.requests),
            "failed": failed,
        }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.far_connector", description=__doc__)
    parser.add_argument("--spread", type=float, default=0.8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--limit", type=int, default=15)
    parser.add_argument("--senders", type=int, default=24)
    args = parser.parse_args()
    outcome = asyncio.run(broadcast(args.spread, args.seconds, args.limit, args.senders))
    print(
        f"answers 50 ms + up to {outcome['spread']:g} s: "
        f"{outcome['share_of_limit']:.1%} of {args.limit}/s from {START_SECONDS:g} s on; "
        f"429s {outcome['throttled']} of {outcome['requests']} requests; "
        f"failed {outcome['failed']}"
    )


if __name__ == "__main__":
    main()
