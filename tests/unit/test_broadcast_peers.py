"""The peers' broadcast harness: the loop each SDK runs, and what is counted at the fake Connector.

The SDKs themselves run only in their own venvs under .tools (`python -m
benchmarks.broadcast_peers`); here the loop gets a plain async ``send``, and the counting
runs against botsim's fake Connector over HTTP, its tenant limit enforced.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp
import yarl

from benchmarks import broadcast_peers
from benchmarks.connector_process import throttled_texts
from benchmarks.peers import broadcast_loop
from shared.windows import Window
from tools.botsim.connector import FakeConnector


class Throttled(Exception):
    status = 429


def references(count: int) -> list[dict]:
    return [{"conversation": {"id": f"c{n}"}} for n in range(count)]


class InFlight:
    """Counts the sends under way, and the most at once."""

    def __init__(self) -> None:
        self.now = self.most = 0

    async def __aenter__(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    async def __aexit__(self, *exc: object) -> None:
        self.now -= 1


async def test_the_sequential_loop_sends_one_at_a_time_and_counts_failures_by_status():
    in_flight, sent = InFlight(), []

    async def send(reference: dict, text: str) -> None:
        async with in_flight:
            await asyncio.sleep(0)
        if reference["conversation"]["id"] in ("c1", "c3"):
            raise Throttled
        if reference["conversation"]["id"] == "c4":
            raise RuntimeError("boom")
        sent.append((reference["conversation"]["id"], text))

    result = await broadcast_loop.run(send, references(6), "hi", concurrency=1)

    assert in_flight.most == 1
    assert sent == [("c0", "hi"), ("c2", "hi"), ("c5", "hi")]  # the loop went on, no resend
    assert result["attempted"] == 6 and result["failed"] == 3
    assert result["failures"] == {"429": 2, "RuntimeError": 1}
    assert result["peak_rss_mib"] > 0 and result["seconds"] >= 0


async def test_the_gathered_loop_keeps_at_most_n_in_flight():
    in_flight = InFlight()

    async def send(reference: dict, text: str) -> None:
        async with in_flight:
            await asyncio.sleep(0.001)

    result = await broadcast_loop.run(send, references(40), "hi", concurrency=8)

    assert in_flight.most == 8
    assert result["failed"] == 0 and result["attempted"] == 40


def test_an_sdk_exception_is_counted_by_the_status_it_carries_under_any_name():
    class Response:
        status_code = 503

    class WithResponse(Exception):
        response = Response()

    assert broadcast_loop.status_of(WithResponse()) == "503"
    assert broadcast_loop.status_of(Throttled()) == "429"
    assert broadcast_loop.status_of(ValueError()) == "ValueError"


async def test_the_connector_counts_tell_retried_from_lost_and_spot_other_texts():
    # Tenant t1 admits 2 requests per 10 s: a third conversation is answered 429.
    async with aiohttp.ClientSession() as http:
        with FakeConnector(tenant_limit=Window(2, 10.0)) as fake:
            fake.conversation_tenants = {"a": "t1", "b": "t1", "c": "t1", "d": "t2", "e": "t3"}

            async def post(conversation: str, text: str) -> int:
                path = f"/v3/conversations/{conversation}/activities"
                async with http.post(yarl.URL(fake.url + path), json={"text": text}) as r:
                    return r.status

            statuses = [await post(c, "news") for c in ("a", "b", "c", "d")]
            statuses.append(await post("d", "news"))  # sent twice: a duplicate
            statuses.append(await post("e", "Exception caught : 429"))  # an error text
            received = Counter(
                f"{r.conversation_id}|{r.json['text']}" for r in fake.requests if r.status == 200
            )
            stats = {"texts": received, "throttled_texts": throttled_texts(fake)}

    assert statuses == [200, 200, 429, 200, 200, 200]
    counted = broadcast_peers.count_texts(stats, "news")
    assert counted["delivered"] == 3 and counted["duplicated"] == 1
    assert (counted["conversations_429"], counted["lost_to_429"]) == (1, 1)
    assert counted["retried_after_429"] == 0
    assert counted["other_texts"] == 1
    assert counted["other_sample"] == ["Exception caught : 429"]
    assert broadcast_peers.retries_429(counted) == "no"


def test_the_retry_verdict_follows_what_became_of_the_conversations_answered_429():
    def verdict(conversations: int, retried: int, lost: int) -> str:
        counted = {
            "conversations_429": conversations,
            "retried_after_429": retried,
            "lost_to_429": lost,
        }
        return broadcast_peers.retries_429(counted)

    assert verdict(0, 0, 0) == "not exercised (no 429 drawn)"
    assert verdict(5, 5, 0) == "yes"
    assert verdict(5, 0, 5) == "no"
    assert verdict(5, 2, 3).startswith("partly")


def results() -> tuple[dict, dict]:
    """A peers' report and ours, as broadcast_peers.py and broadcast.py write them."""
    machine = {"cpus": 2, "python": "3.11", "platform": "x"}
    peers = {
        "generated": "g",
        "command": "c",
        "machine": {**machine, "load_average_1m_start": 1.0, "load_average_1m_end": 2.0},
        "conversations": 100,
        "tenants": 2,
        "tenant_limit_per_s": 50,
        "enforced_rate_per_s": 100,
        "runs": [
            {
                "label": "Agents SDK 1.9.0",
                "mode": "sequential loop",
                "sends_per_s": 60.0,
                "achieved_share_of_enforced": 0.6,
                "attempts_per_s": 80.0,
                "delivered": 75,
                "lost": 25,
                "duplicated": 0,
                "throttled_429": 25,
                "retries_429": "no",
                "other_texts_received": 3,
                "cpu_ms_per_send": 4.0,
                "peak_rss_mib": 70.0,
            }
        ],
    }
    ours = {
        "generated": "g0",
        "command": "c0",
        "machine": {**machine, "load_average_1m_start": 1.0},
        "conversations": 200,
        "runs": [
            {
                "processes": 1,
                "seconds": 10.0,
                "sends_per_s": 30.0,
                "achieved_share_of_enforced": 0.3,
                "received": 200,
                "throttled_429": 0,
                "delivered": 200,
                "lost": 0,
                "duplicated": 0,
                "host_cpu_ms_per_send": 8.0,
                "peak_rss_mib": [80.0],
            }
        ],
    }

    free_run = {"mode": "gather", "sends_per_s": 400.0, "achieved_share_of_enforced": None}
    peers["unthrottled"] = [{**peers["runs"][0], **free_run, "cpu_ms_per_send": 2.0}]
    ours_free = {k: v for k, v in ours["runs"][0].items() if k != "achieved_share_of_enforced"}
    ours["unthrottled"] = {**ours_free, "sends_per_s": 100.0, "host_cpu_ms_per_send": 5.0}
    return peers, ours


