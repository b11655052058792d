"""Cards: Adaptive Cards and hero cards as attachments, and the invoke answers Teams expects.

Plain dict builders (the card schema is JSON; a package would only add import time)::

    card = adaptive_card(
        [text_block("Count: 1", weight="Bolder")],
        actions=[execute_action("Add one", verb="increment")],
    )
    await turn.send(card)  # a card (or an attachment) is sent as a message

An ``Action.Execute`` press reaches the bot as an ``adaptiveCard/action`` invoke
(:meth:`shared.router.Router.card_action`); :mod:`shared.invokes` builds the answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from shared.activity import Activity, as_activity
from shared.wire import Attachment

ADAPTIVE_CARD = "application/vnd.microsoft.card.adaptive"
HERO_CARD = "application/vnd.microsoft.card.hero"
CARD_VERSION = "1.5"  # the newest schema Teams renders on every client
SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"


# ---------------------------------------------------------------------------- Adaptive Cards


def _many(values: Iterable[Any], name: str, one: type) -> Iterable[Any]:
    """`values`, refused when it is a single one of them (a URL string, an element): taken
    as a list, a string made an item of each character, and a dict one of each key."""
    if isinstance(values, one | str | bytes):
        raise TypeError(f"{name} takes a list, not a single {one.__name__}")
    return values


def _card_kind(card: Mapping[str, Any]) -> str:
    kind = card.get("type")
    return f"type {kind[:40]!r}" if isinstance(kind, str) else "no type"


def adaptive_card(
    body: Iterable[Mapping[str, Any]],
    *,
    actions: Iterable[Mapping[str, Any]] = (),
    version: str = CARD_VERSION,
    refresh: Mapping[str, Any] | None = None,
    **properties: Any,
) -> dict[str, Any]:
    """An Adaptive Card (the card itself; send it, or wrap it with :func:`card_attachment`).

    ``refresh`` (see :func:`refresh`) makes Teams ask the bot for an up-to-date card when
    the card is shown (Universal Actions' automatic refresh).
    """
    card: dict[str, Any] = {
        "type": "AdaptiveCard",
        "$schema": SCHEMA,
        "version": version,
        "body": [dict(element) for element in _many(body, "body", Mapping)],
    }
    actions = [dict(action) for action in _many(actions, "actions", Mapping)]
    if actions:
        card["actions"] = actions
    if refresh is not None:
        card["refresh"] = dict(refresh)
    card.update(properties)
    return card


def text_block(text: str, **properties: Any) -> dict[str, Any]:
    """A TextBlock (``wrap`` is on unless given: Teams cuts long lines otherwise)."""
    return {"type": "TextBlock", "text": text, "wrap": True, **properties}


def fact_set(facts: Mapping[str, str]) -> dict[str, Any]:
    return {"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in facts.items()]}


def execute_action(title: str, *, verb: str, data: Any = None, **properties: Any) -> dict:
    """An ``Action.Execute`` (Universal Actions): the bot gets an ``adaptiveCard/action``
    invoke with this `verb` and `data`, and its answer can replace the card."""
    action: dict[str, Any] = {"type": "Action.Execute", "title": title, "verb": verb}
    if data is not None:
        action["data"] = data
    action.update(properties)
    return action


def submit_action(title: str, *, data: Any = None, **properties: Any) -> dict[str, Any]:
    """An ``Action.Submit``: a message activity whose `value` is the inputs and `data`
    (with ``data={"msteams": {"type": "task/fetch"}}`` Teams opens a dialog instead)."""
    action: dict[str, Any] = {"type": "Action.Submit", "title": title}
    if data is not None:
        action["data"] = data
    action.update(properties)
    return action


def open_url_action(title: str, url: str) -> dict[str, Any]:
    return {"type": "Action.OpenUrl", "title": title, "url": url}


def refresh(verb: str, *, data: Any = None, user_ids: Iterable[str] | None = None) -> dict:
    """A card's ``refresh``: Teams invokes `verb` automatically when the card is shown. In
    a chat of up to 60 members it does so for everyone; in a larger one only for the
    `user_ids` listed (at most 60), the others seeing a button to refresh it."""
    action: dict[str, Any] = {"type": "Action.Execute", "verb": verb}
    if data is not None:
        action["data"] = data
    value: dict[str, Any] = {"action": action}
    if user_ids is not None:
        value["userIds"] = list(_many(user_ids, "user_ids", str))
    return value


def card_attachment(card: Mapping[str, Any]) -> Attachment:
    """An Adaptive Card as a message attachment (given the attachment, the same again)."""
    return {"contentType": ADAPTIVE_CARD, "content": card_content(card)}


def card_content(card: Mapping[str, Any]) -> dict[str, Any]:
    """The Adaptive Card itself, given the card or its attachment (:func:`card_attachment`);
    ValueError for an attachment of another kind (a hero card answers no card invoke)."""
    if "contentType" not in card:
        if card.get("type") != "AdaptiveCard":  # a message activity, say: Teams shows an error
            raise ValueError(f"expected an Adaptive Card, got {_card_kind(card)}")
        return dict(card)
    content = card.get("content")
    if card["contentType"] != ADAPTIVE_CARD or not isinstance(content, Mapping):
        raise ValueError(
            f"expected an Adaptive Card or its attachment, got a {card['contentType']!r} attachment"
        )
    return dict(content)


# ---------------------------------------------------------------------------- hero cards


def hero_card(
    title: str | None = None,
    *,
    subtitle: str | None = None,
    text: str | None = None,
    images: Iterable[str] = (),
    buttons: Iterable[Mapping[str, Any]] = (),
) -> Attachment:
    """A hero card attachment: a title, text, images (URLs) and buttons (:func:`button`)."""
    content: dict[str, Any] = {}
    for name, value in (("title", title), ("subtitle", subtitle), ("text", text)):
        if value is not None:
            content[name] = value
    if images := [{"url": url} for url in _many(images, "images", str)]:
        content["images"] = images
    if buttons := [dict(button) for button in _many(buttons, "buttons", Mapping)]:
        content["buttons"] = buttons
    return {"contentType": HERO_CARD, "content": content}


def button(title: str, value: Any, *, type: str = "imBack") -> dict[str, Any]:
    """A card action for hero cards: ``imBack`` (sends `value` as the user's message),
    ``messageBack``, ``openUrl``, ``invoke``."""
    return {"type": type, "title": title, "value": value}


# ---------------------------------------------------------------------------- messages


def as_attachment(value: Mapping[str, Any]) -> Attachment | None:
    """`value` as an attachment when it is a card or an attachment, else None."""
    if value.get("type") == "AdaptiveCard":
        return card_attachment(value)
    if isinstance(value.get("contentType"), str) and "type" not in value:
        return dict(value)  # type: ignore[return-value]
    return None


def as_message(value: str | Mapping[str, Any]) -> Activity:
    """What a handler sends, as an activity: text or an activity as it is (a copy), a card
    or an attachment as a message carrying it. An `id` it carries (one built from the
    incoming activity) is dropped: the channel gives each activity its own."""
    if not isinstance(value, str):
        attachment = as_attachment(value)
        if attachment is not None:
            return {"type": "message", "attachments": [attachment]}
    activity = as_activity(value)
    activity.pop("id", None)
    return activity


def card_message(
    *cards: Mapping[str, Any], text: str | None = None, layout: str | None = None
) -> dict[str, Any]:
    """A message activity carrying cards or attachments (``layout``: "list" or "carousel")."""
    attachments = []
    for card in cards:
        attachment = as_attachment(card)
        if attachment is None:
            raise ValueError("card_message takes Adaptive Cards and attachments")
        attachments.append(attachment)
    activity: dict[str, Any] = {"type": "message", "attachments": attachments}
    if text is not None:
        activity["text"] = text
    if layout is not None:
        activity["attachmentLayout"] = layout
    return activity
