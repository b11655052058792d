"""Typed views of the wire format: what an editor should know about an activity's fields.

These are TypedDicts over the camelCase JSON dicts the channel sends: no copy, no
validation beyond what :func:`shared.activity.validate_activity` already did, and nothing
to import but :mod:`typing` (cold start). Every field may be absent (``total=False``);
the channel may send more fields than are listed here (spec: unknown fields are kept).
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict


class ChannelAccount(TypedDict, total=False):
    id: str
    name: str
    aadObjectId: str
    role: str  # "user" | "bot"


class ConversationAccount(TypedDict, total=False):
    id: str
    name: str
    isGroup: bool
    conversationType: str  # Teams: "personal" | "groupChat" | "channel"
    tenantId: str


class Attachment(TypedDict, total=False):
    contentType: str
    content: Any
    contentUrl: str
    name: str
    thumbnailUrl: str


class Entity(TypedDict, total=False):
    type: str


class Mention(TypedDict, total=False):
    type: Literal["mention"]
    mentioned: ChannelAccount
    text: str  # as it appears in the message text, e.g. "<at>Bot</at>"


class TenantInfo(TypedDict, total=False):
    id: str


class TeamInfo(TypedDict, total=False):
    id: str
    name: str
    aadGroupId: str


class ChannelInfo(TypedDict, total=False):
    id: str
    name: str


class TeamsChannelData(TypedDict, total=False):
    tenant: TenantInfo
    team: TeamInfo
    channel: ChannelInfo
    eventType: str
    settings: dict[str, Any]


class CardAction(TypedDict, total=False):
    """The action of an Adaptive Card's ``Action.Execute`` (Universal Actions)."""

    type: str  # "Action.Execute"
    verb: str
    id: str
    data: Any


class CardActionValue(TypedDict, total=False):
    """`value` of an ``adaptiveCard/action`` invoke."""

    action: CardAction
    trigger: str  # "manual" (the user pressed the button) | "automatic" (a card refresh)
    authentication: dict[str, Any]
    state: str


class TaskContext(TypedDict, total=False):
    theme: str  # "default" | "dark" | "contrast"


class TaskRequest(TypedDict, total=False):
    """`value` of a ``task/fetch`` or ``task/submit`` invoke (Teams dialogs)."""

    data: Any  # the card action's data; for task/submit, the dialog's inputs too
    context: TaskContext
