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

    def cause(text: str, **fields) -> str:
        return storage_cause(StoreError(text, **fields))

    # The stores' own texts: the ledger names blobs by path or by a name's tail, the
    # reference store quotes keys (clip() cuts a long one), the state store names a status.
    ledger = "proactive ledger: create proactive/{}/head.json failed: storage unreachable (OSError)"
    assert cause(ledger.format("bcmVxLTA")) == cause(ledger.format("bcmVxLTE"))
    kept = "proactive ledger: {!r} kept changing; outcome not recorded"
    assert cause(kept.format("OC1WbTVie.json")) == cause(kept.format("YU9Hcmt.json"))
    timed_out = cause("reference store: upsert 'msteams/a:1' timed out after 4s")
    quotes = "reference store: upsert 'webchat/x\\'a\"y' timed out after 4s"
    clipped = "reference store: upsert 'msteams/b" + "x" * 300 + "...(320 chars) timed out after 4s"
    assert timed_out == cause(clipped)
    assert cause(quotes) == timed_out
    # Told apart: another kind, another status.
    kinds = {
        timed_out,
        cause(ledger.format("x")),
        cause("reference store: get 'k' failed: the answer could not be read (TypeError)"),
        cause("reference store: get 'k' failed: no credential (role)"),
        cause("state store: write failed: HTTP 503 (HttpResponseError)"),
        cause("state store: write failed: HTTP 500 (HttpResponseError)"),
        cause("reference store: get 'k' failed: HTTP 403 AuthorizationFailure", status=403),
    }
    assert len(kinds) == 7