def test_the_table_puts_ours_first_and_divides_ours_by_theirs():
    peers, ours = results()

    table = broadcast_peers.markdown(peers, ours)

    limited, free = table.split("No limits enforced")
    rows = [line for line in limited.splitlines() if line.startswith(("| ours", "| Agents"))]
    assert rows[0].startswith("| ours, queue pipeline, 1 host process")
    assert rows[1].startswith("| Agents SDK 1.9.0, sequential loop | 60.0 | 60 % | 80.0 | 75 | 25")
    assert rows[1].endswith("| 0.50 | 2.00 |")  # 30 / 60 delivered/s, 8 / 4 ms CPU
    assert "Not the same size" in limited
    rows = [line for line in free.splitlines() if line.startswith(("| ours", "| Agents"))]
    assert rows[0].startswith("| ours, queue pipeline, 1 host process | 100.0 | — |")
    assert rows[1].startswith("| Agents SDK 1.9.0, gather | 400.0")
    assert rows[1].endswith("| 0.25 | 2.50 |")  # against ours with no limits: 100 / 400, 5 / 2


def test_the_chart_shows_each_run_delivered_lost_and_cpu_with_no_limits_apart():
    peers, ours = results()
    # Ours: 2 of the 200 targets never reached the Connector (whatever the report said),
    # and Azurite spent 9 ms per send beside the host's 8.
    ours["runs"][0].update(targets=200, distinct=198, azurite_cpu_ms_per_send=9.0)

    series = broadcast_peers.chart_series(peers, ours)

    assert series["enforced_rate_per_s"] == 100
    assert series["limited"] == [
        {
            "label": "ours, 1 host(s)",
            "delivered_per_s": 30.0,
            "lost_percent": 1.0,
            "cpu_ms_per_send": 8.0,
            "storage_cpu_ms_per_send": 9.0,
        },
        {
            "label": "Agents SDK, sequential",
            "delivered_per_s": 60.0,
            "lost_percent": 25.0,
            "cpu_ms_per_send": 4.0,
            "storage_cpu_ms_per_send": 0.0,
        },
    ]
    assert [(bar["label"], bar["delivered_per_s"]) for bar in series["unthrottled"]] == [
        ("ours, 1 host", 100.0),
        ("Agents SDK, gather", 400.0),
    ]
    assert "Broadcast to 100 Teams conversations" in series["title"]


