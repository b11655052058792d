"""The turn context: one incoming activity and the means to answer it.

A handler gets a :class:`TurnContext` and talks back through it: `send` posts a new
activity to the conversation, `reply` answers the incoming activity (reply built per
spec), `update_activity` / `delete_activity` change what the bot sent earlier. When the
channel asked for `deliveryMode: expectReplies`, what the bot sends is buffered and
returned in the HTTP response instead of being posted to the Connector.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from shared.activity import (
    Activity,
    ConversationReference,
    apply_conversation_reference,
    as_activity,
    conversation_key,
    conversation_reference,
    is_bot_account,
    text_without_bot_mention,
)

if TYPE_CHECKING:
    from shared.auth.inbound import Identity
    from shared.config import Settings


class Connector(Protocol):
    """The part of :class:`shared.connector.ConnectorClient` a turn uses."""

    async def send_to_conversation(
        self, service_url: str, conversation_id: str, activity: Mapping[str, Any]
    ) -> dict: ...

    async def reply_to_activity(
        self,
        service_url: str,
        conversation_id: str,
        activity_id: str,
        activity: Mapping[str, Any],
    ) -> dict: ...

    async def update_activity(
        self,
        service_url: str,
        conversation_id: str,
        activity_id: str,
        activity: Mapping[str, Any],
    ) -> dict: ...

    async def delete_activity(
        self, service_url: str, conversation_id: str, activity_id: str
    ) -> None: ...


class TurnContext:
    """One incoming activity, who sent it, and how to answer."""

    __slots__ = ("activity", "buffered", "connector", "identity", "match", "settings")

    def __init__(
        self,
        activity: Activity,
        connector: Connector,
        *,
        identity: Identity | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.activity = activity
        self.connector = connector
        self.identity = identity
        self.settings = settings
        self.match: re.Match[str] | None = None  # set by a `Router.message(pattern)` route
        self.buffered: list[Activity] = []  # what was sent under deliveryMode expectReplies

    # --- reading the activity ------------------------------------------------------------

    @property
    def reference(self) -> ConversationReference:
        return conversation_reference(self.activity)

    @property
    def conversation_key(self) -> str:
        conversation = self.activity.get("conversation") or {}
        return conversation_key(str(self.activity.get("channelId")), str(conversation.get("id")))

    @property
    def expects_replies(self) -> bool:
        return self.activity.get("deliveryMode") == "expectReplies"

    @property
    def text(self) -> str:
        """The message text, trimmed, without the bot's own @mention."""
        return text_without_bot_mention(self.activity)

    @property
    def bot_id(self) -> str | None:
        recipient = self.activity.get("recipient") or {}
        return recipient.get("id")

    @property
    def members_added(self) -> list[dict[str, Any]]:
        """Members added to the conversation, the bot itself excluded."""
        return self._others(self.activity.get("membersAdded"))

    @property
    def members_removed(self) -> list[dict[str, Any]]:
        """Members removed from the conversation, the bot itself excluded."""
        return self._others(self.activity.get("membersRemoved"))

    def _others(self, members: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        return [m for m in members or () if not is_bot_account(m, self.bot_id)]

    # --- answering -------------------------------------------------------------------------

    async def send(self, text_or_activity: str | Mapping[str, Any]) -> dict:
        """Post a new activity to this conversation (Connector `SendToConversation`)."""
        activity = apply_conversation_reference(as_activity(text_or_activity), self.reference)
        return await self._deliver(activity, reply_to=None, buffer=True)

    async def reply(
        self, text_or_activity: str | Mapping[str, Any], *, buffer: bool = True
    ) -> dict:
        """Answer the incoming activity (Connector `ReplyToActivity`, `replyToId` = its id).

        An activity without an id, and a conversationUpdate (spec: not a reply target), is
        answered by posting to the conversation instead. ``buffer=False`` posts through the
        Connector even under expectReplies (the error apology uses it: a failed turn answers
        500, so a buffered apology would never be seen).
        """
        incoming_id = self.reference.get("activityId")
        activity = apply_conversation_reference(
            as_activity(text_or_activity), self.reference, reply=bool(incoming_id)
        )
        return await self._deliver(activity, reply_to=incoming_id, buffer=buffer)

    async def update_activity(
        self, activity_id: str, text_or_activity: str | Mapping[str, Any]
    ) -> dict:
        """Replace an activity the bot sent earlier in this conversation."""
        activity = apply_conversation_reference(as_activity(text_or_activity), self.reference)
        activity["id"] = activity_id
        return await self.connector.update_activity(
            activity["serviceUrl"], activity["conversation"]["id"], activity_id, activity
        )

    async def delete_activity(self, activity_id: str) -> None:
        """Delete an activity the bot sent earlier in this conversation."""
        await self.connector.delete_activity(
            self.activity["serviceUrl"], self.activity["conversation"]["id"], activity_id
        )

    async def _deliver(self, activity: Activity, *, reply_to: str | None, buffer: bool) -> dict:
        if buffer and self.expects_replies:
            self.buffered.append(activity)
            return {}
        service_url, conversation_id = activity["serviceUrl"], activity["conversation"]["id"]
        if reply_to:
            return await self.connector.reply_to_activity(
                service_url, conversation_id, reply_to, activity
            )
        return await self.connector.send_to_conversation(service_url, conversation_id, activity)
