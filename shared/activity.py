"""Activities on the wire: camelCase JSON dicts, kept as dicts at the edges.

Conversation references follow the Bot Framework spec: the fields a bot needs to
address a conversation again later (proactive messages).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Activity = dict[str, Any]
ConversationReference = dict[str, Any]


def conversation_key(channel_id: str, conversation_id: str) -> str:
    """The key of a stored reference: ``"<channelId>/<conversation.id>"``."""
    return f"{channel_id}/{conversation_id}"


def tenant_id(activity: Mapping[str, Any]) -> str | None:
    """The AAD tenant of an activity (Teams): conversation.tenantId or channelData.tenant.id."""
    conversation = activity.get("conversation") or {}
    tenant = conversation.get("tenantId") if isinstance(conversation, Mapping) else None
    if not tenant:
        channel_data = activity.get("channelData")
        if isinstance(channel_data, Mapping) and isinstance(channel_data.get("tenant"), Mapping):
            tenant = channel_data["tenant"].get("id")
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