def test_ours_counts_are_the_connectors_by_text_and_unrecorded_other_texts_show_as_such():
    peers, ours = results()
    # A run as broadcast.py records it now: 198 of the 200 stored conversations received
    # the text, 3 other texts arrived; 200 distinct conversation + text pairs in all.
    ours["runs"][0].update(
        targets=200, distinct=201, connector_delivered=198, lost=2, other_texts_received=3
    )

    (ours_bar, _) = broadcast_peers.chart_series(peers, ours)["limited"]
    table = broadcast_peers.markdown(peers, ours)
    ours_row = next(line for line in table.splitlines() if line.startswith("| ours"))

    assert ours_bar["lost_percent"] == 1.0
    cells = [cell.strip() for cell in ours_row.split("|")]
    assert (cells[5], cells[6], cells[10]) == ("198", "2", "3")  # delivered, lost, other texts

    # A run recorded before: its other texts were not counted, which the table says.
    for name in ("connector_delivered", "other_texts_received"):
        del ours["runs"][0][name]
    table = broadcast_peers.markdown(peers, ours)
    ours_row = next(line for line in table.splitlines() if line.startswith("| ours"))
    assert [cell.strip() for cell in ours_row.split("|")][10] == "—"
    assert "predate counting by conversation and text" in table


def test_the_loop_records_what_loading_the_references_added_to_its_memory(tmp_path, capsys):
    path = tmp_path / "references.json"
    path.write_text(
        json.dumps([{"conversation": {"id": f"c{n}", "pad": "x" * 400}} for n in range(20_000)])
    )
    sent: list[str] = []

    async def send(reference: dict, text: str) -> None:
        sent.append(reference["conversation"]["id"])

    broadcast_loop.main(send, [str(path), "hi", "1"])

    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(sent) == 20_000
    assert result["references_rss_mib"] >= 5  # 20,000 dicts with 400-character strings: ~14 MiB
    assert result["peak_rss_mib"] >= result["references_rss_mib"]


def test_the_table_says_the_peers_peak_rss_holds_the_references_they_loaded():
    peers, ours = results()

    table = broadcast_peers.markdown(peers, ours)
    assert "peak RSS MiB (peers: with the references loaded)" in table
    assert "includes the 100 references its loop loads" in table
    assert "not measured in this run" in table

    peers["runs"][0]["references_rss_mib"] = 16.7
    peers["unthrottled"][0]["references_rss_mib"] = 15.9
    assert "added to its RSS, 15.9-16.7 MiB" in broadcast_peers.markdown(peers, ours)
