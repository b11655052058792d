"""benchmarks/warm.py's bookkeeping, on made-up counts: no bot, Azurite or Connector runs."""

from __future__ import annotations

import json
import urllib.request

from benchmarks import warm


def texts(*keys: str) -> dict:
    return {"texts": dict.fromkeys(keys, 1)}


def test_an_echo_counts_only_in_the_conversation_its_message_was_sent_to():
    # Mixed workload: message 4 goes to group conversation shared-2, message 5 to its own
    # new-R-5. Each echo here arrived in another conversation: neither is echoed, and both
    # replies are other texts (a reply in the wrong conversation reached the wrong people).
    echoes = warm._echoes(texts("shared-0|Echo: m-R-4", "shared-2|Echo: m-R-5"), "R")

    assert echoes["echoed"] == set()
    assert (echoes["distinct"], echoes["duplicated"], echoes["other"]) == (0, 0, 2)


def test_a_copy_in_the_right_conversation_is_a_duplicate_and_one_elsewhere_another_text():
    received = texts("shared-2|Echo: m-R-4", "shared-3|Echo: m-R-4", "shared-0|Sorry")
    received["texts"]["new-R-5|Echo: m-R-5"] = 2

    echoes = warm._echoes(received, "R")

    assert echoes["echoed"] == {"4", "5"}
    assert (echoes["distinct"], echoes["duplicated"], echoes["other"]) == (2, 1, 2)


def test_the_group_only_workload_expects_every_echo_in_a_group_conversation():
    # --shared-only: message 5 goes to shared-2 as well, not to a conversation of its own.
    received = texts("shared-2|Echo: m-S-5", "new-S-7|Echo: m-S-7")

    echoes = warm._echoes(received, "S", "shared")

    assert echoes["echoed"] == {"5"} and echoes["other"] == 1


def post(url: str, conversation: str, authorization: str | None) -> int:
    request = urllib.request.Request(
        f"{url}/v3/conversations/{conversation}/activities",
        data=json.dumps({"type": "message", "text": "hi"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if authorization is not None:
        request.add_header("Authorization", authorization)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status


def test_a_reply_is_authorized_only_with_a_token_the_fake_aad_issued():
    issued = "eyJ-issued-by-the-fake-aad-0123456789"
    checked: list[str] = []

    def is_valid_token(token: str) -> bool:
        checked.append(token)
        return token == issued

    connector = warm.ConnectorProcess(token_check=is_valid_token)
    try:
        statuses = [
            post(connector.url, "a", f"Bearer {issued}"),
            post(connector.url, "b", f"Bearer {issued}"),
            post(connector.url, "c", "Bearer made-up-token-long-enough-to-pass"),
            post(connector.url, "d", None),
        ]
        stats = warm._settled(connector, expected=4)
    finally:
        connector.close()

    assert statuses == [200] * 4
    assert (stats["received"], stats["authorized"]) == (4, 2)
    assert "tokens" not in stats
    assert sorted(checked) == sorted([issued, "made-up-token-long-enough-to-pass"])  # once each


def report(warm_runs: dict, shared_runs: dict, **extra) -> dict:
    def target(runs: list[dict]) -> dict:
        level = {
            "activities_per_s": 100.0,
            "p99_ms": 10.0,
            "cpu_ms_per_activity": 2.0,
            "lost": sum(r["lost"] for r in runs),
            "duplicated": 0,
            "non_2xx": 0,
            "other_texts": 0,
            "runs": runs,
        }
        return {"peak_rss_mib": 80.0, "concurrency": {"8": level}}

    return {
        "generated": "g",
        "command": "c",
        "machine": {
            "cpus": 2,
            "platform": "p",
            "python": "3.11",
            "load_average_1m": {"start": 1.0, "end": 1.0},
        },
        "concurrencies": [8],
        "warm": {k: target(runs) for k, runs in warm_runs.items()},
        "warm_shared_only": {k: target(runs) for k, runs in shared_runs.items()},
        **extra,
    }


def table_row(table: str, starts: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {starts}"))
    return [cell.strip() for cell in line.split("|")[2:-1]]


def test_the_table_counts_losses_and_replies_without_a_token_in_both_workloads():
    def run(lost: int = 0, without_token: int = 0) -> dict:
        return {"lost": lost, "replies_without_token": without_token}

    measured = report(
        {"ours": [run()], "agents": [run(without_token=1)]},
        {"ours": [run(lost=2)], "agents": [run(without_token=3)]},
        token_check="a token the fake AAD issued",
    )

    table = warm.markdown(measured)

    assert table_row(table, "lost + duplicated")[:2] == ["2", "0"]
    assert table_row(table, "replies without a token the fake AAD issued")[:2] == ["0", "4"]
    # Results from before the check name what was counted then.
    del measured["token_check"]
    assert table_row(warm.markdown(measured), "replies without a Bearer header")[:2] == ["0", "4"]


def test_the_table_shows_cpu_with_the_storage_emulators_beside_the_bots_own():
    def run(cpu: float, storage: float) -> dict:
        return {"lost": 0, "cpu_ms_per_activity": cpu, "storage_cpu_ms_per_activity": storage}

    # Ours: 2 ms in its own process and 1.5 ms of Azurite's per activity (medians of the
    # runs' sums); the Agents SDK stores nothing: 4 ms, nothing of Azurite's.
    measured = report(
        {"ours": [run(2.0, 1.5), run(2.2, 1.4), run(1.8, 1.9)], "agents": [run(4.0, 0.0)]}, {}
    )
    measured["warm"]["agents"]["concurrency"]["8"]["cpu_ms_per_activity"] = 4.0

    table = warm.markdown(measured)

    own = table.index("| CPU ms per activity, the bot's process, concurrency 8")
    both = table.index("| CPU ms per activity, bot + storage (Azurite), concurrency 8")
    assert both == table.index("\n", own) + 1  # the next row
    assert table_row(table, "CPU ms per activity, the bot's process")[2] == "0.50"
    assert table_row(table, "CPU ms per activity, bot + storage") == ["3.60", "4.00", "0.90"]


def test_the_table_shows_how_often_each_bot_asked_the_token_endpoint():
    # A bot that keeps its token asks none while warm; one that builds its credential
    # for each turn asks once per reply, which shows in its CPU per activity.
    def run(ok: int, token_requests: int) -> dict:
        return {
            "activities_per_s": 100.0,
            "p50_ms": 5.0,
            "p99_ms": 10.0,
            "cpu_ms_per_activity": 2.0,
            "storage_cpu_ms_per_activity": 0.0,
            "lost": 0,
            "duplicated": 0,
            "sent": ok,
            "ok": ok,
            "token_requests": token_requests,
        }

    measured = report({}, {})
    measured["warm"] = {
        "ours": {"peak_rss_mib": 80.0, "concurrency": {"8": warm._summarize([run(500, 0)])}},
        "botbuilder": {
            "peak_rss_mib": 80.0,
            "concurrency": {"8": warm._summarize([run(40, 40), run(60, 60)])},
        },
    }

    assert table_row(warm.markdown(measured), "token requests per activity, concurrency 8")[:2] == [
        "0.00",
        "1.00",
    ]
    # Results from before it was counted have no such row.
    del measured["warm"]["botbuilder"]["concurrency"]["8"]["token_requests_per_activity"]
    measured["warm"]["ours"]["concurrency"]["8"]["token_requests_per_activity"] = None
    assert "token requests" not in warm.markdown(measured)
