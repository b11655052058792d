"""HTTP trigger `POST /api/messages`: adapts the Functions request to shared.messages,
with the app's runtime (app.py names the bot)."""

from __future__ import annotations

import azure.functions as func

from app import runtime
from shared.http import HttpRequest
from shared.messages import handle_messages


async def main(req: func.HttpRequest) -> func.HttpResponse:
    request = HttpRequest.create(req.method, dict(req.headers), req.get_body(), req.url)
    response = await handle_messages(request, runtime)
    content_type = response.headers.get("Content-Type", "text/plain")
    return func.HttpResponse(
        response.body,
        status_code=response.status,
        headers=response.headers,
        mimetype=content_type.split(";", 1)[0].strip(),
    )
