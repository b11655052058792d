"""benchmarks/cold_start.py's rounds: each in another order, so that no bot always runs first."""

from __future__ import annotations

from pathlib import Path

from benchmarks import cold_start


def bots(*keys: str) -> list[cold_start.Bot]:
    return [cold_start.Bot(k, k, Path("python"), "m", "m", ()) for k in keys]


def test_each_round_rotates_the_order_by_one_bot():
    a, b, c = bots("a", "b", "c")

    orders = [[bot.key for bot in cold_start.round_order([a, b, c], n)] for n in range(4)]

    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert cold_start.round_order([], 3) == []


def test_the_measured_rounds_run_in_turn_and_the_warm_up_is_discarded():
    calls: list[str] = []

    def measure(bot: cold_start.Bot) -> int:
        calls.append(bot.key)
        return len(calls)

    samples = cold_start.interleaved(bots("a", "b", "c"), 3, measure)

    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert samples == {"a": [4, 9, 11], "b": [5, 7, 12], "c": [6, 8, 10]}
