"""Who is in a conversation: the roster a turn reads (``turn.members()``, ``turn.member()``).

On Teams, a post in a team's channel has a conversation id naming the post
(``19:…@thread.tacv2;messageid=…``), not a roster: the team's is asked for (the SDKs ask
for ``channelData.team.id`` too), and a group chat's or a 1:1's is its own. Teams reads
the whole roster a page at a time (``pagedmembers``): its call without pages is
deprecated there, and throttled to a few requests a minute. Other channels are asked
for their members in one call, the Connector's ``GetConversationMembers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.activity import from_teams, teams_team_id

if TYPE_CHECKING:
    from shared.connector import ConnectorClient

PAGE_SIZE = 500  # the most Teams gives in one page
# Pages read at most: Teams' largest teams (25,000 members) fit in 50; a Connector that
# kept answering with a continuation token would otherwise be read for ever.
MAX_PAGES = 200


def roster_id(activity: dict[str, Any]) -> str:
    """The conversation whose members `activity`'s turn asks for."""
    team_id = teams_team_id(activity)
    if team_id:
        return team_id
    conversation_id: str = activity["conversation"]["id"]
    if from_teams(activity):
        return conversation_id.split(";messageid=", 1)[0]
    return conversation_id


async def all_members(connector: ConnectorClient, activity: dict[str, Any]) -> list[Any]:
    """Every member of the roster of `activity`'s conversation (see the module's text)."""
    service_url, conversation_id = activity["serviceUrl"], roster_id(activity)
    if not from_teams(activity):
        return await connector.get_conversation_members(service_url, conversation_id)
    members: list[Any] = []
    token: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        page = await connector.get_conversation_paged_members(
            service_url, conversation_id, PAGE_SIZE, token
        )
        members.extend(page.get("members") or ())
        token = page.get("continuationToken")
        if not isinstance(token, str) or not token or token in seen:
            break
        seen.add(token)
    return members
