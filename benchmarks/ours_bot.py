"""Our bot, driven the way the Azure Functions Python worker drives it.

:func:`handle` builds a real ``azure.functions.HttpRequest`` and calls
``messages_function.main`` on the running event loop (the worker awaits async functions on
its loop), so the benchmark times our code, not the local dev host.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import azure.functions as func

import messages_function

URL = "http://127.0.0.1:7071/api/messages"


async def handle(body: bytes, headers: Mapping[str, str]) -> int:
    request = func.HttpRequest(method="POST", url=URL, headers=dict(headers), body=body)
    response = messages_function.main(request)
    if inspect.isawaitable(response):
        response = await response
    return response.status_code
