"""Property-based: whatever is POSTed to /api/messages, the answer is a designed status.

Hypothesis posts thousands of random requests (random JSON bodies, mutated activities,
random headers) with valid and invalid tokens through the real pipeline: botsim's JWKS,
the fake AAD, the FakeConnector over HTTP and the memory store. Properties:

- the status is one of 200, 400, 401, 413, 415, 500, 501 and nothing raises;
- a rejected request (400/401/413/415) reaches no Connector and writes nothing;
- a well-formed message with a valid token is answered 200 and echoed.

The services and the bot are shared by all examples (one event loop, run explicitly), so
the function-scoped fixtures are used on purpose across examples.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.auth.inbound import InboundAuthenticator
from shared.auth.tokens import create_token_provider
from shared.bot import NOTHING_TO_ECHO
from shared.bot import router as shipped_router
from shared.connector import ConnectorClient
from shared.http import HttpRequest
from shared.messages import handle_messages
from shared.references import MemoryReferenceStore
from shared.runtime import Runtime
from tools.botsim.connector import FakeConnector

DESIGNED = {200, 400, 401, 413, 415, 500, 501}
REJECTED = {400, 401, 413, 415}
MAX_BODY = 4096  # small, so that random bodies also cross the limit
SHARED = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)


class Harness:
    """One bot, one event loop, pre-minted tokens; `post` runs one request and checks it."""

    def __init__(self, settings, connector, attacker, channel, emulator) -> None:
        self.connector = connector
        self.attacker = attacker
        self.loop = asyncio.new_event_loop()
        self.store = MemoryReferenceStore()
        self.runtime = Runtime(
            settings=settings,
            authenticator=InboundAuthenticator(settings),
            connector=ConnectorClient(settings, create_token_provider(settings)),
            references=self.store,
            router=shipped_router,
        )
        app_id = settings.app_id
        url = connector.url
        self.valid_channel = channel.mint_channel_token(app_id, url)
        self.tokens = {
            "channel": self.valid_channel,
            "emulator": emulator.mint_emulator_token(app_id, version="2.0"),
            "wrong aud": channel.mint_channel_token("someone-else", url),
            "expired": channel.mint_channel_token(app_id, url, exp=time.time() - 3600),
            "no exp": channel.mint_channel_token(app_id, url, drop=["exp"]),
            **{kind: channel.mint_broken(kind, app_id, url) for kind in ("alg_none", "garbage")},
            "hs256": channel.mint_broken("hs256_public_key", app_id, url),
            "unpublished": channel.mint_broken("unpublished_key", app_id, url),
        }
        self.statuses: dict[int, int] = {}

    def close(self) -> None:
        self.loop.run_until_complete(self.runtime.close())
        self.loop.close()

    def post(self, headers: dict[str, str], body: bytes) -> int:
        before = (len(self.connector.requests), self.store.writes, self.store.deletes)
        request = HttpRequest.create("POST", headers, body, "http://127.0.0.1/api/messages")
        response = self.loop.run_until_complete(handle_messages(request, self.runtime))
        status = response.status
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status in DESIGNED, (status, response.body[:200])
        # No token names the attacker's URL and it is not trusted: nothing may reach it.
        assert self.attacker.requests == []
        if status in REJECTED:
            after = (len(self.connector.requests), self.store.writes, self.store.deletes)
            assert after == before, f"a {status} had side effects"
            if status == 401:
                assert response.body == b"Unauthorized."
        return status


@pytest.fixture
def harness(aad_app, identity_env, fake_connector, channel_identity, emulator_identity):
    with FakeConnector() as attacker:
        bot_settings = aad_app.settings(
            **identity_env,
            # The attacker's server is not trusted, as in production. (Emulator tokens carry
            # no serviceurl claim: with it trusted, one could legitimately send there.)
            BOT_TRUSTED_SERVICE_URLS=fake_connector.url,
            BOT_MAX_BODY_BYTES=str(MAX_BODY),
            BOT_CONNECTOR_RATE_LIMIT="100000",  # pacing is tested elsewhere; here it only slows
        )
        harness = Harness(
            bot_settings, fake_connector, attacker, channel_identity, emulator_identity
        )
        try:
            yield harness
        finally:
            harness.close()


# --- strategies ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ACTIVITY_TYPES = [
    "message",
    "conversationUpdate",
    "installationUpdate",
    "messageReaction",
    "messageUpdate",
    "messageDelete",
    "event",
    "invoke",
    "endOfConversation",
    "typing",
    "somethingNew",
]
FIELDS = [
    "type",
    "id",
    "channelId",
    "serviceUrl",
    "conversation",
    "from",
    "recipient",
    "text",
    "name",
    "action",
    "value",
    "channelData",
    "membersAdded",
    "membersRemoved",
    "reactionsAdded",
    "entities",
    "attachments",
    "deliveryMode",
    "locale",
    "callerId",
    "replyToId",
]
accounts = st.fixed_dictionaries(
    {"id": st.sampled_from(["28:bot", "29:user", "bot"]) | st.text(max_size=10)},
    optional={"name": st.text(max_size=10), "role": st.sampled_from(["user", "bot"])},
)
field_values = {
    "type": st.sampled_from(ACTIVITY_TYPES) | st.text(max_size=12) | json_values,
    "id": st.text(max_size=20) | json_values,
    "channelId": st.sampled_from(["msteams", "emulator", "webchat", "slack"]) | json_values,
    "conversation": st.fixed_dictionaries({"id": st.text(max_size=40)}) | json_values,
    "from": accounts | json_values,
    "recipient": accounts | json_values,
    "text": st.text(max_size=300) | json_values,
    "name": st.sampled_from(["adaptiveCard/action", "composeExtension/query"]) | st.text(),
    "action": st.sampled_from(["add", "remove", "add-upgrade", "remove-upgrade"]) | json_values,
    "membersAdded": st.lists(accounts, max_size=3) | json_values,
    "membersRemoved": st.lists(accounts, max_size=3) | json_values,
    "reactionsAdded": st.lists(st.fixed_dictionaries({"type": st.text(max_size=5)}), max_size=2),
    "deliveryMode": st.sampled_from(["normal", "expectReplies"]) | json_values,
    "channelData": st.dictionaries(
        st.sampled_from(["eventType", "tenant", "team"]), json_values, max_size=3
    )
    | json_values,
}


_conversations = itertools.count()


@st.composite
def mutated_activities(draw, connector_url: str, attacker_url: str) -> dict:
    # A fresh conversation each time: the Connector client paces sends per conversation
    # (Teams limits), which would turn a thousand examples into minutes of waiting.
    conversation_id = f"a:conversation-{next(_conversations)}"
    activity = {
        "type": "message",
        "id": "act-1",
        "channelId": "msteams",
        "serviceUrl": connector_url,
        "from": {"id": "29:user", "name": "Ada"},
        "recipient": {"id": "28:bot", "name": "Bot"},
        "conversation": {"id": conversation_id},
        "text": "hi",
    }
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        if draw(st.booleans()) and name in activity:
            del activity[name]
        elif name == "serviceUrl":
            activity[name] = draw(
                st.sampled_from([attacker_url, connector_url + "/", "ftp://x/"]) | st.text()
            )
        else:
            activity[name] = draw(field_values.get(name, json_values))
    unknown_fields = st.dictionaries(st.text(max_size=10).map("x-".__add__), json_values)
    activity.update(draw(unknown_fields))
    return activity


def mostly(usual, *others):
    """`usual` four times in five, else one of `others` (keeps most requests near valid)."""
    return st.integers(0, 4).flatmap(lambda n: usual if n else st.one_of(*others))


content_types = mostly(
    st.just("application/json; charset=utf-8"),
    st.sampled_from(["application/json", "APPLICATION/JSON", "text/plain", "application/jsonx"]),
    st.text(max_size=30),
)


@st.composite
def headers(draw, tokens: dict[str, str]) -> dict[str, str]:
    result = {"Content-Type": _as_header_value(draw(content_types))}
    choice = draw(mostly(st.just("channel"), st.sampled_from([*tokens, "none", "random", "basic"])))
    if choice == "random":
        result["Authorization"] = draw(st.text(max_size=60))
    elif choice == "basic":
        result["Authorization"] = "Basic " + draw(st.text(max_size=20))
    elif choice != "none":
        result["Authorization"] = f"Bearer {tokens[choice]}"
    if draw(st.integers(0, 9)) == 0:
        result["Content-Length"] = draw(st.sampled_from(["0", "-5", "abc", str(MAX_BODY + 1)]))
    return result


# Ids as channels make them: any printable character (Teams uses ':', '@', ';', '=', ...),
# never control characters.
ID_CHARACTERS = st.characters(blacklist_categories=("Cc", "Cs"))


def _as_header_value(value: str) -> str:
    return value.encode("utf-8", "surrogatepass").decode("latin-1", "replace")


# --- properties ------------------------------------------------------------------------------


def test_random_bodies_and_headers_get_designed_statuses(harness):
    @SHARED
    @given(data=st.data())
    def run(data):
        hdrs = data.draw(headers(harness.tokens))
        if "Authorization" in hdrs:
            hdrs["Authorization"] = _as_header_value(hdrs["Authorization"])
        kind = data.draw(st.sampled_from(["activity"] * 6 + ["json", "bytes"]))
        if kind == "json":
            body = json.dumps(data.draw(json_values)).encode()
        elif kind == "bytes":
            body = data.draw(st.binary(max_size=200))
        else:
            activity = data.draw(mutated_activities(harness.connector.url, harness.attacker.url))
            body = json.dumps(activity).encode()
        harness.post(hdrs, body)

    run()
    # The generator reaches every layer: accepted, malformed and unauthenticated requests.
    assert {200, 400, 401, 415} <= set(harness.statuses), harness.statuses


def test_well_formed_messages_with_a_valid_token_are_echoed(harness):
    counter = itertools.count()

    @settings(SHARED, max_examples=500)
    @given(
        text=st.text(max_size=500),
        conversation_id=st.text(ID_CHARACTERS, min_size=1, max_size=60),
        activity_id=st.text(ID_CHARACTERS, min_size=1, max_size=30),
        # Fields no spec defines: kept, and never a reason to reject (spec A2005).
        extra=st.dictionaries(st.text(max_size=10).map("x-".__add__), json_values, max_size=4),
    )
    def run(text, conversation_id, activity_id, extra):
        # A fresh conversation each time: the client paces sends per conversation (Teams
        # limits), and hypothesis repeats ids a lot.
        conversation_id = f"{conversation_id}#{next(counter)}"
        activity = {
            **extra,
            "type": "message",
            "id": activity_id,
            "channelId": "msteams",
            "serviceUrl": harness.connector.url,
            "from": {"id": "29:user", "name": "Ada"},
            "recipient": {"id": "28:bot", "name": "Bot"},
            "conversation": {"id": conversation_id},
            "text": text,
        }
        activity.pop("deliveryMode", None)
        body = json.dumps(activity).encode()
        headers_ = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {harness.valid_channel}",
        }
        before = len(harness.connector.requests)
        status = harness.post(headers_, body)
        if len(body) > MAX_BODY:
            assert status == 413
            return
        if activity_id in (".", ".."):
            # No channel issues such an id: a reply to it would put a dot segment in the
            # Connector path, so it is refused up front, and nothing reaches the Connector.
            assert status == 400
            assert harness.connector.requests[before:] == []
            return
        assert status == 200
        [sent] = harness.connector.requests[before:]
        assert sent.operation == "replyToActivity"
        assert sent.params == {"conversationId": conversation_id, "activityId": activity_id}
        # The sample echoes text, and says there was none to echo otherwise.
        assert sent.json["text"] == (f"Echo: {text.strip()}" if text.strip() else NOTHING_TO_ECHO)

    run()
