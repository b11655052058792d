"""benchmarks/warm.py's bookkeeping, on made-up counts: no bot, Azurite or Connector runs."""

from __future__ import annotations

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
