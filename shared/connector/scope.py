"""Which of the channel's limits a Connector request falls under (see shared/ratelimit.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.activity import tenant_id
from shared.ratelimit import TEAMS, Scope, conversation_key
from shared.serviceurl import TEAMS_HOSTS, ServiceTarget, host_in


def pacing_scope(
    target: ServiceTarget, conversation_id: str | None, body: Mapping[str, Any] | None
) -> Scope:
    """Which limits a request falls under: the channel and tenant the body names (a
    Teams host counts as Teams when it names none), the conversation it goes to."""
    channel = body.get("channelId") if body is not None else None
    if not isinstance(channel, str) or not channel:
        channel = TEAMS if host_in(target.host, TEAMS_HOSTS) else None
    tenant = None
    if channel == TEAMS and body is not None:
        tenant = tenant_id(body) or body.get("tenantId")  # createConversation: tenantId
    return Scope(
        channel_id=channel,
        # One tenant, one lane: tenant ids are GUIDs, which a producer may write in capitals.
        tenant_id=tenant.lower() if isinstance(tenant, str) and tenant else None,
        conversation=conversation_key(conversation_id) if conversation_id else None,
        service=f"{target.host}:{target.port}",
    )
