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


def test_the_cause_of_a_storage_failure_is_its_text_without_what_differs_per_message():
    from shared.logs import without_names

    # The stores' own texts: the ledger names blobs by path, the reference store quotes
    # keys (clip() cuts a long one before its closing quote).
    ledger = "proactive ledger: create proactive/{}/head.json failed: storage unreachable (OSError)"
    assert without_names(ledger.format("bcmVxLTA")) == without_names(ledger.format("bcmVxLTE"))
    timed_out = without_names("reference store: upsert 'msteams/a:1' timed out after 4s")
    assert timed_out == without_names("reference store: upsert 'msteams/b:2' timed out after 10s")
    cut = "reference store: upsert 'msteams/" + "x" * 300
    assert without_names(cut + "...(320 chars)") == without_names(cut + "y...(321 chars)")
    refused = without_names("reference store: get 'msteams/a:1' failed: no credential (role)")
    assert refused != timed_out != without_names(ledger.format("x"))
