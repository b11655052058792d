"""shared/messages.py: POST /api/messages end to end in-process, against botsim.

Real parts throughout: tokens minted by botsim's identity services and checked against
their JWKS over HTTP, the bot's own token from the fake AAD (HTTPS, through MSAL), replies
sent over HTTP to botsim's FakeConnector, references in the in-memory store (the Blob store
is exercised in tests/integration/test_messages_e2e.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

import app
from shared import messages as messages_module
from shared.auth.inbound import InboundAuthenticator
from shared.auth.tokens import create_token_provider
from shared.bot import greeting
from shared.bot import router as shipped_router
from shared.config import Settings, reset_settings
from shared.connector import ConnectorClient
from shared.http import HttpRequest, HttpResponse
from shared.messages import (
    KEYS_UNAVAILABLE,
    LOCAL_NAME_UNAUTHORIZED,
    LOCAL_UNAUTHORIZED,
    SERVER_ERROR,
    UNAUTHORIZED,
    handle_messages,
)
from shared.references import MemoryReferenceStore, StoreError, reference_key
from shared.router import APOLOGY, InvokeResponse, Router
from shared.runtime import Runtime, reset_runtime
from tools.botsim.connector import FakeConnector

ROOT = Path(__file__).resolve().parents[2]
CHANNEL = "msteams"
CONVERSATION = "a:1Xy-conversation"


def activity_for(service_url: str, **fields) -> dict:
    value = {
        "type": "message",
        "id": "1700000000001",
        "channelId": CHANNEL,
        "serviceUrl": service_url,
        "from": {"id": "29:user-1", "name": "Ada", "aadObjectId": "aad-user-1"},
        "recipient": {"id": "28:bot", "name": "Bot"},
        "conversation": {"id": CONVERSATION, "conversationType": "personal", "tenantId": "t-1"},
        "channelData": {"tenant": {"id": "t-1"}},
        "locale": "en-US",
        "text": "hello there",
    }
    value.update(fields)
    return value


def post(
    activity: dict | None = None,
    token: str | None = None,
    *,
    body: bytes | None = None,
    content_type: str = "application/json; charset=utf-8",
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> HttpRequest:
    all_headers = {"Content-Type": content_type}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    payload = json.dumps(activity).encode() if body is None else body
    return HttpRequest.create(method, all_headers, payload, "http://127.0.0.1/api/messages")


async def stored_keys(store: MemoryReferenceStore) -> list[str]:
    return [item.key for item in (await store.list()).items]


class Bot:
    """The bot under test: settings pointing at botsim, its runtime and store."""

    def __init__(self, settings, connector_url: str, router: Router) -> None:
        self.settings = settings
        self.connector_url = connector_url
        self.store = MemoryReferenceStore()
        self.runtime = Runtime(
            settings=settings,
            authenticator=InboundAuthenticator(settings),
            connector=ConnectorClient(settings, create_token_provider(settings)),
            references=self.store,
            router=router,
        )

    async def handle(self, request: HttpRequest) -> HttpResponse:
        return await handle_messages(request, self.runtime)


@pytest.fixture
def attacker() -> FakeConnector:
    """A second Connector, playing a server the attacker wants the bot's token sent to."""
    with FakeConnector() as server:
        yield server


@pytest.fixture
def bot_settings(aad_app, identity_env, fake_connector, attacker):
    # The attacker's URL is even trusted for outbound calls: only inbound auth may stop it.
    return aad_app.settings(
        **identity_env, BOT_TRUSTED_SERVICE_URLS=f"{fake_connector.url},{attacker.url}"
    )


@pytest.fixture
async def make_bot(bot_settings, fake_connector):
    bots: list[Bot] = []

    def make(router: Router = shipped_router) -> Bot:
        bot = Bot(bot_settings, fake_connector.url, router)
        bots.append(bot)
        return bot

    yield make
    for bot in bots:
        await bot.runtime.close()


@pytest.fixture
async def bot(make_bot) -> Bot:
    return make_bot()


def channel_token(channel_identity, bot: Bot, service_url: str | None = None, **kwargs) -> str:
    return channel_identity.mint_channel_token(
        bot.settings.app_id, service_url or bot.connector_url, **kwargs
    )


# --- valid tokens: the echo reaches the Connector with the bot's token ----------------------


async def test_channel_token_gets_the_echo_with_the_bots_token(
    bot, channel_identity, fake_connector, fake_aad
):
    incoming = activity_for(fake_connector.url)
    response = await bot.handle(post(incoming, channel_token(channel_identity, bot)))

    assert (response.status, response.body) == (200, b"")
    [sent] = fake_connector.requests
    assert sent.operation == "replyToActivity"
    assert sent.params == {"conversationId": CONVERSATION, "activityId": incoming["id"]}
    assert sent.json["text"] == "Echo: hello there"
    assert sent.json["replyToId"] == incoming["id"]
    assert sent.json["recipient"]["id"] == "29:user-1"
    assert sent.json["from"]["id"] == "28:bot"
    [issued] = fake_aad.issuances
    assert sent.authorization == f"Bearer {issued.token}"
    assert fake_aad.is_valid_token(issued.token)
    assert await stored_keys(bot.store) == [f"{CHANNEL}/{CONVERSATION}"]


@pytest.mark.parametrize("version", ["1.0", "2.0"])
async def test_emulator_token_gets_the_echo(
    bot, emulator_identity, fake_connector, fake_aad, version
):
    incoming = activity_for(fake_connector.url, channelId="emulator")
    token = emulator_identity.mint_emulator_token(bot.settings.app_id, version=version)
    response = await bot.handle(post(incoming, token))

    assert response.status == 200
    [sent] = fake_connector.requests
    assert sent.json["text"] == "Echo: hello there"
    assert fake_aad.is_valid_token(sent.authorization.removeprefix("Bearer "))
    assert await stored_keys(bot.store) == [f"emulator/{CONVERSATION}"]


async def test_welcome_for_members_added_but_not_for_the_bot(bot, channel_identity, fake_connector):
    token = channel_token(channel_identity, bot)
    user_joined = activity_for(
        fake_connector.url, type="conversationUpdate", membersAdded=[{"id": "29:u2", "name": "Bo"}]
    )
    bot_joined = activity_for(
        fake_connector.url, type="conversationUpdate", membersAdded=[{"id": "28:bot"}]
    )
    for incoming in (user_joined, bot_joined):
        del incoming["text"]
        assert (await bot.handle(post(incoming, token))).status == 200

    [sent] = fake_connector.requests
    assert sent.operation == "sendToConversation"  # a conversationUpdate is not replied to
    assert "Welcome, Bo!" in sent.json["text"]


