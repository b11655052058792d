"""shared/proactive.py: one queue message, one send, against the FakeConnector over HTTP.

The bot's token comes from the fake AAD (HTTPS, through MSAL); references live in the
in-memory store (the Blob store is exercised in tests/integration/test_proactive_e2e.py).
What is checked is what a user or operator would notice: what reached the Connector (and
with which token), what the store holds afterwards, and what `deliver` raised or returned.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import pytest
from azure.storage.queue import QueueClient

from shared.activity import refuse_constant
from shared.auth.inbound import InboundAuthenticator
from shared.auth.tokens import create_token_provider
from shared.connector import ConnectorClient, ConnectorError, ErrorKind, RetryPolicy
from shared.ledger import MemoryLedger
from shared.proactive import (
    Engine,
    InvalidRequest,
    Outcome,
    deliver,
    handle_queue_message,
    parse_request,
    poison_message,
    send_to_poison_queue,
)
from shared.queues import MemoryQueue
from shared.references import MemoryReferenceStore
from shared.reports import read_report
from shared.router import Router
from shared.runtime import Runtime
from shared.storage import close_shared_clients
from tests.fixtures.storage import ANSWER_TEXT, UNREADABLE_ANSWERS, unreadable_storage
from tools.botsim.connector import FakeConnector, Reply

CONVERSATION = "a:1Xy-personal;with/odd@chars"
KEY = f"msteams/{CONVERSATION}"
OTHER = "19:kept@thread.v2"
# Azure Queue storage takes messages up to 64 KiB, base64-encoded: 48 KiB before encoding.
QUEUE_MESSAGE_LIMIT = 48 * 1024
FAST_RETRY = RetryPolicy(max_attempts=3, max_total_seconds=2.0, base_delay=0.01, max_delay=0.02)


def reference_for(service_url: str, conversation_id: str = CONVERSATION) -> dict[str, Any]:
    return {
        "channelId": "msteams",
        "serviceUrl": service_url,
        "conversation": {"id": conversation_id, "conversationType": "personal", "tenantId": "t-1"},
        "bot": {"id": "28:bot", "name": "Bot"},
        "user": {"id": "29:user-1", "name": "Ada", "aadObjectId": "aad-user-1"},
        "locale": "en-US",
        "activityId": "1700000000001",
    }


def request(to: Any, **content: Any) -> str:
    return json.dumps({"id": "req-1", "to": to, **(content or {"text": "hello"})})


@pytest.fixture
def attacker() -> FakeConnector:
    """A Connector the bot does not trust: it must never receive anything."""
    with FakeConnector() as server:
        yield server


@pytest.fixture
async def runtime(aad_app, fake_connector):
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url)
    store = MemoryReferenceStore()
    await store.upsert(reference_for(fake_connector.url))
    await store.upsert(reference_for(fake_connector.url, OTHER))
    runtime = Runtime(
        settings=settings,
        authenticator=InboundAuthenticator(settings),
        connector=ConnectorClient(settings, create_token_provider(settings), retry=FAST_RETRY),
        references=store,
        router=Router(),
    )
    yield runtime
    await runtime.close()


async def stored_keys(runtime: Runtime) -> list[str]:
    return sorted(item.key for item in (await runtime.references.list()).items)


# --- delivered -------------------------------------------------------------------------------


async def test_text_reaches_the_stored_conversation_addressed_from_the_reference(
    runtime, fake_connector, fake_aad
):
    outcome = await deliver(request({"conversation": KEY}, text="hello"), runtime)

    assert outcome is Outcome.DELIVERED
    [sent] = fake_connector.requests
    assert sent.operation == "sendToConversation"
    assert sent.params == {"conversationId": CONVERSATION}
    assert sent.json["type"] == "message"
    assert sent.json["text"] == "hello"
    assert sent.json["from"] == {"id": "28:bot", "name": "Bot"}
    assert sent.json["recipient"]["id"] == "29:user-1"
    assert sent.json["conversation"]["id"] == CONVERSATION
    assert sent.json["serviceUrl"] == fake_connector.url
    assert sent.json["channelId"] == "msteams"
    assert "replyToId" not in sent.json  # proactive: a new message, not a reply
    assert fake_aad.is_valid_token(sent.authorization.removeprefix("Bearer "))


async def test_proactive_sends_are_background_traffic(runtime, fake_connector):
    # Held to the pacer's background share, so replies to users always find headroom.
    pacer = runtime.connector.pacer

    assert await deliver(request({"conversation": KEY}), runtime) is Outcome.DELIVERED

    assert (pacer.granted, pacer.granted_background) == (1, 1)
    assert len(fake_connector.requests) == 1


async def test_an_activity_keeps_its_content_but_not_its_own_addressing(runtime, fake_connector):
    card = {"contentType": "application/vnd.microsoft.card.hero", "content": {"title": "Hi"}}
    activity = {
        "attachments": [card],
        "summary": "a card",
        # A producer cannot redirect the send: the stored reference decides where it goes.
        "conversation": {"id": "19:somewhere-else@thread.v2"},
        "serviceUrl": "https://evil.example/",
        "recipient": {"id": "29:someone-else"},
    }
    body = json.dumps({"id": "req-2", "to": {"conversation": KEY}, "activity": activity})

    assert await deliver(body.encode(), runtime) is Outcome.DELIVERED

    [sent] = fake_connector.requests
    assert sent.params == {"conversationId": CONVERSATION}
    assert sent.json["type"] == "message"
    assert sent.json["attachments"] == [card]
    assert sent.json["summary"] == "a card"
    assert sent.json["serviceUrl"] == fake_connector.url
    assert sent.json["recipient"]["id"] == "29:user-1"


async def test_an_explicit_reference_target_is_delivered_without_the_store(runtime, fake_connector):
    target = reference_for(fake_connector.url, "a:not-stored")

    outcome = await deliver(request({"reference": target}, text="direct"), runtime)

    assert outcome is Outcome.DELIVERED
    [sent] = fake_connector.requests
    assert sent.params == {"conversationId": "a:not-stored"}
    assert sent.json["text"] == "direct"
    assert await stored_keys(runtime) == sorted([KEY, f"msteams/{OTHER}"])


async def test_a_send_retried_after_one_429_is_delivered_once(runtime, fake_connector):
    fake_connector.script(
        "POST", r"/activities$", [Reply(429, json={}, headers={"Retry-After": "0.01"})]
    )

    assert await deliver(request({"conversation": KEY}), runtime) is Outcome.DELIVERED
    assert [r.status for r in fake_connector.requests] == [429, 200]


# --- refused before anything is sent ----------------------------------------------------------


async def test_an_untrusted_service_url_in_a_reference_sends_nothing_anywhere(
    runtime, fake_connector, attacker, fake_aad
):
    target = reference_for(attacker.url)

    with pytest.raises(ConnectorError) as raised:
        await deliver(request({"reference": target}), runtime)

    assert raised.value.kind is ErrorKind.UNTRUSTED
    assert attacker.requests == []
    assert fake_connector.requests == []
    assert fake_aad.issuances == []  # not even a token was obtained


async def test_an_untrusted_service_url_in_a_stored_reference_sends_nothing(
    runtime, attacker, fake_aad
):
    await runtime.references.upsert(reference_for(attacker.url, "a:tampered"))

    with pytest.raises(ConnectorError) as raised:
        await deliver(request({"conversation": "msteams/a:tampered"}), runtime)

    assert raised.value.kind is ErrorKind.UNTRUSTED
    assert attacker.requests == []
    assert fake_aad.issuances == []


async def test_an_unknown_conversation_is_reported_and_nothing_is_sent(
    runtime, fake_connector, fake_aad
):
    outcome = await deliver(request({"conversation": "msteams/a:never-seen"}), runtime)

    assert outcome is Outcome.UNKNOWN
    assert fake_connector.requests == []
    assert fake_aad.issuances == []


# --- the channel says the conversation is gone: pruned, not retried -------------------------

GONE = {
    "bot not in roster": (403, {"error": {"code": "BotNotInConversationRoster", "message": "x"}}),
    "blocked by user": (403, {"error": {"code": "ConversationBlockedByUser", "message": "x"}}),
    "conversation not found": (404, {"error": {"code": "ConversationNotFound", "message": "x"}}),
    "teams write blocked": (
        403,
        {"errorCode": 209, "message": json.dumps({"subCode": "MessageWritesBlocked"})},
    ),
}


@pytest.mark.parametrize("case", list(GONE))
async def test_a_conversation_the_channel_says_is_gone_is_pruned(runtime, fake_connector, case):
    status, body = GONE[case]
    fake_connector.script("POST", r"/activities$", [Reply(status, json=body)])

    outcome = await deliver(request({"conversation": KEY}), runtime)

    assert outcome is Outcome.PRUNED
    assert len(fake_connector.requests) == 1  # not retried
    assert await runtime.references.get(KEY) is None
    assert await stored_keys(runtime) == [f"msteams/{OTHER}"]


@pytest.mark.parametrize("kind", ["personal", "channel"])
async def test_a_pruned_conversation_takes_its_state_with_it(runtime, fake_connector, kind):
    # Pruned, the reference went and the conversation's state stayed, where no removal or
    # erasure could reach it any more (both find state through a stored reference).
    from shared.state import conversation_state_key, user_state_key
    from shared.state_memory import MemoryStateStore

    conversation = CONVERSATION if kind == "personal" else "19:gone@thread.tacv2"
    key = f"msteams/{conversation}"
    stored = reference_for(fake_connector.url, conversation)
    stored["conversation"]["conversationType"] = kind
    await runtime.references.upsert(stored)
    runtime.state = state = MemoryStateStore()
    kept = [
        conversation_state_key("msteams", OTHER),
        user_state_key("msteams", "29:user-1"),  # the user's own: not the conversation's
        conversation_state_key("msteams", conversation + "x;messageid=1"),  # another channel
    ]
    gone = [conversation_state_key("msteams", conversation)]
    if kind == "channel":
        gone.append(conversation_state_key("msteams", conversation + ";messageid=17"))
    for name in kept + gone:
        assert await state.write(name, {"n": 1}, etag=None)
    blocked = {"error": {"code": "ConversationBlockedByUser", "message": "x"}}
    fake_connector.script("POST", r"/activities$", [Reply(403, json=blocked)])

    assert await deliver(request({"conversation": key}), runtime) is Outcome.PRUNED

    assert await runtime.references.get(key) is None
    assert [name for name in gone if await state.read(name) is not None] == []
    assert [name for name in kept if await state.read(name) is None] == []


async def test_a_gone_explicit_reference_prunes_its_stored_copy(runtime, fake_connector):
    body = {"error": {"code": "BotNotInConversationRoster", "message": "x"}}
    fake_connector.script("POST", r"/activities$", [Reply(403, json=body)])

    target = reference_for(fake_connector.url)
    assert await deliver(request({"reference": target}), runtime) is Outcome.PRUNED
    assert await runtime.references.get(KEY) is None


# --- what a retry may fix: raised, the reference kept ----------------------------------------


async def test_throttling_beyond_the_retry_budget_raises_and_keeps_the_reference(
    runtime, fake_connector
):
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "0.01"})
    fake_connector.script("POST", r"/activities$", [throttled] * 5)

    with pytest.raises(ConnectorError) as raised:
        await deliver(request({"conversation": KEY}), runtime)

    assert raised.value.kind is ErrorKind.THROTTLED
    assert raised.value.retry_after == pytest.approx(0.01)
    assert len(fake_connector.requests) == FAST_RETRY.max_attempts
    assert await runtime.references.get(KEY) is not None


async def test_a_service_unavailable_connector_raises_and_keeps_the_reference(
    runtime, fake_connector
):
    fake_connector.script("POST", r"/activities$", [Reply(503, body="busy")] * 5)

    with pytest.raises(ConnectorError) as raised:
        await deliver(request({"conversation": KEY}), runtime)

    assert raised.value.kind is ErrorKind.TRANSIENT
    assert raised.value.status == 503
    assert await runtime.references.get(KEY) is not None


# --- malformed requests: refused with a reason, nothing sent ---------------------------------

USER_TO = {"channelId": "msteams", "tenantId": "t-1", "serviceUrl": "https://x.example/"}
MALFORMED: dict[str, tuple[bytes | str, str]] = {
    "not json": (b"hello", "not JSON"),
    "not utf-8": (b"\xff\xfe{", "not JSON"),
    "a list": ("[1, 2]", "not a JSON object"),
    "a string": ('"hello"', "not a JSON object"),
    "no id": (json.dumps({"to": {"conversation": KEY}, "text": "x"}), "`id`"),
    "empty id": (json.dumps({"id": "", "to": {"conversation": KEY}, "text": "x"}), "`id`"),
    "numeric id": (json.dumps({"id": 7, "to": {"conversation": KEY}, "text": "x"}), "`id`"),
    "no content": (json.dumps({"id": "r", "to": {"conversation": KEY}}), "`activity`"),
    "empty text": (json.dumps({"id": "r", "to": {"conversation": KEY}, "text": ""}), "`text`"),
    "activity not an object": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "activity": "hi"}),
        "`activity`",
    ),
    "no to": (json.dumps({"id": "r", "text": "x"}), "`to`"),
    "to not an object": (json.dumps({"id": "r", "to": KEY, "text": "x"}), "`to`"),
    "two targets": (
        json.dumps({"id": "r", "to": {"conversation": KEY, "reference": {}}, "text": "x"}),
        "exactly one target",
    ),
    "key without a channel": (
        json.dumps({"id": "r", "to": {"conversation": "a:1"}, "text": "x"}),
        "`to.conversation` must be a conversation key",
    ),
    "key without a conversation": (
        json.dumps({"id": "r", "to": {"conversation": "msteams/"}, "text": "x"}),
        "`to.conversation` must be a conversation key",
    ),
    "key not a string": (
        json.dumps({"id": "r", "to": {"conversation": ["msteams", "a:1"]}, "text": "x"}),
        "`to.conversation` must be a conversation key",
    ),
    "reference without serviceUrl": (
        json.dumps({"id": "r", "to": {"reference": {"channelId": "msteams"}}, "text": "x"}),
        "`to.reference` needs serviceUrl",
    ),
    "user target without tenant and serviceUrl": (
        json.dumps(
            {"id": "r", "to": {"user": {"channelId": "msteams", "id": "29:1"}}, "text": "x"}
        ),
        "`to.user` needs channelId, id, tenantId, serviceUrl",
    ),
    "user target outside Teams": (
        json.dumps(
            {
                "id": "r",
                "to": {
                    "user": {"channelId": "webchat", "id": "u", "tenantId": "t", "serviceUrl": "s"}
                },
                "text": "x",
            }
        ),
        "channelId must be msteams",
    ),
    # Neither a Teams user id nor an AAD object id: it went to createConversation with the
    # bot's token, and was stored as an aadObjectId.
    **{
        f"user target named {name}": (
            json.dumps({"id": "r", "to": {"user": {**USER_TO, "id": user_id}}, "text": "x"}),
            "`to.user.id` must be a Teams user id (29:...) or the user's AAD object id",
        )
        for name, user_id in (
            ("by another form", "dl_abc123"),
            ("by a Skype form", "8:orgid:0f1e2d3c-0000-4000-8000-0000000000aa"),
            ("with a line break", "29:a\nb"),
            ("with a space", "29:a b"),
            ("by 29: alone", "29:"),
        )
    },
    # A name given twice: readers differ on which value counts (this one took the last, a
    # gateway keeping the first would pass a one-conversation send that went to everyone).
    "a target given twice": (
        '{"id": "r", "to": {"conversation": "msteams/a:1"}, "to": {"broadcast": {}}, "text": "x"}',
        "`to` is given twice in one object",
    ),
    "a name given twice in the activity": (
        '{"id": "r", "to": {"conversation": "msteams/a:1"},'
        ' "activity": {"type": "message", "text": "a", "text": "b"}}',
        "`text` is given twice in one object",
    ),
    # Over Python's 4,300 digits: read as "not JSON" before, with no report under its id.
    "a number too long to read": (
        '{"id": "r", "to": {"conversation": "msteams/a:1"},'
        ' "activity": {"type": "message", "value": ' + "9" * 5000 + "}}",
        "a number of 5000 digits is too long",
    ),
    # Of a type the channel refuses: each broadcast child failed at the Connector.
    "activity text not a string": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "activity": {"text": 5}}),
        "activity.text must be a string",
    ),
    "attachments not an array": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "activity": {"attachments": "x"}}),
        "activity.attachments must be an array",
    ),
    "an attachment not an object": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "activity": {"attachments": [1]}}),
        "activity.attachments must hold objects",
    ),
    "a conversation key naming a dot segment": (
        json.dumps({"id": "r", "to": {"conversation": "msteams/.."}, "text": "x"}),
        "`to.conversation` must be a conversation key",
    ),
    "a broadcast channelId with a slash": (
        json.dumps({"id": "r", "to": {"broadcast": {"channelId": "msteams/x"}}, "text": "x"}),
        "`to.broadcast.channelId` must be a channel id, without '/'",
    ),
    "a user serviceUrl that is no http URL": (
        json.dumps(
            {
                "id": "r",
                "to": {"user": {**USER_TO, "id": "29:x", "serviceUrl": "ftp://x"}},
                "text": "x",
            }
        ),
        "`to.user.serviceUrl` must be an http or https URL",
    ),
    "broadcast with an unknown filter": (
        json.dumps({"id": "r", "to": {"broadcast": {"color": "red"}}, "text": "x"}),
        "`to.broadcast` filters are channelId, tenantId, teamId, personal",
    ),
    "broadcast personal not a boolean": (
        json.dumps({"id": "r", "to": {"broadcast": {"personal": "yes"}}, "text": "x"}),
        "`to.broadcast.personal` must be true or false",
    ),
    "broadcast not an object": (
        json.dumps({"id": "r", "to": {"broadcast": "all"}, "text": "x"}),
        "`to.broadcast` must be an object",
    ),
    "unknown top-level field": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "text": "x", "colour": 1}),
        "unknown field `colour`",
    ),
    "engine field forged": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "text": "x", "_proactive": 1}),
        "engine's own field",
    ),
    "unknown target": (json.dumps({"id": "r", "to": {"team": "x"}, "text": "x"}), "`to` must"),
    "both activity and text": (
        json.dumps(
            {"id": "r", "to": {"conversation": KEY}, "activity": {"text": "a"}, "text": "b"}
        ),
        "either `activity` or `text`, not both",
    ),
    "activity not an object beside text": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "activity": "hi", "text": "x"}),
        "not both",
    ),
    "text not a string": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "text": 5}),
        "`text` must be a non-empty string",
    ),
    "inbound-only activity type": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "activity": {"type": "invoke"}}),
        "`activity.type` must be one of",
    ),
    "activity type not a string": (
        json.dumps({"id": "r", "to": {"conversation": KEY}, "activity": {"type": ["message"]}}),
        "`activity.type` must be one of",
    ),
    "id too long": (
        json.dumps({"id": "r" * 1025, "to": {"conversation": KEY}, "text": "x"}),
        "`id`",
    ),
    "reference not an object": (
        json.dumps({"id": "r", "to": {"reference": "msteams/a:1"}, "text": "x"}),
        "`to.reference` must be an object",
    ),
    "reference with an empty conversation id": (
        json.dumps(
            {
                "id": "r",
                "to": {
                    "reference": {
                        "channelId": "msteams",
                        "serviceUrl": "http://127.0.0.1:9/never-called",
                        "conversation": {"id": ""},
                    }
                },
                "text": "x",
            }
        ),
        "`to.reference` needs serviceUrl",
    ),
    "reference with a bot that is not an object": (
        json.dumps(
            {
                "id": "r",
                "to": {
                    "reference": {
                        "channelId": "msteams",
                        "serviceUrl": "http://127.0.0.1:9/never-called",
                        "conversation": {"id": "a:1"},
                        "bot": "28:bot",
                    }
                },
                "text": "x",
            }
        ),
        "`to.reference.bot` must be an object",
    ),
    "nested beyond the JSON parser": ("[" * 100_000 + "]" * 100_000, "nests more than 64 levels"),
    # A queue writer's numbers past what the engine writes: no OverflowError at float(),
    # and no 2 ** attempt that holds the worker for half a minute.
    "first seen at an integer past a float": (
        '{"id":"r","to":{"conversation":"msteams/a:1"},"text":"x","_proactive":{"since":1'
        + "0" * 400
        + "}}",
        "engine's own field",
    ),
    "attempt in the billions": (
        json.dumps(
            {
                "id": "r",
                "to": {"conversation": "msteams/a:1"},
                "text": "x",
                "_proactive": {"attempt": 10**10},
            }
        ),
        "engine's own field",
    ),
    # The queue message whose claim a kept copy goes on with: an id as the host gives it;
    # the marks of a retry only beside what they qualify.
    **{
        name: (
            json.dumps(
                {"id": "r", "to": {"conversation": "msteams/a:1"}, "text": "x", "_proactive": field}
            ),
            "engine's own field",
        )
        for name, field in {
            "claimed by no id": {"claimedBy": ""},
            "claimed by a number": {"claimedBy": 7},
            "claimed as a retry, by nobody": {"claimedRetry": True},
            "resumed as a retry, never resumed": {"resumedRetry": True},
            "a copy of a retry named by no id": {"retryOf": ""},
            "a copy of a retry named by a number": {"retryOf": 7},
        }.items()
    },
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_requests_are_refused_with_a_reason(
    runtime, fake_connector, fake_aad, case
):
    body, reason = MALFORMED[case]

    with pytest.raises(InvalidRequest) as raised:
        await deliver(body, runtime)

    assert reason in str(raised.value)
    assert fake_connector.requests == []
    assert fake_aad.issuances == []
    assert len(await stored_keys(runtime)) == 2


async def test_the_addressing_always_comes_from_the_reference_even_when_it_lacks_a_field(
    runtime, fake_connector
):
    # A minimal reference (no bot, no user): the producer's from/recipient must not fill in.
    target = {
        "channelId": "msteams",
        "serviceUrl": fake_connector.url,
        "conversation": {"id": "a:minimal"},
    }
    activity = {
        "text": "hi",
        "from": {"id": "29:impersonated-user", "role": "user"},
        "recipient": {"id": "29:someone-else"},
        "channelId": "directline",
        "replyToId": "1700000000009",
    }
    body = json.dumps({"id": "req-3", "to": {"reference": target}, "activity": activity})

    assert await deliver(body, runtime) is Outcome.DELIVERED

    [sent] = fake_connector.requests
    assert sent.params == {"conversationId": "a:minimal"}
    assert "from" not in sent.json and "recipient" not in sent.json
    assert sent.json["channelId"] == "msteams"
    assert sent.json["text"] == "hi"
    assert sent.json["replyToId"] == "1700000000009"  # content, kept: a reply in a thread


@pytest.mark.parametrize("kind", ["typing", "event", "endOfConversation"])
async def test_activity_types_a_bot_may_send_are_delivered(runtime, fake_connector, kind):
    body = json.dumps(
        {"id": "req-4", "to": {"conversation": KEY}, "activity": {"type": kind, "name": "n"}}
    )

    assert await deliver(body, runtime) is Outcome.DELIVERED

    [sent] = fake_connector.requests
    assert sent.json["type"] == kind
    assert sent.json["recipient"]["id"] == "29:user-1"


def test_a_null_activity_beside_text_is_the_text_shorthand():
    body = json.dumps({"id": "r", "to": {"conversation": KEY}, "activity": None, "text": "hi"})
    assert parse_request(body).activity == {"type": "message", "text": "hi"}


def test_a_valid_request_parses_to_its_target_and_activity():
    parsed = parse_request(request({"conversation": KEY}, text="hi"))
    assert (parsed.id, parsed.key, parsed.reference) == ("req-1", KEY, None)
    assert parsed.activity == {"type": "message", "text": "hi"}


# --- handle_queue_message: poison at once what no retry can deliver ------------------------------


@pytest.fixture
def engine(runtime) -> Engine:
    """The engine with its bookkeeping in memory (the Blob ledger: test_ledger.py)."""
    return Engine(runtime, MemoryLedger(), MemoryQueue())


async def test_queue_message_delivered_is_not_poisoned(runtime, engine, fake_connector):
    outcome = await handle_queue_message(request({"conversation": KEY}), runtime, engine=engine)
    assert outcome is Outcome.DELIVERED
    assert engine.queue.poisoned == [] and engine.queue.sent == []
    assert len(fake_connector.activities) == 1


async def test_malformed_queue_message_is_poisoned_at_once(
    runtime, engine, fake_connector, fake_aad
):
    outcome = await handle_queue_message(b"{not json", runtime, engine=engine)
    assert outcome is Outcome.POISONED
    assert engine.queue.poisoned == [
        {"poisonReason": "invalid request: the message is not JSON", "body": "{not json"}
    ]
    assert fake_connector.requests == []
    assert fake_aad.issuances == []


def _deep(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


UNSTORABLE = {
    # A lone surrogate escape (valid JSON, not Unicode; what Python makes of bytes that are
    # not UTF-8 on a command line): every attempt raised UnicodeEncodeError writing the
    # report, and the host poisoned the message with no reason.
    "id": ({"id": "req-\ud800", "to": {"conversation": KEY}, "text": "hi"}, None),
    "conversation key": (
        {"id": "req-k", "to": {"conversation": "msteams/a:\udc00"}, "text": "hi"},
        "req-k",
    ),
    "user": ({"id": "req-u", "to": {"user": {**USER_TO, "id": "29:\udc00"}}, "text": "x"}, "req-u"),
    # Nested deeper than the channel's JSON readers go: parsed here, then RecursionError
    # (or not) depending on the stack depth where it was written again.
    "nesting": (
        {"id": "req-d", "to": {"conversation": KEY}, "activity": {"value": _deep(300)}},
        "req-d",
    ),
}


@pytest.mark.parametrize("case", list(UNSTORABLE))
async def test_a_request_no_store_or_channel_takes_is_poisoned_at_once_with_its_reason(
    runtime, engine, fake_connector, case
):
    message, request_id = UNSTORABLE[case]

    outcome = await handle_queue_message(json.dumps(message), runtime, engine=engine)

    assert outcome is Outcome.POISONED
    [copy] = engine.queue.poisoned
    assert copy["poisonReason"].startswith("invalid request: ")
    assert fake_connector.requests == []
    if request_id is not None:
        report = await read_report(engine.ledger, request_id)
        assert (report["state"], report["failed"]) == ("done", 1)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("a number too long to read", "a number of 5000 digits is too long"),
        ("a target given twice", "`to` is given twice in one object"),
    ],
)
async def test_a_request_python_reads_only_in_part_is_reported_under_its_id(
    runtime, engine, fake_connector, case, reason
):
    # A 5,000-digit number made the whole message "not JSON": no report under its id, so
    # a producer polling it waited for ever.
    body, _ = MALFORMED[case]

    assert await handle_queue_message(body, runtime, engine=engine) is Outcome.POISONED

    report = await read_report(engine.ledger, "r")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert report["failures"][0]["reason"] == f"invalid request: {reason}"
    assert fake_connector.requests == []


async def test_a_request_whose_id_is_a_number_leaves_no_report_under_its_text(
    runtime, engine, fake_connector
):
    # Its id was read as "7" for the report: the failure recorded there made the request
    # sent again with the id "7" (the producer's fix) a duplicate, never sent.
    bad = json.dumps({"id": 7, "to": {"conversation": KEY}, "text": "hi"})
    assert await handle_queue_message(bad, runtime, engine=engine) is Outcome.POISONED
    assert await read_report(engine.ledger, "7") is None

    fixed = json.dumps({"id": "7", "to": {"conversation": KEY}, "text": "hi"})
    assert await handle_queue_message(fixed, runtime, engine=engine) is Outcome.DELIVERED
    assert len(fake_connector.activities) == 1


@pytest.mark.parametrize(
    "text",
    [
        '{"id": "r", "to": {"conversation": "msteams/a:1"}, "activity": {"value": 1e999}}',
        '{"id": "r", "to": {"conversation": "msteams/a:1"}, "activity": {"value": NaN}}',
        '{"id": "r", "to": {"conversation": "msteams/a:1"}, "to": {"broadcast": {}}, "text": "x"}',
    ],
)
async def test_a_poison_copy_keeps_a_request_it_would_not_write_out_again_as_it_came(
    runtime, engine, text
):
    # The copy was the request read and written out again: `1e999` came out as Infinity,
    # text no JSON parser but Python's reads, and a name given twice lost its first value.
    assert await handle_queue_message(text, runtime, engine=engine) is Outcome.POISONED

    [copy] = engine.queue.poisoned
    assert copy == {"poisonReason": copy["poisonReason"], "body": text}
    assert copy["poisonReason"].startswith("invalid request: ")
    json.loads(poison_message(text, "why"), parse_constant=refuse_constant)  # plain JSON


@pytest.mark.parametrize(
    ("to", "shown"),
    [
        ({"conversation": "msteams/a:1"}, "msteams/a:1"),
        ({"user": {**USER_TO, "id": "29:1"}}, "user msteams/29:1"),
        ({"broadcast": {}}, "broadcast"),
        ("msteams/a:1", "target"),  # no target it could name
        ({"conversation": "broadcast"}, "target"),  # not a conversation key
        ({"user": {"channelId": "", "id": ""}}, "target"),
    ],
)
async def test_an_invalid_requests_failure_names_the_target_it_gave(
    runtime, engine, fake_connector, to, shown
):
    # No content: invalid. Its report named the target "target" (the slot's own name),
    # where a valid request's names the conversation key, the user or the broadcast.
    message = {"id": "req-1", "to": to}

    assert await handle_queue_message(json.dumps(message), runtime, engine=engine) is (
        Outcome.POISONED
    )
    [failure] = (await read_report(engine.ledger, "req-1"))["failures"]
    assert failure["target"] == shown
    assert failure["reason"].startswith("invalid request: ")


async def test_untrusted_reference_is_poisoned_at_once(runtime, engine, attacker, fake_connector):
    body = request({"reference": reference_for(attacker.url)})
    assert await handle_queue_message(body, runtime, engine=engine) is Outcome.FAILED
    [copy] = engine.queue.poisoned
    assert "not trusted" in copy["poisonReason"]
    assert attacker.requests == [] and fake_connector.requests == []


async def test_activity_the_connector_refuses_is_poisoned_at_once(runtime, engine, fake_connector):
    fake_connector.script(
        "POST", r"/activities$", [Reply(400, json={"error": {"code": "BadArgument"}})]
    )
    outcome = await handle_queue_message(request({"conversation": KEY}), runtime, engine=engine)
    assert outcome is Outcome.FAILED
    [copy] = engine.queue.poisoned
    reason = copy["poisonReason"]
    assert "invalid" in reason and "400" in reason and "BadArgument" in reason
    assert len(fake_connector.requests) == 1  # not retried
    assert KEY in await stored_keys(runtime)  # a bad activity says nothing about the conversation


async def test_throttled_queue_message_is_requeued_not_poisoned(runtime, engine, fake_connector):
    fake_connector.script("POST", r"/activities$", [Reply(429, headers={"Retry-After": "0"})] * 10)
    outcome = await handle_queue_message(request({"conversation": KEY}), runtime, engine=engine)
    assert outcome is Outcome.REQUEUED
    assert engine.queue.poisoned == []
    [(copy, delay)] = engine.queue.sent
    assert json.loads(copy)["_proactive"]["attempt"] == 1
    assert delay >= 1.0  # `Retry-After: 0` is not a loop of 429s for the whole age bound
    assert len(fake_connector.requests) < 10  # nor of retries at once


def test_poison_copy_keeps_the_request_and_adds_the_reason():
    body = json.dumps({"id": "r-9", "to": {"conversation": KEY}, "extra": [1]})
    assert json.loads(poison_message(body.encode(), "why")) == {
        "id": "r-9",
        "to": {"conversation": KEY},
        "extra": [1],
        "poisonReason": "why",
    }
    assert json.loads(poison_message(b"\xffnot json", "why")) == {
        "poisonReason": "why",
        "body": "\ufffdnot json",
    }


def test_poison_copy_keeps_non_ascii_text_unescaped():
    body = json.dumps({"id": "r", "text": "héllo 😀"}, ensure_ascii=False).encode()
    copy = poison_message(body, "why")
    assert "héllo 😀" in copy
    assert json.loads(copy) == {"id": "r", "text": "héllo 😀", "poisonReason": "why"}
    # A lone surrogate is valid JSON but not UTF-8: the copy stays encodable.
    lone = poison_message(b'{"id": "r", "text": "\\ud800"}', "why")
    assert json.loads(lone)["text"] == "\ud800"
    lone.encode("utf-8")


def test_a_poison_copy_always_fits_a_queue_message_whatever_the_reason():
    from shared.queues import MAX_QUEUE_MESSAGE_BYTES

    for body in ('{"id": "r"}'.encode("utf-16"), b"\xe9", "\x01" * 40_000):
        copy = poison_message(body, "x" * 60_000)
        assert len(copy.encode()) <= MAX_QUEUE_MESSAGE_BYTES
        if not isinstance(body, str):  # a text that fitted comes back as it was
            assert json.loads(copy)["poisonReason"].startswith("xxx")


def test_a_poison_copy_of_a_request_at_the_size_limit_keeps_a_reason_cut_short():
    # A request as large as a producer may send, whose reason (naming a key of 4-byte
    # characters) took the copy over a queue message: the copy went without `poisonReason`,
    # and put back as it is, it was no retry (its target found failed, nothing sent).
    from shared.queues import MAX_REQUEST_BYTES

    key = "webchat/" + "\U0001f600" * 300
    request = {"id": "r", "to": {"conversation": key}, "text": ""}
    room = MAX_REQUEST_BYTES - len(json.dumps(request, ensure_ascii=False).encode())
    request["text"] = "a" * room
    body = json.dumps(request, ensure_ascii=False).encode()
    assert len(body) == MAX_REQUEST_BYTES
    reason = f"no stored reference for conversation {key[:200]}"

    copy = poison_message(body, reason)

    assert len(copy.encode()) <= QUEUE_MESSAGE_LIMIT
    message = json.loads(copy)
    assert message["poisonReason"].startswith("no stored reference for conversation webchat/")
    assert message["poisonReason"].endswith("...")
    assert {k: v for k, v in message.items() if k != "poisonReason"} == request


def test_poison_copy_that_would_not_fit_a_queue_message_keeps_the_original_body():
    body = json.dumps({"id": "r", "to": {"team": "x"}, "text": "a" * (QUEUE_MESSAGE_LIMIT - 60)})
    assert len(body.encode()) <= QUEUE_MESSAGE_LIMIT
    assert poison_message(body.encode(), "invalid request: " + "x" * 100) == body


async def test_a_large_non_ascii_malformed_request_is_poisoned_on_azurite_at_once(
    azurite, unique_name, aad_app, fake_connector
):
    # ~40 KB of UTF-8 fits a queue message (base64: ~54 KB of 64); escaped as \u00e9 it would
    # be ~120 KB and the poison queue would refuse the copy, costing five useless retries.
    queue = unique_name("proactive")
    settings = aad_app.settings(
        AzureWebJobsStorage=azurite.connection_string, BOT_PROACTIVE_QUEUE=queue
    )
    runtime = Runtime(
        settings=settings,
        authenticator=InboundAuthenticator(settings),
        connector=ConnectorClient(settings, None),
        references=MemoryReferenceStore(),
        router=Router(),
    )
    text = "é" * 20_000
    body = json.dumps({"id": "r-big", "to": {"team": "x"}, "text": text}, ensure_ascii=False)
    try:
        outcome = await handle_queue_message(body.encode(), runtime)
    finally:
        await runtime.close()
        await close_shared_clients()

    assert outcome is Outcome.POISONED
    client = QueueClient.from_connection_string(azurite.connection_string, f"{queue}-poison")
    [message] = client.peek_messages()
    copy = json.loads(base64.b64decode(message.content))
    assert copy["id"] == "r-big" and copy["text"] == text
    assert copy["poisonReason"].startswith("invalid request: `to` must")
    assert fake_connector.requests == []


async def test_logs_name_the_request_but_never_its_text(runtime, fake_connector, caplog):
    caplog.set_level(logging.DEBUG)
    secret_text = "the user's private words"
    engine = Engine(runtime, MemoryLedger(), MemoryQueue())
    delivered = request({"conversation": KEY}, text=secret_text)
    malformed = json.dumps({"id": "req-bad", "to": {"team": "x"}, "text": secret_text})

    assert await handle_queue_message(delivered, runtime, engine=engine) is Outcome.DELIVERED
    assert await handle_queue_message(malformed, runtime, engine=engine) is Outcome.POISONED

    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "req-1" in logged and "req-bad" in logged
    assert secret_text not in logged


async def test_a_queue_answering_broken_http_raises_its_type_never_the_sas_url(aad_app):
    # A queue endpoint behind a broken proxy answers something that is not HTTP: the SDK's
    # error quotes the request's URL, SAS signature included, and it went to the host's
    # log as it was (the function raised it).
    import traceback

    from shared.queues import QueueError, StorageQueue

    async def not_http(reader, writer):
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nBad Header Line\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sas = "sv=2022-11-02&ss=q&srt=sco&sp=a&se=2030-01-01T00:00:00Z&sig=SECRETSIG123"
    settings = aad_app.settings(
        AzureWebJobsStorage=(
            f"QueueEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
            f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;SharedAccessSignature={sas}"
        )
    )
    try:
        queue = StorageQueue(settings)
        for put in (lambda: queue.put("{}"), lambda: queue.poison("{}", "a reason")):
            with pytest.raises(QueueError) as raised:
                await put()
            logged = "".join(traceback.format_exception(raised.value))
            assert "SECRETSIG123" not in logged
            assert "storage unreachable" in str(raised.value) or "HTTP" in str(raised.value)
    finally:
        server.close()
        await close_shared_clients()


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
async def test_a_put_answered_with_what_no_client_can_read_is_a_queue_error(answer):
    # The put was answered 201 (it likely landed), with a body the storage SDK cannot read:
    # its ParseError or UnicodeDecodeError escaped raw (a producer's `send` then said
    # "could not reach storage", not that the request may have been queued), or it said
    # "HTTP 201". No status: the producer keeps the request's report (it may be queued).
    from shared.config import Settings, StorageSettings
    from shared.queues import QueueError, StorageQueue

    async with unreadable_storage(answer) as storage:
        settings = Settings(
            storage=StorageSettings(connection_string=storage.connection_string),
            proactive_queue="proactive",
        )
        try:
            with pytest.raises(QueueError) as raised:
                await StorageQueue(settings).put("{}")
        finally:
            await close_shared_clients()

    assert "POST /devstoreaccount1/proactive/messages?messagettl=-1" in storage.requests
    text = str(raised.value)
    assert text.startswith("queue 'proactive': put failed: the answer could not be read (")
    assert raised.value.status is None and ANSWER_TEXT not in text


async def test_a_queue_depth_answered_with_what_no_client_can_read_is_unknown(caplog):
    # Only a hint for flow control: an answer that is not UTF-8 (a proxy's Latin-1 page)
    # raised the SDK's UnicodeDecodeError into the fan-out instead.
    from shared.config import Settings, StorageSettings
    from shared.queues import StorageQueue

    async with unreadable_storage("a page not in UTF-8") as storage:
        settings = Settings(
            storage=StorageSettings(connection_string=storage.connection_string),
            proactive_queue="proactive",
        )
        try:
            assert await StorageQueue(settings).depth() is None
        finally:
            await close_shared_clients()
    assert "queue 'proactive': depth unknown (UnicodeDecodeError)" in caplog.text
    assert ANSWER_TEXT not in caplog.text


async def test_poison_queue_on_azurite_is_created_and_gets_the_base64_copy(
    azurite, unique_name, aad_app
):
    queue = unique_name("proactive")
    settings = aad_app.settings(
        AzureWebJobsStorage=azurite.connection_string, BOT_PROACTIVE_QUEUE=queue
    )
    await send_to_poison_queue(settings, b'{"id": "r-1"}', "invalid request: test")
    await close_shared_clients()

    client = QueueClient.from_connection_string(azurite.connection_string, f"{queue}-poison")
    [message] = client.peek_messages()
    assert json.loads(base64.b64decode(message.content)) == {
        "id": "r-1",
        "poisonReason": "invalid request: test",
    }


@pytest.mark.parametrize("field", ["activity", "to", "_proactive", "odd\nname\u2028"])
def test_a_request_nested_too_deep_names_the_field(field):
    from shared.proactive_schema import MAX_JSON_DEPTH, InvalidRequest, parse_request

    # Fields that are no containers come first (a number, null, a boolean): the search
    # for the deep one passes them by.
    message = {"n": 1, "text": None, "flag": True, "id": "req-n", "to": {"conversation": KEY}}
    message[field] = {"value": _deep(MAX_JSON_DEPTH + 5)}
    with pytest.raises(InvalidRequest) as refused:
        parse_request(json.dumps(message))
    shown = field.replace("\n", "\\n").replace("\u2028", "\\u2028")  # one line
    assert str(refused.value) == f"`{shown}` nests more than {MAX_JSON_DEPTH} levels deep"
