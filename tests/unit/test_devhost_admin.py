"""The local host's admin endpoints answer this machine only (tools/devhost/http.py)."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp import web

from tools.devhost.http import build_web_app
from tools.devhost.invoker import Outcome


def _this_machines_address() -> str | None:
    """An address of this machine other than loopback (the one its default route uses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: a UDP connect picks a route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


FORWARDED = ("X-Forwarded-For", "x-forwarded-proto", "Forwarded", "Via", "CF-Connecting-IP")


async def test_a_function_is_run_by_hand_only_from_this_machine():
    # Served beyond loopback (`--host 0.0.0.0`), the admin endpoint ran a function for
    # anyone on the network who addressed the machine by its IP (a Host the rebinding
    # check takes): a broadcast, signed with the bot's token. Azure asks for the master
    # key; this host has none.
    address = _this_machines_address()
    if address is None:
        pytest.skip("this machine has no address beyond loopback")
    runs: list[str] = []

    async def proactive(text: str) -> Outcome:
        runs.append(text)
        return Outcome("run", True)

    app = build_web_app([], None, manual_triggers={"proactive_function": proactive})
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "0.0.0.0", 0)
    await site.start()
    port = runner.addresses[0][1]
    body = {"input": '{"to": {"broadcast": {}}, "text": "hi"}'}
    try:
        async with aiohttp.ClientSession() as session:
            answers = {}
            for host in (address, "127.0.0.1"):
                url = f"http://{host}:{port}/admin/functions/proactive_function"
                async with session.post(url, json=body) as answer:
                    answers[host] = answer.status
            # Through a tunnel to this host (to test with Teams): a local connection, and
            # Dev Tunnels name the host `localhost`, but the caller is anywhere.
            url = f"http://127.0.0.1:{port}/admin/functions/proactive_function"
            for forwarded in FORWARDED:
                headers = {"Host": f"localhost:{port}", forwarded: "203.0.113.9"}
                async with session.post(url, json=body, headers=headers) as answer:
                    answers[forwarded] = answer.status
    finally:
        await runner.cleanup()
    assert answers == {address: 403, "127.0.0.1": 202, **dict.fromkeys(FORWARDED, 403)}
    assert runs == [body["input"]]