async def test_caller_id_is_set_from_the_token_not_the_body(
    make_bot, channel_identity, emulator_identity, fake_connector
):
    router = Router()
    seen: list[str | None] = []
    router.catch_all()(lambda turn: seen.append(turn.activity.get("callerId")))
    bot = make_bot(router)
    forged = activity_for(fake_connector.url, callerId="urn:botframework:aadappid:forged")

    await bot.handle(post(forged, channel_token(channel_identity, bot)))
    emulator = dict(forged, channelId="emulator")
    await bot.handle(post(emulator, emulator_identity.mint_emulator_token(bot.settings.app_id)))

    assert seen == ["urn:botframework:azure", None]


# --- authentication failures: 401, one body, no side effects -------------------------------


def _broken(kind: str):
    return lambda ids, bot, url: ids.mint_broken(kind, bot.settings.app_id, url)


FAILURES = {
    "missing header": lambda ids, bot, url: None,
    "garbage": _broken("garbage"),
    "alg none": _broken("alg_none"),
    "hs256 with the public key": _broken("hs256_public_key"),
    "key not in the jwks": _broken("unpublished_key"),
    "unknown kid": _broken("unknown_kid"),
    "wrong aud": lambda ids, bot, url: ids.mint_channel_token("another-app", url),
    "wrong iss": lambda ids, bot, url: ids.mint_channel_token(
        bot.settings.app_id, url, issuer="https://api.botframework.evil"
    ),
    "expired beyond skew": lambda ids, bot, url: ids.mint_channel_token(
        bot.settings.app_id, url, exp=time.time() - 301 - 5
    ),
    "no serviceurl claim": lambda ids, bot, url: ids.mint_channel_token(bot.settings.app_id, None),
    "nbf in the future": lambda ids, bot, url: ids.mint_channel_token(
        bot.settings.app_id, url, nbf=time.time() + 301 + 60
    ),
    "no exp": lambda ids, bot, url: ids.mint_channel_token(bot.settings.app_id, url, drop=["exp"]),
}


@pytest.mark.parametrize("case", list(FAILURES))
async def test_auth_failures_are_401_without_side_effects(
    bot, channel_identity, fake_connector, fake_aad, case
):
    token = FAILURES[case](channel_identity, bot, fake_connector.url)
    response = await bot.handle(post(activity_for(fake_connector.url), token))
    await _assert_rejected(response, bot, fake_connector, fake_aad)


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "bearer  ", "Token abc"])
async def test_non_bearer_headers_are_401(bot, fake_connector, fake_aad, header):
    request = post(activity_for(fake_connector.url), headers={"Authorization": header})
    await _assert_rejected(await bot.handle(request), bot, fake_connector, fake_aad)


async def test_serviceurl_claim_must_match_the_activity(
    bot, channel_identity, fake_connector, attacker, fake_aad
):
    # A genuine token for the real serviceUrl, replayed with an activity pointing elsewhere.
    token = channel_token(channel_identity, bot, fake_connector.url)
    response = await bot.handle(post(activity_for(attacker.url), token))
    await _assert_rejected(response, bot, fake_connector, fake_aad)
    assert attacker.requests == []


@pytest.mark.parametrize("suffix", ["/?", "/#"])
async def test_a_service_url_that_only_folds_to_the_claim_is_401_and_stores_nothing(
    bot, channel_identity, fake_connector, fake_aad, suffix
):
    # Stored, such a URL would replace the good one and every later send would be refused.
    token = channel_token(channel_identity, bot, fake_connector.url + "/")
    response = await bot.handle(post(activity_for(fake_connector.url + suffix), token))
    await _assert_rejected(response, bot, fake_connector, fake_aad)


async def test_channel_not_endorsed_by_the_signing_key(
    bot, channel_identity, fake_connector, fake_aad
):
    token = channel_token(channel_identity, bot)
    incoming = activity_for(fake_connector.url, channelId="not-endorsed")
    await _assert_rejected(await bot.handle(post(incoming, token)), bot, fake_connector, fake_aad)


async def test_emulator_token_signed_by_a_key_endorsed_for_other_channels_is_401(
    bot, emulator_identity, fake_connector, fake_aad
):
    # AAD's keys carry no endorsements and sign any Emulator token; one that does carry
    # them vouches for those channels only.
    kid = emulator_identity.rotate_key(endorsements=["webchat", "directline"])
    token = emulator_identity.mint_emulator_token(bot.settings.app_id, version="2.0", kid=kid)
    incoming = activity_for(fake_connector.url, channelId="emulator")
    await _assert_rejected(await bot.handle(post(incoming, token)), bot, fake_connector, fake_aad)

    # The same token for a channel its key is endorsed for is answered.
    webchat = activity_for(fake_connector.url, channelId="webchat")
    assert (await bot.handle(post(webchat, token))).status == 200
    assert [r.json["text"] for r in fake_connector.requests] == ["Echo: hello there"]


async def test_token_with_an_app_id_but_no_header_in_unauthenticated_mode_is_401(
    make_bot, fake_connector, fake_aad
):
    bot = make_bot()  # MicrosoftAppId is set: a missing token is always 401
    await _assert_rejected(
        await bot.handle(post(activity_for(fake_connector.url))), bot, fake_connector, fake_aad
    )


# --- signing keys unavailable: 503, not a verdict on the token ------------------------------


@pytest.mark.parametrize("kind", ["channel", "emulator"])
async def test_a_valid_token_while_the_keys_cannot_be_fetched_is_503_without_side_effects(
    bot, channel_identity, emulator_identity, fake_connector, fake_aad, caplog, kind
):
    # A cold instance (no keys cached) during an outage of the key endpoint: a 401 would
    # tell the channel its valid token is bad; 503 with Retry-After says "try again".
    if kind == "channel":
        channel_identity.set_outage(True)
        token = channel_token(channel_identity, bot)
        incoming = activity_for(fake_connector.url)
    else:
        emulator_identity.set_outage(True)
        token = emulator_identity.mint_emulator_token(bot.settings.app_id)
        incoming = activity_for(fake_connector.url, channelId="emulator")
    with caplog.at_level(logging.INFO):
        response = await bot.handle(post(incoming, token))

    assert response.status == 503
    assert response.body == KEYS_UNAVAILABLE.encode()
    assert 1 <= int(response.headers["Retry-After"]) <= 30
    assert fake_connector.requests == []
    assert await stored_keys(bot.store) == []
    assert fake_aad.issuances == []
    assert "outage" in caplog.text and token not in caplog.text


