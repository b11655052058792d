"""benchmarks/broadcast.py's counting of what reached the fake Connector, on made-up counts.

No host, Azurite or Connector runs here: ``run_once`` gets stand-ins for the host
processes and the services, and the broadcast's outcome as the polling loop returns it.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import broadcast, warm

TEXT = "news 0123abcd"


class Server:
    def cpu_seconds(self) -> float:
        return 1.0

    def memory_kib(self) -> dict[str, int]:
        return {"VmHWM": 80 * 1024}

    def stop(self) -> None:
        pass


class Connector:
    def __init__(self, texts: dict[str, int]) -> None:
        self.texts = texts

    def reset(self) -> None:
        pass

    def conversations_with(self, text: str) -> int:
        return len({key for key in self.texts if key.endswith(f"|{text}")})

    def stats(self, texts: bool = False) -> dict[str, Any]:
        answer = {
            "received": sum(self.texts.values()),
            "authorized": sum(self.texts.values()),
            "distinct": len(self.texts),
            "idle_for": 1.0,
            "throttled": 0,
        }
        if texts:
            answer |= {"texts": dict(self.texts), "throttled_texts": {}}
        return answer


class Services:
    def __init__(self, texts: dict[str, int]) -> None:
        self.connector = Connector(texts)

    def storage_cpu_seconds(self) -> float:
        return 0.0


@pytest.fixture
def run_once(monkeypatch):
    """``broadcast.run_once`` over 3 seeded conversations, the Connector having received
    ``texts``; the report says all 3 were delivered."""

    async def listening(server: Any) -> float:
        return 0.0

    async def polled(settings: Any, text: str, *args: Any) -> dict[str, Any]:
        report = {"state": "done", "targets": 3, "delivered": 3, "failed": 0}
        return {
            "text": TEXT,
            "started": 0.0,
            "seconds": 10.0,
            "report": report,
            "report_reads_failed": 0,
            "report_reads": [],
            "timeline": [],
        }

    monkeypatch.setattr(warm, "spawn", lambda *args, **kwargs: Server())
    monkeypatch.setattr(warm, "wait_listening", listening)
    monkeypatch.setattr(broadcast, "broadcast", polled)

    def run(texts: dict[str, int]) -> dict[str, Any]:
        env = {"BOT_ALLOW_UNAUTHENTICATED": "true"}
        return broadcast.run_once(Services(texts), env, 1, 3, 60.0)

    return run


def conversation(n: int) -> str:
    return broadcast.reference("", "", n)["conversation"]["id"]


def key(n: int, text: str = TEXT) -> str:
    return f"{conversation(n)}|{text}"


def test_a_missed_conversation_is_lost_even_when_another_got_a_second_text(run_once):
    # Conversation 1 never got the broadcast; conversation 2 also got a request due later:
    # 3 requests, 3 different conversation + text pairs, yet one conversation lost.
    result = run_once({key(0): 1, key(2): 1, key(2, "later"): 1})

    assert (result["received"], result["distinct"]) == (3, 3)
    assert (result["lost"], result["duplicated"]) == (1, 0)
    assert result["other_texts_received"] == 1
    assert result["other_texts_sample"] == [f"{conversation(2)}: later"]
    assert result["connector_delivered"] == 2


def test_a_second_copy_is_a_duplicate_and_the_text_elsewhere_is_another_text(run_once):
    stray = "19:someone-else@thread.tacv2"
    result = run_once({key(0): 2, key(1): 1, key(2): 1, f"{stray}|{TEXT}": 1})

    assert (result["lost"], result["duplicated"]) == (0, 1)
    assert result["other_texts_received"] == 1
    assert result["connector_delivered"] == 3
    assert result["sends_per_s"] == 0.3  # delivered conversations over the 10 s


def test_every_conversation_once_and_nothing_else(run_once):
    result = run_once({key(n): 1 for n in range(3)})

    assert (result["lost"], result["duplicated"]) == (0, 0)
    assert (result["connector_delivered"], result["other_texts_received"]) == (3, 0)
