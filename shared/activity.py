"""Activities on the wire: camelCase JSON dicts, kept as dicts at the edges.

Conversation references follow the Bot Framework spec: the fields a bot needs to
address a conversation again later (proactive messages). This module also checks an
incoming request body (the 400/413/415 rows of docs/contracts.md's `POST /api/messages` table)
and builds outgoing activities (replies, activities addressed by a reference).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

Activity = dict[str, Any]
ConversationReference = dict[str, Any]


TEAMS_CHANNEL = "msteams"  # the only channel whose channelData tenant and team are trusted


def conversation_key(channel_id: str, conversation_id: str) -> str:
    """The key of a stored reference: ``"<channelId>/<conversation.id>"`` (the one place
    that spells the format; :func:`split_key` reads it back)."""
    return f"{channel_id}/{conversation_id}"


def split_key(key: str) -> tuple[str, str]:
    """``"<channelId>/<conversation.id>"`` → (channel id, conversation id)."""
    if not isinstance(key, str):
        raise ValueError("a conversation key must be a string")
    channel_id, sep, conversation_id = key.partition("/")
    if not sep or not channel_id or not conversation_id:
        raise ValueError("a conversation key looks like '<channelId>/<conversation id>'")
    return channel_id, conversation_id


def channel_data(activity: Mapping[str, Any]) -> Mapping[str, Any]:
    """The activity's ``channelData`` (``{}`` when absent or not an object)."""
    data = activity.get("channelData")
    return data if isinstance(data, Mapping) else {}


def from_teams(activity: Mapping[str, Any]) -> bool:
    """Teams' channelData (tenant, team) is only trusted on msteams activities: inbound auth
    checked that the signing key is endorsed for the channel, while any other channel's
    client (Web Chat, Direct Line) can put whatever it likes into channelData."""
    return activity.get("channelId") == TEAMS_CHANNEL


def teams_tenant_id(activity: Mapping[str, Any]) -> str | None:
    """The tenant of a Teams activity (verified data only); None on other channels."""
    return tenant_id(activity) if from_teams(activity) else None


def teams_team_id(activity: Mapping[str, Any]) -> str | None:
    """The team of a Teams channel conversation (``channelData.team.id``); None elsewhere."""
    if not from_teams(activity):
        return None
    team = channel_data(activity).get("team")
    team_id = team.get("id") if isinstance(team, Mapping) else None
    return team_id if isinstance(team_id, str) and team_id else None


def tenant_id(activity: Mapping[str, Any]) -> str | None:
    """The AAD tenant an activity names: conversation.tenantId or channelData.tenant.id.

    Trusted only on msteams (:func:`teams_tenant_id`, which decisions about an incoming
    activity use); also reads the bot's own outgoing activities."""
    conversation = activity.get("conversation") or {}
    tenant = conversation.get("tenantId") if isinstance(conversation, Mapping) else None
    if not tenant:
        data = channel_data(activity)
        if isinstance(data.get("tenant"), Mapping):
            tenant = data["tenant"].get("id")
    return tenant if isinstance(tenant, str) and tenant else None


def conversation_reference(activity: Mapping[str, Any]) -> ConversationReference:
    """The conversation reference of an incoming activity.

    Per spec, `activityId` is omitted for conversationUpdate: such activities cannot be
    replied to, so a reference pointing at one would make a later reply fail.
    """
    reference: ConversationReference = {
        "user": activity.get("from"),
        "bot": activity.get("recipient"),
        "conversation": activity.get("conversation"),
        "channelId": activity.get("channelId"),
        "serviceUrl": activity.get("serviceUrl"),
    }
    if activity.get("locale"):
        reference["locale"] = activity["locale"]
    if activity.get("id") and activity.get("type") != "conversationUpdate":
        reference["activityId"] = activity["id"]
    return {k: v for k, v in reference.items() if v is not None}


# --- validation of an incoming request body (docs/contracts.md, "POST /api/messages") ---------


