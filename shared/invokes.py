"""The answers Teams expects to card and dialog invokes, as :class:`InvokeResponse`.

``adaptiveCard/action`` (Universal Actions) is answered with HTTP 200 and a body
``{"statusCode", "type", "value"}``: a card that replaces the one pressed
(:func:`card_response`), a message (:func:`card_text_response`), or an error
(:func:`card_error`: the error's status goes in ``statusCode``, the HTTP answer stays 200
so the client reads the body and shows the bot's message, as Teams Toolkit answers).

``task/fetch`` / ``task/submit`` (Teams dialogs) are answered with
``{"task": {"type": "continue", "value": {...}}}`` to show a dialog (:func:`task_card`,
:func:`task_url`) or ``{"task": {"type": "message", "value": text}}`` (:func:`task_message`).
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from shared.cards import ADAPTIVE_CARD, card_attachment, card_content
from shared.router import InvokeResponse

MESSAGE_RESPONSE = "application/vnd.microsoft.activity.message"
ERROR_RESPONSE = "application/vnd.microsoft.error"


def card_response(card: Mapping[str, Any]) -> InvokeResponse:
    """Answer an ``adaptiveCard/action``: this card (or its attachment) replaces the one
    that was pressed."""
    return _card_invoke(200, ADAPTIVE_CARD, card_content(card))


def card_text_response(text: str) -> InvokeResponse:
    """Answer an ``adaptiveCard/action`` with a short message shown to the user."""
    return _card_invoke(200, MESSAGE_RESPONSE, text)


def card_error(status: int, message: str, *, code: str | None = None) -> InvokeResponse:
    """Answer an ``adaptiveCard/action`` with an error the client shows (status 4xx/5xx);
    its `code` is the status's name (403: Forbidden) unless given."""
    if not 400 <= status <= 599:
        raise ValueError("card_error takes a 4xx or 5xx status")
    if code is None:
        try:
            code = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
        except ValueError:  # a status without a name
            code = "BadRequest" if status < 500 else "InternalServerError"
    return _card_invoke(status, ERROR_RESPONSE, {"code": code, "message": message})


def _card_invoke(status: int, kind: str, value: Any) -> InvokeResponse:
    return InvokeResponse(200, {"statusCode": status, "type": kind, "value": value})


def task_card(
    card: Mapping[str, Any],
    *,
    title: str | None = None,
    height: int | str | None = None,
    width: int | str | None = None,
) -> InvokeResponse:
    """Answer ``task/fetch`` (or ``task/submit``, to go on) with a dialog showing `card`, an
    Adaptive Card or its attachment (``height``/``width``: pixels, or "small" | "medium" |
    "large")."""
    return _task_continue({"card": card_attachment(card)}, title, height, width)


def task_url(
    url: str,
    *,
    title: str | None = None,
    height: int | str | None = None,
    width: int | str | None = None,
    fallback_url: str | None = None,
) -> InvokeResponse:
    """Answer ``task/fetch`` with a dialog showing a web page (its host must be in the
    app manifest's validDomains)."""
    value: dict[str, Any] = {"url": url}
    if fallback_url is not None:
        value["fallbackUrl"] = fallback_url
    return _task_continue(value, title, height, width)


def task_message(text: str) -> InvokeResponse:
    """Answer ``task/submit`` (or ``task/fetch``) with a message; the dialog closes."""
    return InvokeResponse(200, {"task": {"type": "message", "value": text}})


def _task_continue(
    value: dict[str, Any], title: str | None, height: int | str | None, width: int | str | None
) -> InvokeResponse:
    for name, given in (("title", title), ("height", height), ("width", width)):
        if given is not None:
            value[name] = given
    return InvokeResponse(200, {"task": {"type": "continue", "value": value}})
