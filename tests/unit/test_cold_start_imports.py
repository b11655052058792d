"""Cold start: importing messages_function, and handling an activity, load only what they need.

Each check runs in a fresh interpreter (the only way to see what an import really pulls
in) that calls ``messages_function.main`` with a real ``azure.functions.HttpRequest``, as
the Functions worker does, and reports which heavy packages ended up in ``sys.modules``.
Timings live in ``benchmarks/cold_start.py``, never here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("msal", "azure.identity", "azure.storage.blob", "azure.storage.queue", "aiohttp", "jwt")
_INHERITED_SETTINGS = ("MicrosoftApp", "BOT_", "AzureWebJobs")

# Imports the function, optionally handles one request (BODY / CONTENT_TYPE from the
# environment), then prints the status and the heavy packages loaded.
_CHILD = """
import asyncio, json, os, sys
import messages_function
imported = [m for m in sys.argv[1:] if m in sys.modules]
status = None
if "BODY" in os.environ:
    import azure.functions as func
    request = func.HttpRequest(
        method="POST",
        url="http://127.0.0.1:7071/api/messages",
        headers={"Content-Type": os.environ["CONTENT_TYPE"]},
        body=os.environ["BODY"].encode(),
    )
    status = asyncio.run(messages_function.main(request)).status_code
handled = [m for m in sys.argv[1:] if m in sys.modules]
print(json.dumps({"imported": imported, "status": status, "handled": handled}))
"""


def run_child(settings: dict[str, str], **request: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_SETTINGS)}
    env.pop("PYTHONPATH", None)
    env.update(settings)
    env.update({k.upper(): v for k, v in request.items()})
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, *HEAVY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def local_settings(connector_url: str, storage: str) -> dict[str, str]:
    return {
        "MicrosoftAppId": "",
        "BOT_ALLOW_UNAUTHENTICATED": "true",
        "BOT_TRUSTED_SERVICE_URLS": connector_url,
        "AzureWebJobsStorage": storage,
    }


def message(service_url: str, conversation_id: str = "conv-1") -> dict[str, Any]:
    return {
        "type": "message",
        "id": "act-1",
        "channelId": "msteams",
        "serviceUrl": service_url,
        "from": {"id": "user-1", "name": "User"},
        "recipient": {"id": "bot-1", "name": "Bot"},
        "conversation": {"id": conversation_id},
        "text": "hello",
    }


def test_importing_messages_function_loads_no_heavy_package():
    # An app with a real app id: nothing about auth or storage may load at import.
    settings = {"MicrosoftAppId": "00000000-0000-0000-0000-000000000001"}
    report = run_child(settings)

    assert report["imported"] == []


def test_a_rejected_request_loads_no_auth_or_storage_package():
    # Malformed JSON is answered 400 before auth: no token check, no storage, no token.
    settings = local_settings("http://127.0.0.1:9", "UseDevelopmentStorage=true")
    report = run_child(settings, body="{not json", content_type="application/json")

    assert report["status"] == 400
    unneeded = ("msal", "azure.identity", "azure.storage.blob", "azure.storage.queue", "jwt")
    assert [m for m in report["handled"] if m in unneeded] == []


@pytest.mark.integration
def test_first_unauthenticated_activity_loads_no_token_or_queue_client(
    azurite, fake_connector, unique_name
):
    settings = local_settings(fake_connector.url, azurite.connection_string)
    settings["BOT_REFERENCES_CONTAINER"] = unique_name("refs")
    body = json.dumps(message(fake_connector.url + "/", unique_name("conv")))

    report = run_child(settings, body=body, content_type="application/json")

    assert report["status"] == 200
    replies = fake_connector.requests
    assert len(replies) == 1
    assert "hello" in replies[0].json["text"]
    assert replies[0].json["replyToId"] == "act-1"
    assert replies[0].authorization is None  # local mode: no token is obtained or sent
    # No token needed, so MSAL and azure-identity stay unloaded; nothing is enqueued.
    for package in ("msal", "azure.identity", "azure.storage.queue"):
        assert package not in report["handled"], package


def test_the_product_venv_holds_neither_reference_sdk():
    # The benchmark installs them into its own venv; the product must not depend on them.
    assert importlib.util.find_spec("botbuilder") is None
    assert importlib.util.find_spec("microsoft_agents") is None