async def test_requests_during_a_key_outage_log_one_error_a_minute(
    bot, channel_identity, fake_connector, caplog
):
    # Every request meets the outage, anyone's included: one line a minute says it.
    channel_identity.set_outage(True)
    token = channel_token(channel_identity, bot)
    with caplog.at_level(logging.INFO, logger="shared.messages"):
        for _ in range(5):
            assert (await bot.handle(post(activity_for(fake_connector.url), token))).status == 503
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "messages: 503" in errors[0] and "outage" in errors[0]


@pytest.mark.parametrize(
    "case",
    [
        "missing header",
        "garbage",
        "alg none",
        "hs256 with the public key",
        "wrong aud",
        "wrong iss",
        "expired beyond skew",
        "nbf in the future",
        "no exp",
    ],
)
async def test_during_a_key_outage_a_token_fault_is_still_401(
    bot, channel_identity, fake_connector, fake_aad, case
):
    channel_identity.set_outage(True)
    token = FAILURES[case](channel_identity, bot, fake_connector.url)
    response = await bot.handle(post(activity_for(fake_connector.url), token))
    await _assert_rejected(response, bot, fake_connector, fake_aad)


async def _assert_rejected(response, bot, fake_connector, fake_aad) -> None:
    assert response.status == 401
    assert response.body == UNAUTHORIZED.encode()
    assert fake_connector.requests == []
    assert await stored_keys(bot.store) == []
    assert fake_aad.issuances == []


# --- malformed requests: the designed 4xx, nothing sent or written --------------------------

MALFORMED = {
    "not json": (415, {"content_type": "text/plain"}),
    "form": (415, {"content_type": "application/x-www-form-urlencoded"}),
    "no content type": (415, {"content_type": ""}),
    "over the limit": (413, {"body": b'{"type":"message","text":"' + b"x" * (1 << 20) + b'"}'}),
    "content-length over the limit": (413, {"headers": {"Content-Length": str(2 << 20)}}),
    "broken json": (400, {"body": b'{"type": "message",'}),
    "array": (400, {"body": b"[]"}),
    "no type": (400, {"drop": "type"}),
    "no channelId": (400, {"drop": "channelId"}),
    "no serviceUrl": (400, {"drop": "serviceUrl"}),
    "no conversation": (400, {"drop": "conversation"}),
    "ftp serviceUrl": (400, {"fields": {"serviceUrl": "ftp://127.0.0.1/"}}),
    "conversation without id": (400, {"fields": {"conversation": {"name": "x"}}}),
    "from is a string": (400, {"fields": {"from": "29:user"}}),
    # A route predicate would raise on these (a 500, the apology sent with the bot's token).
    "recipient.id a number": (
        400,
        {
            "fields": {
                "type": "conversationUpdate",
                "recipient": {"id": 28},
                "membersAdded": [{"id": "29:new-user"}],
            }
        },
    ),
    "a member's id a number": (
        400,
        {"fields": {"type": "conversationUpdate", "membersAdded": [{"id": 29}]}},
    ),
    # The bot is told from the members by `recipient.id` alone (it greeted itself).
    "members added without a recipient": (
        400,
        {
            "fields": {"type": "conversationUpdate", "membersAdded": [{"id": "28:bot"}]},
            "drop": "recipient",
        },
    ),
    # Ids that would be dot segments in a Connector path.
    "id '..'": (400, {"fields": {"id": ".."}}),
    "conversation.id '.'": (400, {"fields": {"conversation": {"id": "."}}}),
    "replyToId '..'": (400, {"fields": {"replyToId": ".."}}),
    # Ids no Connector path can carry (a lone surrogate is JSON, not text): the reply
    # failed (a 500) after the reference of an unreachable conversation was stored.
    "conversation.id with a lone surrogate": (400, {"fields": {"conversation": {"id": "c\ud800"}}}),
    "id with a lone surrogate": (400, {"fields": {"id": "m\udc00"}}),
    "replyToId with a lone surrogate": (400, {"fields": {"replyToId": "m\udc00"}}),
    # A conversation key is "<channelId>/<conversation.id>": state and references have
    # no key for a channel id with a '/' (a handler using state failed with a 500).
    "channelId with a '/'": (400, {"fields": {"channelId": "web/chat"}}),
    "channelId with a lone surrogate": (400, {"fields": {"channelId": "web\ud800"}}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_requests_get_the_designed_status(
    bot, channel_identity, fake_connector, fake_aad, case
):
    status, how = MALFORMED[case]
    incoming = activity_for(fake_connector.url, **how.get("fields", {}))
    incoming.pop(how.get("drop", ""), None)
    request = post(
        incoming,
        channel_token(channel_identity, bot),  # a valid token does not make it acceptable
        body=how.get("body"),
        content_type=how.get("content_type", "application/json"),
        headers=how.get("headers"),
    )
    response = await bot.handle(request)
    assert response.status == status
    assert fake_connector.requests == []
    assert await stored_keys(bot.store) == []
    assert fake_aad.issuances == []
    assert channel_identity.jwks_requests == 0  # rejected before the token was even looked at


async def test_json_nested_just_under_the_parsers_limit_is_400_not_500(
    bot, channel_identity, fake_connector, fake_aad
):
    # ~940 levels still parse, but the reply and the stored reference (which copy the
    # conversation) are serialised deeper in the stack: RecursionError, a 500, half a turn.
    incoming = activity_for(fake_connector.url)
    body = json.dumps(incoming).replace('"personal"', "[" * 940 + "]" * 940).encode()
    response = await bot.handle(post(incoming, channel_token(channel_identity, bot), body=body))
    assert response.status == 400
    assert fake_connector.requests == []
    assert await stored_keys(bot.store) == []
    assert fake_aad.issuances == []


async def test_unauthenticated_requests_cannot_flood_the_log(bot, fake_connector, caplog):
    incoming = activity_for(
        fake_connector.url, id="i" * 200_000, conversation={"id": "c" * 200_000}
    )
    with caplog.at_level(logging.INFO):
        response = await bot.handle(post(incoming))
    assert response.status == 401
    assert caplog.records
    assert max(len(record.getMessage()) for record in caplog.records) < 1000
    assert "activity='iiii" in caplog.text  # still says which activity it was


async def test_requests_refused_for_one_reason_log_one_warning_a_minute(
    bot, fake_connector, caplog
):
    # Anyone can send requests with a junk token: each was a WARNING line (ingestion the
    # operator pays for). Refused alike, they make one line a minute.
    import base64

    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    incoming = activity_for(fake_connector.url)
    issuer = {"iss": "https://api.botframework.com"}
    # Junk, or a key id of its own each time (a new cause per request, were it the text).
    tokens = ["junk"] * 3 + [
        f"{part({'alg': 'RS256', 'kid': f'kid-{n}'})}.{part(issuer)}.c2ln" for n in range(5)
    ]
    with caplog.at_level(logging.INFO):
        for token in tokens:
            assert (await bot.handle(post(incoming, token))).status == 401
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("messages: 401" in line for line in warnings)
    assert "unknown key id 'kid-0'" in warnings[1]


async def test_ids_a_client_chose_cannot_fake_a_log_line_even_at_debug(
    bot, channel_identity, fake_connector, caplog
):
    # Authenticated, an activity may carry any id; the lines that say what was recorded
    # or removed quote it (a line break in it made a line of the bot's own).
    forged = "1\nERROR shared.messages: messages: FORGED"
    token = channel_token(channel_identity, bot)
    added = activity_for(fake_connector.url, id=forged, conversation={"id": f"19:{forged}"})
    removed = activity_for(
        fake_connector.url,
        id=forged,
        type="conversationUpdate",
        conversation={"id": f"19:{forged}"},
        membersRemoved=[{"id": "28:bot"}],
    )
    typed = activity_for(fake_connector.url, type=f"message{forged}")  # any string is a type
    with caplog.at_level(logging.DEBUG, logger="shared"):
        assert (await bot.handle(post(added, token))).status == 200
        assert await stored_keys(bot.store) != []
        assert (await bot.handle(post(removed, token))).status == 200
        assert await stored_keys(bot.store) == []
        assert (await bot.handle(post(typed, token))).status == 200
    lines = [record.getMessage() for record in caplog.records]
    assert any("references: removed" in line and "\\nERROR" in line for line in lines)
    assert not [line for line in lines if "\n" in line]


async def test_logs_carry_neither_tokens_nor_message_text(
    bot, channel_identity, fake_connector, fake_aad, caplog
):
    token = channel_token(channel_identity, bot)
    incoming = activity_for(fake_connector.url, text="my secret plans")
    forged = channel_identity.mint_broken(
        "unpublished_key", bot.settings.app_id, fake_connector.url
    )
    with caplog.at_level(logging.DEBUG, logger="shared"):
        assert (await bot.handle(post(incoming, token))).status == 200
        assert (await bot.handle(post(incoming, forged))).status == 401
    assert "messages: 401" in caplog.text
    [issued] = fake_aad.issuances
    for secret in (token, forged, forged.split(".")[2], issued.token, "my secret plans"):
        assert secret not in caplog.text


async def test_anonymous_mode_accepts_only_real_loopback_service_urls(fake_connector):
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    bot = Bot(settings, fake_connector.url, shipped_router)
    try:
        port = fake_connector.url.rsplit(":", 1)[1]
        # urlsplit reads the host as 127.0.0.1, a WHATWG parser as evil.example.
        incoming = activity_for(f"http://evil.example\\@127.0.0.1:{port}", channelId="emulator")
        response = await bot.handle(post(incoming))
        # Local mode only: the 401 says why, in a fixed text that quotes nothing sent.
        assert (response.status, response.body) == (401, LOCAL_UNAUTHORIZED.encode())
        assert b"loopback serviceUrls" in response.body and b"evil" not in response.body
        assert await stored_keys(bot.store) == []
        # The genuine loopback URL is still served.
        response = await bot.handle(post(dict(incoming, serviceUrl=fake_connector.url)))
        assert response.status == 200
        assert fake_connector.activities[0]["text"] == "Echo: hello there"
    finally:
        await bot.runtime.close()


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "attacker.example:7071"},
        {"Host": "127.0.0.1:7071", "Origin": "http://attacker.example:7071"},
        {"Host": "127.0.0.1:7071", "Origin": "null"},
    ],
)
async def test_anonymous_mode_answers_no_request_addressed_by_a_host_name(fake_connector, headers):
    # A web page whose name was rebound to 127.0.0.1 sends it as Host (and Origin): it
    # drove the unauthenticated bot, which then called any local port its serviceUrl
    # named and, with expectReplies, handed back what that port answered.
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    bot = Bot(settings, fake_connector.url, shipped_router)
    try:
        incoming = activity_for(fake_connector.url, channelId="emulator")
        response = await bot.handle(post(incoming, headers=headers))
        assert (response.status, response.body) == (401, LOCAL_NAME_UNAUTHORIZED.encode())
        assert await stored_keys(bot.store) == [] and fake_connector.requests == []
        # By this machine's own address (what local clients send), served.
        for own in ({"Host": "127.0.0.1:7071"}, {"Host": "localhost:7071"}, {"Host": "[::1]"}):
            local = {**own, "Origin": "http://localhost:3978"}
            assert (await bot.handle(post(incoming, headers=local))).status == 200
        assert len(fake_connector.activities) == 3
    finally:
        await bot.runtime.close()


