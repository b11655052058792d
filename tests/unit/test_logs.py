"""shared/logs.py: the app, not only the local host, holds the Azure SDK quiet and MSAL
silent."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_app_holds_the_azure_sdk_at_warning_and_silences_msal():
    # A fresh interpreter, as the worker imports the function: no test setup in between.
    code = (
        "import logging, messages_function\n"
        "for name in ('azure.core.pipeline.policies.http_logging_policy', 'azure.storage.blob',"
        " 'azure.identity', 'msal'):\n"
        "    print(name, logging.getLogger(name).getEffectiveLevel())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    levels = {
        name: int(level) for name, level in (line.split() for line in result.stdout.splitlines())
    }
    # MSAL's error lines quote the token endpoint's answer (it may echo the secret).
    assert levels.pop("msal") > logging.CRITICAL
    assert levels and all(level == logging.WARNING for level in levels.values()), levels


def test_a_repeated_warning_is_logged_once_a_minute_per_cause_with_how_many_were_held():
    from shared.logs import Repeated, held_back

    now = [0.0]
    repeated = Repeated(60.0, clock=lambda: now[0])
    assert repeated.due("credentials MicrosoftAppPassword") == 0  # the first is logged
    assert [repeated.due("credentials MicrosoftAppPassword") for _ in range(3)] == [None] * 3
    assert repeated.due("storage 503") == 0  # another cause has its own minute
    now[0] = 59.9
    assert repeated.due("credentials MicrosoftAppPassword") is None
    now[0] = 60.0
    count = repeated.due("credentials MicrosoftAppPassword")
    assert count == 4
    assert held_back(count) == " (4 more like this since the last such line)"
    assert held_back(0) == ""


def test_the_cause_of_a_storage_failure_is_alike_for_every_message_that_meets_it():
    from shared.logs import storage_cause
    from shared.references import StoreError
    from shared.references.contract import short_key

    def cause(text: str, **fields) -> str:
        return storage_cause(StoreError(text, **fields))

    # Texts as the stores write them: the ledger names blobs by path, or a name's tail
    # quoted; the reference store quotes keys with short_key (repr, clipped), and a key is
    # whatever the client chose: its words never enter the cause.
    ledger = "proactive ledger: create proactive/{}/head.json failed: storage unreachable (OSError)"
    assert cause(ledger.format("bcmVxLTA")) == cause(ledger.format("bcmVxLTE"))
    kept = "proactive ledger: {!r} kept changing; outcome not recorded"
    assert cause(kept.format("OC1WbTVie.json")) == cause(kept.format("YU9Hcmt.json"))
    unreachable = "reference store: get {} failed: storage unreachable (OSError)"
    keys = ["msteams/a:1", "webchat/x'a\"y timed out", "webchat/HTTP 500", "webchat/" + "b" * 400]
    # clip() cutting right after an escape's backslash (the key's 199th character a \n).
    keys += [f"webchat/{'z' * (189 + n)}\n{'w' * 100}" for n in range(3)]
    assert len({cause(unreachable.format(short_key(key))) for key in keys}) == 1
    timed_out = "reference store: upsert {} timed out after {}s"
    assert cause(timed_out.format(short_key("msteams/a:1"), 4)) == cause(
        timed_out.format(short_key("webchat/" + "c" * 400), 10)
    )
    # Told apart: another kind of failure, another status.
    kinds = {
        cause(timed_out.format(short_key("k"), 4)),
        cause(unreachable.format(short_key("k"))),
        cause(ledger.format("x")),
        cause("reference store: get 'k' failed: the answer could not be read (TypeError)"),
        cause("state store: write failed: HTTP 503 (HttpResponseError)"),
        cause("state store: write failed: HTTP 500 (HttpResponseError)"),
        cause("state store: container botstate keeps vanishing"),
        cause("state store: delete: storage authentication failed (ClientAuthenticationError)"),
    }
    assert len(kinds) == 8