class InvalidActivity(Exception):
    """The request cannot be an activity: carries the HTTP status and a short, safe reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# Optional fields that handlers, routes and reply building read, with their JSON types: spec
# A2003 says receivers SHOULD reject values of the wrong type, so a handler never meets e.g.
# a `from` that is a string or a `recipient.id` that is a number (a route would raise: a 500
# and an apology posted with the bot's token). `None` is accepted everywhere as "absent";
# unknown fields are kept unchecked (spec A2005). `value` (invoke and event payloads) may be
# any JSON value.
_FIELDS: dict[str, type] = {
    "from": dict,
    "recipient": dict,
    "channelData": dict,
    "relatesTo": dict,
    "id": str,
    "text": str,
    "locale": str,
    "name": str,
    "action": str,
    "replyToId": str,
    "deliveryMode": str,
    "textFormat": str,
    "timestamp": str,
    "localTimestamp": str,
    "membersAdded": list,
    "membersRemoved": list,
    "reactionsAdded": list,
    "reactionsRemoved": list,
    "attachments": list,
    "entities": list,
}
_ACCOUNT = {"id": str, "name": str, "aadObjectId": str, "role": str}
_CONVERSATION = {
    "id": str,
    "name": str,
    "isGroup": bool,
    "conversationType": str,
    "tenantId": str,
}
_ITEMS = {  # the lists of objects, and the fields of their items
    "membersAdded": _ACCOUNT,
    "membersRemoved": _ACCOUNT,
    "reactionsAdded": {"type": str},
    "reactionsRemoved": {"type": str},
    "entities": {"type": str},
    "attachments": {"contentType": str, "contentUrl": str, "name": str, "thumbnailUrl": str},
}
_MENTION = {"mentioned": dict, "text": str}  # an entity of type "mention"
# Teams' channelData (checked on msteams only: elsewhere channelData is the channel's own).
_TEAMS_DATA = {"tenant": dict, "team": dict, "channel": dict, "eventType": str}
_TEAMS_DATA_OBJECTS = (
    ("tenant", {"id": str}),
    ("team", {"id": str, "name": str, "aadGroupId": str}),
    ("channel", {"id": str, "name": str}),
)
_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}

# How deeply objects and arrays may nest, the activity itself being level 1: the default
# limit of .NET's JSON readers (Json.NET 13, System.Text.Json), so of what .NET channels
# produce. A body nested just under Python's recursion limit would parse here and then fail
# with RecursionError (a 500) when the reply or the stored reference is serialised deeper
# in the stack.
MAX_JSON_DEPTH = 64


def check_content_type(content_type: str | None) -> None:
    """415 unless the media type is `application/json` (parameters such as charset allowed)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise InvalidActivity(415, "Content-Type must be application/json")


def check_size(content_length: str | None, body: bytes, max_bytes: int) -> None:
    """413 when the declared or the actual body length is over the limit."""
    if content_length is not None and content_length.strip():
        declared = content_length.strip()
        if not declared.isascii() or not declared.isdigit():
            raise InvalidActivity(400, "invalid Content-Length")
        digits = declared.lstrip("0")  # the length is 1*DIGIT: leading zeros are allowed
        if len(digits) > 18 or int(digits or "0") > max_bytes:
            raise InvalidActivity(413, "body too large")
    if len(body) > max_bytes:
        raise InvalidActivity(413, "body too large")