async def test_a_host_name_is_no_matter_with_authentication_on(
    bot, channel_identity, fake_connector
):
    token = channel_token(channel_identity, bot)
    incoming = activity_for(fake_connector.url)
    headers = {"Host": "mybot.azurewebsites.net", "Origin": "https://example.com"}
    assert (await bot.handle(post(incoming, token, headers=headers))).status == 200
    assert fake_connector.activities[0]["text"] == "Echo: hello there"


async def test_a_send_after_the_expect_replies_answer_was_built_raises_instead_of_vanishing(
    make_bot, channel_identity, fake_connector
):
    # A task the handler left running sends once the answer has gone: it was buffered
    # ({}: "sent") into an answer already on its way, and reached nobody.
    router = Router()
    go = asyncio.Event()
    late: list[asyncio.Task] = []

    @router.message()
    async def handler(turn):
        await turn.reply("first")

        async def follow_up():
            await go.wait()
            return await turn.send("the follow-up")

        late.append(asyncio.get_running_loop().create_task(follow_up()))

    bot = make_bot(router)
    incoming = activity_for(fake_connector.url, deliveryMode="expectReplies")
    response = await bot.handle(post(incoming, channel_token(channel_identity, bot)))
    assert [a["text"] for a in json.loads(response.body)["activities"]] == ["first"]
    go.set()
    with pytest.raises(RuntimeError, match="answer was sent"):
        await late[0]
    assert fake_connector.requests == []


async def test_get_is_405(bot, fake_connector):
    response = await bot.handle(post(activity_for(fake_connector.url), method="GET"))
    assert response.status == 405
    assert fake_connector.requests == []


# --- routing outcomes in the HTTP answer ----------------------------------------------------


async def test_invoke_answers_come_back_in_the_response(make_bot, channel_identity, fake_connector):
    router = Router()

    @router.invoke("adaptiveCard/action")
    async def card(turn):
        return InvokeResponse(200, {"statusCode": 200, "value": turn.activity["value"]["x"]})

    @router.invoke("composeExtension/query")
    async def query(turn):
        return {"composeExtension": {"type": "result", "attachments": []}}

    bot = make_bot(router)
    token = channel_token(channel_identity, bot)
    card_action = activity_for(
        fake_connector.url, type="invoke", name="adaptiveCard/action", value={"x": "ok"}
    )
    response = await bot.handle(post(card_action, token))
    assert response.status == 200
    assert json.loads(response.body) == {"statusCode": 200, "value": "ok"}
    assert response.headers["Content-Type"].startswith("application/json")

    query_invoke = activity_for(fake_connector.url, type="invoke", name="composeExtension/query")
    response = await bot.handle(post(query_invoke, token))
    assert json.loads(response.body)["composeExtension"]["type"] == "result"

    unknown = activity_for(fake_connector.url, type="invoke", name="task/fetch")
    response = await bot.handle(post(unknown, token))
    assert (response.status, response.body) == (501, b"")
    assert fake_connector.requests == []


async def test_unknown_activity_types_are_200(bot, channel_identity, fake_connector):
    incoming = activity_for(fake_connector.url, type="somethingFromTheFuture")
    response = await bot.handle(post(incoming, channel_token(channel_identity, bot)))
    assert (response.status, response.body) == (200, b"")
    assert fake_connector.requests == []


async def test_expect_replies_returns_the_buffered_activities(
    bot, channel_identity, fake_connector
):
    incoming = activity_for(fake_connector.url, deliveryMode="expectReplies")
    response = await bot.handle(post(incoming, channel_token(channel_identity, bot)))
    assert response.status == 200
    [reply] = json.loads(response.body)["activities"]
    assert reply["text"] == "Echo: hello there"
    assert reply["replyToId"] == incoming["id"]
    assert fake_connector.requests == []


async def test_an_answer_that_is_not_json_is_a_500_never_sent_as_invalid_json(
    make_bot, channel_identity, fake_connector, caplog
):
    # NaN and Infinity are not JSON: a channel's parser refuses `{"score":NaN}`. An answer
    # carrying one is the bot's error (500), as a set or any other non-JSON value is.
    router = Router()

    @router.invoke("composeExtension/query")
    async def scored(turn):
        return {"composeExtension": {"type": "result", "score": float("nan")}}

    @router.invoke("task/fetch")
    async def unordered(turn):
        return {"task": {"ids": {1, 2}}}

    @router.message()
    async def infinite(turn):
        await turn.reply({"type": "message", "text": "ranked", "value": {"rank": float("inf")}})

    bot = make_bot(router)
    token = channel_token(channel_identity, bot)
    with caplog.at_level(logging.ERROR):
        for incoming in (
            activity_for(fake_connector.url, type="invoke", name="composeExtension/query"),
            activity_for(fake_connector.url, type="invoke", name="task/fetch"),
            activity_for(fake_connector.url, deliveryMode="expectReplies"),
        ):
            response = await bot.handle(post(incoming, token))
            assert (response.status, response.body) == (500, SERVER_ERROR.encode())
    assert caplog.text.count("is not JSON") == 3
    # A failed turn, as one that raised: the dialog's and the message's users get the
    # apology in the chat, the message extension's sees the failure where they type.
    # Nothing else was sent.
    texts = [request.json["text"] for request in fake_connector.requests]
    assert texts == [APOLOGY, APOLOGY]


async def test_an_invoke_answer_with_a_status_outside_200_to_599_is_a_500(
    make_bot, channel_identity, fake_connector
):
    router = Router()

    @router.invoke("task/fetch")
    async def odd(turn):
        return InvokeResponse(700, {"x": 1})

    bot = make_bot(router)
    invoke = activity_for(fake_connector.url, type="invoke", name="task/fetch")
    response = await bot.handle(post(invoke, channel_token(channel_identity, bot)))
    assert (response.status, response.body) == (500, SERVER_ERROR.encode())


@pytest.mark.parametrize("status", [204, 304])
async def test_an_invoke_answered_204_or_304_has_no_body(
    make_bot, channel_identity, fake_connector, status
):
    # HTTP: a 204 or 304 answer carries no body, whatever the handler gave with it.
    router = Router()

    @router.invoke("task/fetch")
    async def unchanged(turn):
        return InvokeResponse(status, {"statusCode": 200, "value": "ignored"})

    bot = make_bot(router)
    invoke = activity_for(fake_connector.url, type="invoke", name="task/fetch")
    response = await bot.handle(post(invoke, channel_token(channel_identity, bot)))
    assert (response.status, response.body) == (status, b"")
    assert fake_connector.requests == []


async def test_expect_replies_invoke_carries_the_invoke_response(
    make_bot, channel_identity, fake_connector
):
    # As the SDKs do: the invoke's answer travels as an `invokeResponse` activity in the
    # expected replies, instead of being dropped (a skill host reads it from there).
    router = Router()

    @router.invoke("adaptiveCard/action")
    async def card(turn):
        await turn.send("working on it")
        return InvokeResponse(
            200, {"statusCode": 200, "type": "application/vnd.microsoft.activity.message"}
        )

    bot = make_bot(router)
    token = channel_token(channel_identity, bot)
    action = activity_for(
        fake_connector.url, type="invoke", name="adaptiveCard/action", deliveryMode="expectReplies"
    )
    response = await bot.handle(post(action, token))
    assert response.status == 200
    sent, answer = json.loads(response.body)["activities"]
    assert sent["text"] == "working on it"
    assert answer == {
        "type": "invokeResponse",
        "value": {
            "status": 200,
            "body": {"statusCode": 200, "type": "application/vnd.microsoft.activity.message"},
        },
    }

    unhandled = dict(action, name="task/fetch")
    response = await bot.handle(post(unhandled, token))
    assert response.status == 200
    assert json.loads(response.body)["activities"] == [
        {"type": "invokeResponse", "value": {"status": 501}}
    ]
    assert fake_connector.requests == []


async def test_raising_handler_apologises_and_answers_500(
    make_bot, channel_identity, fake_connector, fake_aad, caplog
):
    router = Router()

    @router.message()
    async def broken(turn):
        raise RuntimeError("database password is hunter2")

    bot = make_bot(router)
    incoming = activity_for(fake_connector.url)
    with caplog.at_level(logging.ERROR):
        response = await bot.handle(post(incoming, channel_token(channel_identity, bot)))

    assert response.status == 500
    assert response.body == SERVER_ERROR.encode()
    [apology] = fake_connector.requests
    assert apology.json["text"] == APOLOGY
    assert apology.json["replyToId"] == incoming["id"]
    assert apology.authorization == f"Bearer {fake_aad.issuances[0].token}"
    assert f"activity='{incoming['id']}'" in caplog.text
    assert f"{CHANNEL}/{CONVERSATION}" in caplog.text
    # The log says what and where, never the exception's text (it may carry secrets).
    assert "RuntimeError at unit/test_messages.py:" in caplog.text
    assert "in broken" in caplog.text
    assert "hunter2" not in caplog.text
    assert "hunter2" not in apology.json["text"] and b"hunter2" not in response.body
    assert await stored_keys(bot.store) == [f"{CHANNEL}/{CONVERSATION}"]