def parse_activity(body: bytes) -> Activity:
    """Decode a request body into an activity dict; 400 with a short reason when it is not one.

    Unknown fields are kept as they are (spec A2005).
    """
    try:
        value = json.loads(body, parse_constant=refuse_constant, parse_float=finite_float)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidActivity(400, "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidActivity(400, "body must be a JSON object")
    if nests_deeper(value, MAX_JSON_DEPTH):
        raise InvalidActivity(400, f"body is nested more than {MAX_JSON_DEPTH} levels deep")
    validate_activity(value)
    return value


def validate_activity(activity: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidActivity` (400) unless the required fields are present and the
    known ones, nested ones included, have their JSON types."""
    for name in ("type", "channelId"):
        if not _non_empty_string(activity.get(name)):
            raise InvalidActivity(400, f"missing {name}")
    if not is_http_url(activity.get("serviceUrl")):
        raise InvalidActivity(400, "missing serviceUrl (an http or https URL)")
    conversation = activity.get("conversation")
    if not isinstance(conversation, dict) or not _non_empty_string(conversation.get("id")):
        raise InvalidActivity(400, "missing conversation.id")
    # Ids the bot puts in Connector paths: "." or ".." there would be a dot segment (the
    # Connector client refuses them; no channel issues them).
    for where, value in (
        ("id", activity.get("id")),
        ("conversation.id", conversation["id"]),
        ("replyToId", activity.get("replyToId")),
    ):
        if isinstance(value, str) and (problem := path_id_problem(value)):
            raise InvalidActivity(400, f"{where} {problem}")
    # The conversation key is "<channelId>/<conversation.id>", the state keys alike.
    channel_id = activity["channelId"]
    if "/" in channel_id or not is_unicode_text(channel_id):
        raise InvalidActivity(400, "channelId must be text without '/'")
    _check_fields(activity, _FIELDS, "")
    _check_fields(conversation, _CONVERSATION, "conversation.")
    _check_accounts(activity)
    # Members added or removed are told from the bot by `recipient.id` alone: without it
    # the bot would greet itself, or miss its own removal.
    changes_members = activity.get("membersAdded") or activity.get("membersRemoved")
    if changes_members and not _non_empty_string((activity.get("recipient") or {}).get("id")):
        raise InvalidActivity(400, "missing recipient.id (the bot's account)")
    _check_lists(activity)
    data = activity.get("channelData")
    if data and from_teams(activity):
        _check_fields(data, _TEAMS_DATA, "channelData.")
        for name, fields in _TEAMS_DATA_OBJECTS:
            if part := data.get(name):
                _check_fields(part, fields, f"channelData.{name}.")


_DOT_SEGMENTS = (".", "..")


def path_id_problem(value: str) -> str | None:
    """What keeps `value` from being an id the bot puts in a Connector path and a
    conversation key ("." or ".." would be a dot segment there), or None."""
    if value in _DOT_SEGMENTS:
        return "must not be '.' or '..'"
    if not is_unicode_text(value):
        return "must be text (no lone surrogate escapes)"
    return None


def is_unicode_text(value: str) -> bool:
    """Whether `value` is Unicode text: a lone surrogate escape ("\\ud800") parses as
    JSON, and no URL path, UTF-8 body, blob name or log line can carry it."""
    return value.isascii() or not _SURROGATE.search(value)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_outgoing_fields(activity: Mapping[str, Any], where: str) -> None:
    """InvalidActivity (400) when a known field of an activity the bot is to send (`where`:
    how its reason names the activity) has another JSON type than the schema's: `text` a
    number, `attachments` not an array of objects. The channel would refuse it."""
    _check_fields(activity, _FIELDS, where)
    _check_accounts(activity, where)
    _check_lists(activity, where)


def _check_accounts(activity: Mapping[str, Any], where: str = "") -> None:
    for name in ("from", "recipient"):
        if account := activity.get(name):
            _check_fields(account, _ACCOUNT, f"{where}{name}.")


def _check_lists(activity: Mapping[str, Any], where: str = "") -> None:
    """The lists of objects of an activity, and their items' fields."""
    for name, fields in _ITEMS.items():
        for index, item in enumerate(activity.get(name) or ()):
            if not isinstance(item, dict):
                raise InvalidActivity(400, f"{where}{name} must hold objects")
            _check_fields(item, fields, f"{where}{name}[{index}].")
            if name == "entities" and item.get("type") == "mention":
                _check_fields(item, _MENTION, f"{where}{name}[{index}].")
                if mentioned := item.get("mentioned"):
                    _check_fields(mentioned, _ACCOUNT, f"{where}{name}[{index}].mentioned.")


def _check_fields(value: Mapping[str, Any], fields: Mapping[str, type], where: str) -> None:
    """400 when one of `fields` in `value` is present (not null) with another JSON type."""
    for name, field in value.items():  # what was sent: usually fewer than what is known
        kind = fields.get(name)
        if kind is not None and field is not None and not isinstance(field, kind):
            raise InvalidActivity(400, f"{where}{name} must be {_KINDS[kind]}")


def is_http_url(value: Any) -> bool:
    """True for an absolute http(s) URL with a host."""
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an invalid IPv6 literal or port
        return False


def _non_empty_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


class NotJsonNumber(ValueError):
    """`NaN` or `(-)Infinity` in a JSON text: Python's json reads them, no other parser does."""


def refuse_constant(name: str) -> Any:
    """`json.loads(..., parse_constant=refuse_constant)`: NotJsonNumber for those names."""
    raise NotJsonNumber(f"`{name}` is not a JSON number: numbers must be finite")


def finite_float(text: str) -> float:
    """`json.loads(..., parse_float=finite_float)`: NotJsonNumber for a number no float holds.

    1e999 is valid JSON syntax, but Python reads it as infinity, sent on as `Infinity`.
    """
    value = float(text)
    if not math.isfinite(value):
        raise NotJsonNumber(f"`{text[:40]}` is out of range: numbers must be finite")
    return value


def strict_loads(body: bytes | str) -> Any:
    """JSON read so that no reader on the way reads it otherwise: NotJsonNumber for NaN,
    the infinities, 1e999 and a whole number too long to read, DuplicateKey for a name
    given twice (ValueError, UnicodeDecodeError and RecursionError as json.loads)."""
    return json.loads(
        body,
        parse_constant=refuse_constant,
        parse_float=finite_float,
        parse_int=whole_int,
        object_pairs_hook=unique_keys,
    )


def whole_int(text: str) -> int:
    """`json.loads(..., parse_int=whole_int)`: NotJsonNumber for a whole number too long for
    Python to read (over 4,300 digits), rather than a ValueError that reads as "not JSON"."""
    try:
        return int(text)
    except ValueError:
        raise NotJsonNumber(f"a number of {len(text)} digits is too long") from None


class DuplicateKey(ValueError):
    """A JSON object giving one name twice: parsers differ on which value counts."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads(..., object_pairs_hook=unique_keys)`: DuplicateKey for a name given twice."""
    found = dict(pairs)
    if len(found) < len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise DuplicateKey(name)
            seen.add(name)
    return found


def nests_deeper(value: Any, limit: int) -> bool:
    """True when objects/arrays in `value` nest more than `limit` levels (no recursion)."""
    level = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def nesting(value: Any) -> int:
    """How many levels of objects and arrays `value` nests (0 for a scalar; no recursion)."""
    depth, level = 0, [value]
    while containers := [item for item in level if isinstance(item, dict | list)]:
        depth += 1
        level = [
            c for item in containers for c in (item.values() if isinstance(item, dict) else item)
        ]
    return depth


# --- building outgoing activities ---------------------------------------------------------------


def _account(value: Any) -> dict[str, Any] | None:
    """A channel account reduced to what the channel needs to address it."""
    if not isinstance(value, Mapping):
        return None
    account = {k: value[k] for k in ("id", "name", "role", "aadObjectId") if value.get(k)}
    return account or None


def create_reply(activity: Mapping[str, Any], text: str | None = None) -> Activity:
    """A message replying to `activity`, per spec.

    `from` and `recipient` are swapped, the conversation is copied, `replyToId` is the incoming
    id; channel, serviceUrl and locale carry over.
    """
    reply: Activity = {
        "type": "message",
        "from": _account(activity.get("recipient")),
        "recipient": _account(activity.get("from")),
        "conversation": dict(activity.get("conversation") or {}),
        "channelId": activity.get("channelId"),
        "serviceUrl": activity.get("serviceUrl"),
        "replyToId": activity.get("id"),
        "locale": activity.get("locale"),
    }
    if text is not None:
        reply["text"] = text
    return {k: v for k, v in reply.items() if v is not None}


def apply_conversation_reference(
    activity: Mapping[str, Any], reference: Mapping[str, Any], *, reply: bool = False
) -> Activity:
    """A copy of an outgoing `activity` addressed with `reference`.

    The reference decides where the activity goes (channel, serviceUrl, conversation, bot as
    sender, user as recipient); the activity's own content is kept. With ``reply=True`` the
    activity answers the reference's `activityId`. A `locale` only fills a missing one.
    """
    outgoing: Activity = dict(activity)
    outgoing.setdefault("type", "message")
    for field_name, key in (
        ("channelId", "channelId"),
        ("serviceUrl", "serviceUrl"),
        ("conversation", "conversation"),
        ("from", "bot"),
        ("recipient", "user"),
    ):
        value = reference.get(key)
        if value is not None:
            outgoing[field_name] = dict(value) if isinstance(value, Mapping) else value
    if reference.get("locale") and not outgoing.get("locale"):
        outgoing["locale"] = reference["locale"]
    if reply and reference.get("activityId"):
        outgoing["replyToId"] = reference["activityId"]
    return outgoing


def as_activity(text_or_activity: str | Mapping[str, Any]) -> Activity:
    """A message from plain text, or a copy of an activity dict (type defaults to message)."""
    if isinstance(text_or_activity, str):
        return {"type": "message", "text": text_or_activity}
    activity = dict(text_or_activity)
    activity.setdefault("type", "message")
    return activity


# The bot's distinct @mention texts removed from a message's text, at most: each removal
# reads the whole text, and a client (Direct Line, Web Chat) writes its own entities.
MAX_BOT_MENTIONS = 16


def text_without_bot_mention(activity: Mapping[str, Any]) -> str:
    """The message text with the bot's own @mention removed (Teams puts `<at>Bot</at>` in it)."""
    text = activity.get("text") or ""
    recipient = activity.get("recipient") or {}
    bot_id = recipient.get("id") if isinstance(recipient, Mapping) else None
    removed: set[str] = set()
    for entity in activity.get("entities") or ():
        if not isinstance(entity, Mapping) or entity.get("type") != "mention":
            continue
        mentioned = entity.get("mentioned")
        mention_text = entity.get("text")
        name = mentioned.get("name") if isinstance(mentioned, Mapping) else None
        marks = [mention_text]
        if mention_text is None and isinstance(name, str) and name:
            # Teams has sent mentions without `text` (names with `&`): the markup it
            # puts in the message for them, the name as written or HTML-escaped.
            marks = [f"<at>{name}</at>", f"<at>{html.escape(name, quote=False)}</at>"]
        if not is_bot_account(mentioned, bot_id):
            continue
        for mark in marks:
            if isinstance(mark, str) and mark and mark not in removed:
                text = text.replace(mark, "")
                removed.add(mark)
        if len(removed) >= MAX_BOT_MENTIONS:
            break
    return text.strip()


def is_bot_account(account: Any, bot_id: str | None) -> bool:
    """True when a channel account is the bot (`bot_id`: the activity's `recipient.id`).

    Teams prefixes bot ids with ``28:`` but some payloads omit it, so the prefix is ignored.
    """
    if not bot_id or not isinstance(account, Mapping) or not isinstance(account.get("id"), str):
        return False
    return account["id"].removeprefix("28:") == bot_id.removeprefix("28:")


def is_message_extension(activity: Mapping[str, Any]) -> bool:
    """A message extension's invoke (``composeExtension/…``): it names the chat the user
    is typing in, which the bot is usually not a member of."""
    name = activity.get("name")
    return (
        activity.get("type") == "invoke"
        and isinstance(name, str)
        and name.startswith("composeExtension/")
    )