@pytest.mark.parametrize(
    ("working", "custom", "apologised"),
    [(0.5, None, True), (1.6, None, False), (0.5, "reply", True), (0.5, "update", True)],
)
async def test_the_apology_keeps_within_the_channels_wait(
    make_bot, channel_identity, fake_connector, monkeypatch, caplog, working, custom, apologised
):
    # The channel waits 5 s here (15 s in life); the reference is recorded after the turn
    # (up to 2 s) and a second is kept for the answer. A handler failing after 0.5 s leaves
    # the apology (or the bot's own error handler) 1.5 s against a Connector answering
    # 503 with Retry-After: it gives up in time. After 1.6 s nothing is left: no apology.
    # (Given the client's whole 12 s, the answer came after the channel stopped waiting,
    # and the channel sends the activity again.)
    from tools.botsim.connector import Reply

    monkeypatch.setattr(messages_module, "CHANNEL_WINDOW", 5.0)
    router = Router()

    @router.message()
    async def slow_then_broken(turn):
        await asyncio.sleep(working)
        raise RuntimeError("the API answered garbage")

    if custom:

        @router.error
        async def own_apology(turn, error):
            if custom == "reply":
                await turn.reply("that did not work")
            else:  # the progress card it posted earlier, turned into "failed"
                await turn.update_activity("progress-1", "that did not work")

    bot = make_bot(router)
    fake_connector.script(
        "*", "/activities", [Reply(503, delay=0.3, headers={"Retry-After": "1"})] * 20
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        response = await bot.handle(
            post(activity_for(fake_connector.url), channel_token(channel_identity, bot))
        )
    assert response.status == 500
    assert time.monotonic() - started < 5.0
    tried = [
        r for r in fake_connector.requests if r.operation in ("replyToActivity", "updateActivity")
    ]
    assert bool(tried) is apologised
    assert ("no apology" in caplog.text) is not apologised


async def test_a_handler_raising_a_cancelled_error_of_its_own_fails_like_any_other(
    make_bot, channel_identity, fake_connector
):
    # It awaited a task cancelled elsewhere: a failed turn (500, the apology, the
    # reference recorded), not an escape past the pipeline.
    router = Router()

    @router.message()
    async def waits_on_a_cancelled_task(turn):
        await turn.reply("working on it")
        task = asyncio.ensure_future(asyncio.sleep(10))
        task.cancel()
        await task

    bot = make_bot(router)
    incoming = activity_for(fake_connector.url)
    response = await bot.handle(post(incoming, channel_token(channel_identity, bot)))
    assert response.status == 500
    assert [r.json["text"] for r in fake_connector.requests] == ["working on it", APOLOGY]
    assert await stored_keys(bot.store) == [f"{CHANNEL}/{CONVERSATION}"]


async def test_a_turn_the_host_cancels_stays_cancelled_and_posts_nothing_more(
    make_bot, channel_identity, fake_connector
):
    # Its time is up, or the host stops: not a failure of the handler. No 500, no
    # apology: the cancellation goes on to the host.
    router = Router()
    started = asyncio.Event()

    @router.message()
    async def slow(turn):
        started.set()
        await asyncio.sleep(30)

    bot = make_bot(router)
    request = post(activity_for(fake_connector.url), channel_token(channel_identity, bot))
    turn = asyncio.ensure_future(bot.handle(request))
    await started.wait()
    turn.cancel()
    [ended] = await asyncio.gather(turn, return_exceptions=True)
    assert isinstance(ended, asyncio.CancelledError)
    assert fake_connector.requests == []


async def test_a_failing_search_or_card_refresh_posts_no_apology_but_a_failing_click_does(
    make_bot, channel_identity, fake_connector
):
    # A message extension searches as the user types, in whatever chat they are in; a card
    # refreshes itself for each person who views it. A failure of either is shown by the
    # client; an apology posted each time would fill the chat with them.
    router = Router()

    @router.invoke("composeExtension/query")
    @router.invoke("adaptiveCard/action")
    async def broken(turn):
        raise RuntimeError("search backend down")

    bot = make_bot(router)
    token = channel_token(channel_identity, bot)
    search = activity_for(fake_connector.url, type="invoke", name="composeExtension/query")
    refresh = activity_for(
        fake_connector.url,
        type="invoke",
        name="adaptiveCard/action",
        value={"action": {"type": "Action.Execute", "verb": "refresh"}, "trigger": "automatic"},
    )
    for invoke in (search, search, refresh):
        response = await bot.handle(post(invoke, token))
        assert (response.status, response.body) == (500, SERVER_ERROR.encode())
    assert fake_connector.requests == []

    click = dict(refresh, id="click-1", value={"action": {"type": "Action.Execute"}})
    response = await bot.handle(post(click, token))
    assert response.status == 500
    [apology] = fake_connector.requests  # a button the user pressed: told in the chat
    assert apology.json["text"] == APOLOGY and apology.json["replyToId"] == "click-1"


async def test_a_failing_removal_handler_posts_no_apology_to_the_conversation_left(
    make_bot, channel_identity, fake_connector
):
    # Uninstalled or removed: nobody there reads it (Teams refuses it), and the channel's
    # retry of the 500 posted it again.
    router = Router()

    @router.installation_removed()
    @router.bot_removed()
    async def broken(turn):
        raise RuntimeError("cleanup failed")

    bot = make_bot(router)
    token = channel_token(channel_identity, bot)
    bot_id = "28:bot"  # the activity's recipient
    uninstall = activity_for(fake_connector.url, type="installationUpdate", action="remove")
    removed = activity_for(
        fake_connector.url, type="conversationUpdate", membersRemoved=[{"id": bot_id}]
    )
    for removal in (uninstall, removed):
        response = await bot.handle(post(removal, token))
        assert (response.status, response.body) == (500, SERVER_ERROR.encode())
    assert fake_connector.requests == []


class GatedFailingStore(MemoryReferenceStore):
    """The memory store, except that a write waits until the reply has reached the
    Connector and then fails like a storage outage: proves the reply does not wait for the
    write and the write's failure does not change the answer."""

    def __init__(self, connector: FakeConnector) -> None:
        super().__init__()
        self.connector = connector
        self.reply_arrived_first: bool | None = None

    async def upsert(self, reference, *, team_id=None, refresh=False) -> bool:
        try:
            await self.connector.wait_for(lambda requests: requests, timeout=3)
            self.reply_arrived_first = True
        except TimeoutError:  # the pipeline waited for this write before replying
            self.reply_arrived_first = False
        raise StoreError("reference store: write failed (simulated outage)")


async def test_reference_write_neither_delays_nor_breaks_the_reply(
    bot, channel_identity, fake_connector, caplog
):
    store = GatedFailingStore(fake_connector)
    bot.runtime.references = store
    with caplog.at_level(logging.ERROR):
        response = await bot.handle(
            post(activity_for(fake_connector.url), channel_token(channel_identity, bot))
        )
    assert response.status == 200
    assert fake_connector.activities[0]["text"] == "Echo: hello there"
    assert store.reply_arrived_first is True
    assert "reference not recorded" in caplog.text


async def test_an_activity_from_the_bots_own_account_leaves_the_1to1_linked_to_its_user(
    bot, channel_identity, fake_connector
):
    token = channel_token(channel_identity, bot)
    await bot.handle(post(activity_for(fake_connector.url), token))
    own = activity_for(fake_connector.url, id="2", **{"from": {"id": "28:bot", "name": "Bot"}})

    assert (await bot.handle(post(own, token))).status == 200

    found = await bot.store.find_by_user(channel_id=CHANNEL, user_id="29:user-1")
    assert found is not None and found.reference["user"]["id"] == "29:user-1"


class Outage(MemoryReferenceStore):
    down = True

    async def upsert(self, reference, *, team_id=None, refresh=False) -> bool:
        if self.down:
            raise StoreError("reference store: write failed (simulated outage)")
        return await super().upsert(reference, team_id=team_id, refresh=refresh)


async def test_a_teams_addition_not_stored_is_a_500_and_the_retry_stores_and_welcomes_once(
    bot, channel_identity, fake_connector
):
    # A bot in a team hears only its @mentions: no later activity would store the team,
    # and broadcasts would miss it for good. The welcome waits for the write.
    store = Outage()
    bot.runtime.references = store
    added = activity_for(
        fake_connector.url,
        type="conversationUpdate",
        membersAdded=[{"id": "28:bot"}, {"id": "29:user-1", "name": "Ada"}],
    )
    token = channel_token(channel_identity, bot)

    assert (await bot.handle(post(added, token))).status == 500
    assert (fake_connector.activities, await stored_keys(store)) == ([], [])

    store.down = False  # the channel's retry
    assert (await bot.handle(post(added, token))).status == 200
    assert await stored_keys(store) == [f"{CHANNEL}/{CONVERSATION}"]
    assert [a["text"] for a in fake_connector.activities] == [greeting(["Ada"])]


async def test_an_addition_elsewhere_is_welcomed_though_storage_is_down(
    bot, channel_identity, fake_connector
):
    # Web Chat and Direct Line add the bot at each conversation's start, and its first
    # message records it: the welcome does not wait for storage, nor fail with it.
    store = Outage()
    bot.runtime.references = store
    added = activity_for(
        fake_connector.url,
        channelId="webchat",
        type="conversationUpdate",
        membersAdded=[{"id": "28:bot"}, {"id": "29:user-1", "name": "Ada"}],
        channelData={},
    )
    response = await bot.handle(post(added, channel_token(channel_identity, bot)))
    assert response.status == 200
    assert [a["text"] for a in fake_connector.activities] == [greeting(["Ada"])]


class MeetingStore(MemoryReferenceStore):
    """A write that returns only once the invoke's handler has started: a pipeline that
    ran the two one after the other would wait here until the test's timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.handler_started = asyncio.Event()
        self.write_started = asyncio.Event()

    async def upsert(self, reference, *, team_id=None, refresh=False) -> bool:
        self.write_started.set()
        await asyncio.wait_for(self.handler_started.wait(), 5)
        return await super().upsert(reference, team_id=team_id, refresh=refresh)


async def test_an_invoke_answer_waits_for_the_reference_write_beside_it_not_after_it(
    make_bot, channel_identity, fake_connector
):
    router = Router()

    @router.invoke("adaptiveCard/action")
    async def card(turn):
        store.handler_started.set()
        await asyncio.wait_for(store.write_started.wait(), 5)  # the write is under way
        return InvokeResponse(200, {"statusCode": 200, "value": "done"})

    bot = make_bot(router)
    store = MeetingStore()
    bot.runtime.references = store
    card_action = activity_for(fake_connector.url, type="invoke", name="adaptiveCard/action")

    response = await bot.handle(post(card_action, channel_token(channel_identity, bot)))

    assert (response.status, json.loads(response.body)["value"]) == (200, "done")
    assert await stored_keys(store) == [f"{CHANNEL}/{CONVERSATION}"]


class SlowDeletes(MemoryReferenceStore):
    """Each delete costs two storage round trips (read, then a conditional delete)."""

    round_trip = 0.0
    fail = False

    async def delete(self, key: str) -> bool:
        await asyncio.sleep(2 * self.round_trip)
        if self.fail:
            raise StoreError("reference store: delete failed (simulated outage)")
        return await super().delete(key)


def team_channel(n: int) -> dict:
    return {"id": f"19:ch{n}@thread.tacv2", "conversationType": "channel", "tenantId": "t-1"}


TEAM = {"tenant": {"id": "t-1"}, "team": {"id": "19:team@thread.tacv2"}}


async def test_removal_from_a_team_removes_all_its_channels_within_the_answer(
    bot, channel_identity, fake_connector
):
    store = SlowDeletes()
    bot.runtime.references = store
    for n in range(100):  # the bot was @mentioned in 100 of the team's channels
        await store.upsert(
            {**activity_for(fake_connector.url), "conversation": team_channel(n)},
            team_id=TEAM["team"]["id"],
        )
    store.round_trip = 0.015  # 6 s one delete after another: over the 2 s a write gets
    uninstall = activity_for(
        fake_connector.url,
        type="installationUpdate",
        action="remove",
        conversation=team_channel(0),
        channelData=TEAM,
    )

    response = await bot.handle(post(uninstall, channel_token(channel_identity, bot)))

    assert response.status == 200
    assert await stored_keys(store) == []


class SlowListing(MemoryReferenceStore):
    """A listing page costs what a large bot's does: every stored Teams conversation is
    walked to find a team's channels (about 0.4 s per 1,000 on a local Azurite)."""

    page_seconds = 0.0

    async def list(self, **filters):
        await asyncio.sleep(self.page_seconds)
        return await super().list(**filters)


async def test_a_team_removal_slower_than_a_removals_budget_still_completes(
    bot, channel_identity, fake_connector, monkeypatch
):
    # A team's listing walked past the removal's 10 s for a bot with ~25,000 Teams
    # conversations: every retry failed the same way and the channels stayed stored. The
    # budgets are scaled down here (10 s -> 0.2 s), the listing taking 0.6 s.
    monkeypatch.setattr(messages_module, "REMOVAL_BUDGET", 0.2)
    monkeypatch.setattr(messages_module, "TEAM_REMOVAL_BUDGET", 12 * 0.2)
    store = SlowListing()
    bot.runtime.references = store
    for n in range(6):
        await store.upsert(
            {**activity_for(fake_connector.url), "conversation": team_channel(n)},
            team_id=TEAM["team"]["id"],
        )
    store.page_seconds = 0.6
    deleted = activity_for(
        fake_connector.url,
        type="conversationUpdate",
        conversation=team_channel(0),
        channelData={**TEAM, "eventType": "teamDeleted"},
    )

    response = await bot.handle(post(deleted, channel_token(channel_identity, bot)))

    assert response.status == 200
    assert await stored_keys(store) == []


async def test_a_removal_that_storage_refuses_is_a_500_for_the_channel_to_retry(
    bot, channel_identity, fake_connector, caplog
):
    store = SlowDeletes()
    bot.runtime.references = store
    await store.upsert(activity_for(fake_connector.url))
    store.fail = True
    uninstall = activity_for(fake_connector.url, type="installationUpdate", action="remove")

    with caplog.at_level(logging.ERROR):
        response = await bot.handle(post(uninstall, channel_token(channel_identity, bot)))

    assert (response.status, response.body) == (500, SERVER_ERROR.encode())
    assert fake_connector.requests == []  # nothing said to anyone: the bot was removed
    assert "reference not removed" in caplog.text
    store.fail = False  # the channel's retry, storage back
    response = await bot.handle(post(uninstall, channel_token(channel_identity, bot)))
    assert response.status == 200 and await stored_keys(store) == []


class ChannelOutage(MemoryReferenceStore):
    """Storage refuses every write and delete of one conversation's key only."""

    down: str | None = None

    async def upsert(self, reference, *, team_id=None, refresh=False) -> bool:
        if self.down is not None and reference_key(reference) == self.down:
            raise StoreError("reference store: write failed (simulated outage)")
        return await super().upsert(reference, team_id=team_id, refresh=refresh)

    async def delete(self, key: str) -> bool:
        if key == self.down:
            raise StoreError("reference store: delete failed (simulated outage)")
        return await super().delete(key)


@pytest.mark.parametrize("event", ["channelDeleted", "channelRestored"])
async def test_a_channel_event_whose_channel_storage_refuses_is_a_500_for_the_channel_to_retry(
    event, make_bot, channel_identity, fake_connector
):
    # Teams tells of a channel deleted or restored once, in the team's General channel: no
    # later activity removes the deleted one (broadcasts keep trying it) or stores the
    # restored one (the bot hears only its @mentions there). A failure was only logged.
    # Stored before the handlers, which post in General: the retry runs them once.
    router = Router()

    @router.teams_event(event)
    async def noticed(turn):
        await turn.send(f"{event} noticed")

    bot = make_bot(router)
    store = ChannelOutage()
    bot.runtime.references = store
    general, named = team_channel(0), team_channel(1)
    key = f"{CHANNEL}/{named['id']}"
    for conversation in (general, named) if event == "channelDeleted" else (general,):
        await store.upsert(
            {**activity_for(fake_connector.url), "conversation": conversation},
            team_id=TEAM["team"]["id"],
        )
    store.down = key
    update = activity_for(
        fake_connector.url,
        type="conversationUpdate",
        conversation=general,
        channelData={**TEAM, "eventType": event, "channel": {"id": named["id"], "name": "D"}},
    )
    token = channel_token(channel_identity, bot)

    response = await bot.handle(post(update, token))
    assert (response.status, response.body) == (500, SERVER_ERROR.encode())
    assert (key in await stored_keys(store)) is (event == "channelDeleted")  # as it was
    assert fake_connector.activities == []  # the handlers have not run

    store.down = None  # the channel's retry, storage back
    assert (await bot.handle(post(update, token))).status == 200
    assert (key in await stored_keys(store)) is (event == "channelRestored")
    assert f"{CHANNEL}/{general['id']}" in await stored_keys(store)
    assert [a["text"] for a in fake_connector.activities] == [f"{event} noticed"]


async def test_missing_setting_at_first_invocation_is_500_naming_it(monkeypatch, caplog):
    for name in ("MicrosoftAppId", "BOT_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    reset_runtime()
    try:
        with caplog.at_level(logging.ERROR):
            response = await handle_messages(
                post(activity_for("https://example.com/")), app.runtime
            )
    finally:
        reset_settings()
        reset_runtime()
    assert response.status == 500
    assert response.body == SERVER_ERROR.encode()
    assert "MicrosoftAppId" in caplog.text


def test_building_the_runtime_is_cheap():
    """app.runtime() reads settings and builds clients without importing MSAL or the
    storage SDK, and without any I/O (the storage account below does not exist)."""
    script = (
        "import sys;"
        "import app;"
        "runtime = app.runtime();"
        "heavy = [m for m in ('msal', 'azure.storage.blob', 'azure.identity') if m in sys.modules];"
        "print(type(runtime.references).__name__, heavy)"
    )
    env = {
        "MicrosoftAppId": "app",
        "MicrosoftAppPassword": "secret",
        "AzureWebJobsStorage": "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;",
        "PATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "BlobReferenceStore []"


async def test_a_storage_setting_that_does_not_parse_is_named_in_the_log(
    fake_connector, monkeypatch, caplog
):
    # The reply goes out; the reference cannot be stored, and the log must say which
    # setting to fix (never its value, which holds the account key).
    garbage = "AccountName=x;AccountKey=c2VjcmV0;garbage"
    monkeypatch.setenv("BOT_ALLOW_UNAUTHENTICATED", "true")
    monkeypatch.delenv("MicrosoftAppId", raising=False)
    monkeypatch.setenv("AzureWebJobsStorage", garbage)
    reset_settings()
    reset_runtime()
    try:
        with caplog.at_level(logging.INFO):
            response = await handle_messages(
                HttpRequest.create(
                    "POST",
                    {"Content-Type": "application/json"},
                    json.dumps(activity_for(fake_connector.url)).encode(),
                    "http://localhost/api/messages",
                ),
                app.runtime,
            )
    finally:
        reset_settings()
        reset_runtime()
    assert response.status == 200
    assert len(fake_connector.activities) == 1
    (line,) = [r.getMessage() for r in caplog.records if "reference not recorded" in r.getMessage()]
    assert "AzureWebJobsStorage" in line and "not a valid storage connection string" in line
    assert "c2VjcmV0" not in caplog.text
