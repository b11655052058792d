"""shared/bot.py, the shipped sample: greetings by name, and an answer for empty messages.

The handlers run in a real turn with the real ConnectorClient (local unauthenticated
mode, no token) against botsim's FakeConnector, which answers member look-ups from the
members it holds for a conversation, as the Connector does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from shared.bot import NOTHING_TO_ECHO, router
from shared.config import Settings
from shared.connector import ConnectorClient
from shared.router import APOLOGY
from shared.turn import TurnContext
from tools.botsim.connector import FakeConnector, Reply

CONVERSATION = "a:1-personal"


@pytest.fixture
async def connector() -> AsyncIterator[ConnectorClient]:
    client = ConnectorClient(Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"}), None)
    yield client
    await client.close()


@pytest.fixture
async def authenticated(fake_connector, aad_app) -> AsyncIterator[ConnectorClient]:
    """A client with the bot's token from botsim's fake Entra ID (`fake_aad`)."""
    from shared.auth.tokens import create_token_provider

    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url)
    client = ConnectorClient(settings, create_token_provider(settings))
    yield client
    await client.close()


def incoming(fake: FakeConnector, channel: str = "msteams", **fields) -> dict:
    return {
        "type": "message",
        "id": "act-1",
        "channelId": channel,
        "serviceUrl": fake.url,
        "from": {"id": "29:ada", "name": "Ada"},
        "recipient": {"id": "28:bot", "name": "Bot"},
        "conversation": {"id": CONVERSATION, "conversationType": "personal"},
        **fields,
    }


async def run(fake: FakeConnector, connector: ConnectorClient, activity: dict) -> list[str]:
    await router.dispatch(TurnContext(activity, connector))
    return [request.json["text"] for request in fake.requests if request.json]


def joined(fake: FakeConnector, *members: dict, channel: str = "msteams") -> dict:
    return incoming(fake, channel, type="conversationUpdate", membersAdded=list(members))


async def test_a_member_the_channel_names_is_greeted_by_name(fake_connector, connector):
    activity = joined(fake_connector, {"id": "u-1", "name": "Bo"}, channel="webchat")
    assert await run(fake_connector, connector, activity) == [
        "Welcome, Bo! Send me a message and I will echo it."
    ]
    assert [r.operation for r in fake_connector.requests] == ["sendToConversation"]


async def test_a_name_with_markdown_is_greeted_as_plain_text(fake_connector, connector):
    name = "[Re-verify your account](https://example.invalid/login)"
    activity = joined(fake_connector, {"id": "u-1", "name": name}, channel="msteams")
    assert await run(fake_connector, connector, activity) == [
        f"Welcome, {name}! Send me a message and I will echo it."
    ]
    [sent] = [r.json for r in fake_connector.requests if r.json]
    assert sent["textFormat"] == "plain"  # shown as typed, not as the bot's link


async def test_teams_members_without_names_are_looked_up_through_the_connector(
    fake_connector, connector
):
    fake_connector.members[CONVERSATION] = [
        {"id": "29:ada", "name": "Ada Lovelace", "aadObjectId": "aad-ada"},
        {"id": "29:bo", "name": "Bo Diddley", "aadObjectId": "aad-bo"},
    ]
    activity = joined(fake_connector, {"id": "29:ada", "aadObjectId": "aad-ada"}, {"id": "29:bo"})
    texts = await run(fake_connector, connector, activity)
    assert texts == ["Welcome, Ada Lovelace and Bo Diddley! Send me a message and I will echo it."]
    lookups = [r for r in fake_connector.requests if r.operation == "getConversationMember"]
    assert len(lookups) == 2


async def test_a_member_that_cannot_be_looked_up_is_welcomed_without_a_name(
    fake_connector, connector
):
    fake_connector.script("GET", "members/", [Reply(500)])  # the lookup fails: no retry on 500
    texts = await run(fake_connector, connector, joined(fake_connector, {"id": "29:ghost"}))
    assert texts == ["Welcome! Send me a message and I will echo it."]
    assert "there" not in texts[0]


async def test_named_and_unnamed_members_together(fake_connector, connector):
    activity = joined(fake_connector, {"id": "u-1", "name": "Bo"}, {"id": "u-2"}, channel="webchat")
    assert await run(fake_connector, connector, activity) == [
        "Welcome, Bo and everyone else who joined! Send me a message and I will echo it."
    ]
    assert all(r.operation != "getConversationMember" for r in fake_connector.requests)


@pytest.mark.parametrize(
    "fields",
    [
        {"text": ""},
        {"text": "   "},
        {},  # an email notification or a card without text
        {"value": {"choice": "yes"}},  # an Adaptive Card submit
    ],
    ids=["empty", "blank", "no-text", "card-submit"],
)
async def test_a_message_without_text_gets_a_helpful_answer(fake_connector, connector, fields):
    texts = await run(fake_connector, connector, incoming(fake_connector, **fields))
    assert texts == [NOTHING_TO_ECHO]
    assert "Echo:" not in texts[0]


async def test_a_message_with_text_is_echoed(fake_connector, connector):
    assert await run(fake_connector, connector, incoming(fake_connector, text=" hi ")) == [
        "Echo: hi"
    ]


async def test_a_users_markdown_is_echoed_as_plain_text_not_as_the_bots_own_link(
    fake_connector, connector
):
    text = "[Your session expired: sign in again](https://evil.example/login)"
    assert await run(fake_connector, connector, incoming(fake_connector, text=text)) == [
        f"Echo: {text}"
    ]
    [sent] = [request.json for request in fake_connector.requests]
    assert sent["textFormat"] == "plain"


async def test_the_bots_own_message_is_not_echoed(fake_connector, connector):
    own = incoming(fake_connector, text="Echo: hi", **{"from": {"id": "bot", "name": "Bot"}})
    assert await run(fake_connector, connector, own) == []


# --- the error apology: held back when it would meet the turn's own Connector failure ---


async def failed_turn(
    connector: ConnectorClient, activity: dict, handler: Callable[[TurnContext], Awaitable[None]]
) -> None:
    """Run `handler` as a message route that fails, then the router's error handling."""
    from shared.router import Router

    failing = Router()
    failing.message()(handler)
    turn = TurnContext(activity, connector)
    with pytest.raises(Exception) as caught:
        await failing.dispatch(turn)
    await failing.handle_error(turn, caught.value)


def posted(fake: FakeConnector) -> list[str]:
    return [request.json["text"] for request in fake.requests if request.json]


async def test_a_turn_whose_reply_failed_on_the_connector_gets_no_apology_through_it(
    fake_connector, connector
):
    # The reply was answered 500 (it may have been posted): an apology through the same
    # Connector would follow it, or wait out the channel's 15 s again.
    async def echo(turn):
        await turn.reply("echo")

    fake_connector.script("POST", "activities", [Reply(500)])
    await failed_turn(connector, incoming(fake_connector, text="hi"), echo)
    assert posted(fake_connector) == ["echo"]

    # A request the channel refused as invalid (a card too large, ...): the apology goes.
    fake_connector.script("POST", "activities", [Reply(400, json={"error": {"code": "X"}})])
    await failed_turn(connector, incoming(fake_connector, text="hi"), echo)
    assert posted(fake_connector)[1:] == ["echo", APOLOGY]


async def test_a_connector_call_that_failed_elsewhere_still_gets_the_apology(
    fake_connector, connector
):
    # A send to another conversation refused (the user blocked the bot there): this
    # conversation's Connector is fine, and the user is told.
    async def elsewhere(turn):
        await turn.connector.send_to_conversation(
            fake_connector.url, "a:other", {"type": "message", "text": "psst"}
        )

    gone = Reply(403, json={"error": {"code": "ConversationBlockedByUser"}})
    fake_connector.script("POST", "a%3Aother", [gone])
    await failed_turn(connector, incoming(fake_connector, text="hi"), elsewhere)
    assert posted(fake_connector) == ["psst", APOLOGY]


async def test_an_update_here_that_failed_on_the_connector_gets_no_apology(
    fake_connector, connector
):
    # The update went the way the apology goes (this conversation) and was answered 500.
    async def edit(turn):
        await turn.update_activity("m-1", "edited")

    fake_connector.script("PUT", "activities", [Reply(500)])
    await failed_turn(connector, incoming(fake_connector, text="hi"), edit)
    assert [request.operation for request in fake_connector.requests] == ["updateActivity"]


async def test_a_send_cancelled_before_it_left_does_not_hold_the_apology_back(
    fake_connector, connector
):
    # The usual "reply while working" pattern: the work fails at once and its TaskGroup
    # cancels the reply before anything left. Nothing failed on the way: the apology goes
    # (counting the cancelled send as failed left the user with nothing at all).
    async def handler(turn):
        async def work():
            raise RuntimeError("database down")

        async with asyncio.TaskGroup() as group:
            group.create_task(turn.reply("working on it"))
            group.create_task(work())

    await failed_turn(connector, incoming(fake_connector, text="hi"), handler)
    assert posted(fake_connector) == [APOLOGY]


async def test_a_reply_its_handler_cut_short_after_it_left_gets_no_apology_after_it(
    fake_connector, connector
):
    # The channel is slow to answer, and the handler's own timeout cancels its reply once
    # the request was written: the reply may have been posted, and an apology through the
    # same slow Connector would follow it (and hold the HTTP answer up again).
    async def impatient(turn):
        async with asyncio.timeout(0.3):
            await turn.reply("echo")

    fake_connector.script("POST", "activities", [Reply(200, json={"id": "m"}, delay=2.0)])
    await failed_turn(connector, incoming(fake_connector, text="hi"), impatient)
    assert posted(fake_connector) == ["echo"]


async def test_a_reply_cancelled_after_it_left_because_its_work_failed_gets_the_apology(
    fake_connector, connector
):
    # "Reply while working": the work fails while the reply, already written, waits for
    # the channel's answer, and the TaskGroup cancels it. The channel is not failing: the
    # user is told (holding the apology back for any cancellation left them with
    # "working on it" and then nothing).
    async def handler(turn):
        async def work():
            await asyncio.sleep(0.2)
            raise RuntimeError("database down")

        async with asyncio.TaskGroup() as group:
            group.create_task(turn.reply("working on it"))
            group.create_task(work())

    fake_connector.script("POST", "activities", [Reply(200, json={"id": "m"}, delay=0.5)])
    await failed_turn(connector, incoming(fake_connector, text="hi"), handler)
    assert posted(fake_connector) == ["working on it", APOLOGY]


async def test_the_handlers_own_timeout_on_its_own_work_gets_the_apology(fake_connector, connector):
    # A TimeoutError alone says nothing of the channel: nothing was sent.
    async def slow_work(turn):
        async with asyncio.timeout(0.1):
            await asyncio.sleep(5)

    await failed_turn(connector, incoming(fake_connector, text="hi"), slow_work)
    assert posted(fake_connector) == [APOLOGY]


async def test_a_reply_the_handlers_timeout_cut_short_before_it_left_gets_the_apology(
    fake_connector, connector
):
    # Eight replies fill the conversation's windows (7 in 1 s, 8 in 2 s): the ninth waits
    # about a second for its slot, and the handler's timeout cancels it there, before any
    # request of it was written. The channel answered every reply: the apology goes.
    async def chatty(turn):
        for n in range(8):
            await turn.reply(f"r{n}")
        async with asyncio.timeout(0.2):
            await turn.reply("ninth")

    await failed_turn(connector, incoming(fake_connector, text="hi"), chatty)
    assert posted(fake_connector) == [f"r{n}" for n in range(8)] + [APOLOGY]


async def test_a_reply_the_channel_answered_after_one_cut_short_opens_the_way_again(
    fake_connector, connector
):
    # Cut short after it left (the channel slow), then a reply the channel answered, then
    # the handler's timeout on its own work: the apology goes.
    async def handler(turn):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                await turn.reply("slow")
        await turn.reply("fast")
        async with asyncio.timeout(0.1):
            await asyncio.sleep(5)

    fake_connector.script("POST", "activities", [Reply(200, json={"id": "m"}, delay=1.0)])
    await failed_turn(connector, incoming(fake_connector, text="hi"), handler)
    assert posted(fake_connector) == ["slow", "fast", APOLOGY]


async def test_a_member_lookup_the_handlers_timeout_cut_short_does_not_hold_the_apology(
    fake_connector, connector
):
    # A lookup is not a post here: cut short after it left, it says nothing of the way
    # the apology goes.
    async def handler(turn):
        async with asyncio.timeout(0.3):
            await turn.member("29:ada")

    fake_connector.members[CONVERSATION] = [{"id": "29:ada", "name": "Ada"}]
    fake_connector.script("GET", "members/", [Reply(200, json={"id": "29:ada"}, delay=1.0)])
    await failed_turn(connector, incoming(fake_connector, text="hi"), handler)
    assert posted(fake_connector) == [APOLOGY]


async def lookup(turn: TurnContext) -> None:
    await turn.member("29:ada")


async def test_no_token_for_a_member_lookup_means_no_apology_asking_again(
    fake_connector, fake_aad, authenticated
):
    # Entra ID refuses the bot: the apology would ask for the same token and wait again.
    client = authenticated
    fake_aad.fail_next()  # the apology's own request would get a token: sent, late
    await failed_turn(client, incoming(fake_connector, text="hi"), lookup)
    assert fake_connector.requests == []
    assert fake_aad.issued.total() == 0  # asked once, for the lookup


async def test_a_member_lookup_answered_500_still_gets_the_apology(fake_connector, connector):
    fake_connector.script("GET", "members/", [Reply(500)])
    await failed_turn(connector, incoming(fake_connector, text="hi"), lookup)
    assert posted(fake_connector) == [APOLOGY]


async def test_a_send_that_failed_then_went_through_does_not_hold_the_apology_back(
    fake_connector, connector
):
    from shared.connector.errors import ConnectorError

    async def retrying(turn):
        try:
            await turn.send("first")
        except ConnectorError:
            await turn.send("second")
        raise RuntimeError("a bug after the sends")

    fake_connector.script("POST", "activities", [Reply(500)])
    await failed_turn(connector, incoming(fake_connector, text="hi"), retrying)
    assert posted(fake_connector) == ["first", "second", APOLOGY]


async def test_a_call_that_got_no_token_in_time_means_no_apology(fake_connector, connector):
    # Entra ID too slow for the call's budget: the apology would wait for it again.
    from shared.connector.errors import ConnectorError, ErrorKind

    async def slow_token(turn):
        raise ConnectorError(
            ErrorKind.TRANSIENT, "no token within the time budget", code="TokenTimeout"
        )

    await failed_turn(connector, incoming(fake_connector, text="hi"), slow_token)
    assert fake_connector.requests == []


async def test_a_refused_credential_holds_the_apology_back_and_entra_id_is_asked_once(
    fake_connector, fake_aad, authenticated
):
    # The turn's second call, within the provider's retry interval, is refused without
    # asking Entra ID again: the apology would meet the same refusal, so none is sent.
    from shared.connector.errors import ConnectorError

    async def lookup_twice(turn):
        with contextlib.suppress(ConnectorError):
            await turn.member("29:ada")
        await turn.member("29:ada")

    refused = len(fake_aad.rejections)
    fake_aad.fail_next()
    fake_connector.members[CONVERSATION] = [{"id": "29:ada", "name": "Ada"}]
    await failed_turn(authenticated, incoming(fake_connector, text="hi"), lookup_twice)
    assert posted(fake_connector) == []
    assert len(fake_aad.rejections) - refused == 1


async def test_a_token_had_again_or_an_answer_here_lets_the_apology_go(
    fake_connector, fake_aad, authenticated, monkeypatch
):
    # Entra ID asked again at once after it refused the credential (the provider waits
    # REFRESH_RETRY_SECONDS by default): the token comes on the second try, as after a
    # transient failure (which MSAL's own cache answers again for a few seconds here).
    monkeypatch.setattr("shared.auth.tokens.REFRESH_RETRY_SECONDS", 0.0)
    # What held the apology back is gone: the token came on a second try, or the last
    # send here was answered (as invalid) after one that went unanswered.
    from shared.connector.errors import ConnectorError

    async def lookup_twice(turn):
        with contextlib.suppress(ConnectorError):
            await turn.member("29:ada")
        await turn.member("29:ada")
        raise RuntimeError("a bug after the lookups")

    async def send_twice(turn):
        with contextlib.suppress(ConnectorError):
            await turn.send("first")
        await turn.send("second")

    client = authenticated
    fake_aad.fail_next()
    fake_connector.members[CONVERSATION] = [{"id": "29:ada", "name": "Ada"}]
    await failed_turn(client, incoming(fake_connector, text="hi"), lookup_twice)
    assert posted(fake_connector) == [APOLOGY]
    refused = Reply(400, json={"error": {"code": "BadArgument"}})
    fake_connector.script("POST", "activities", [Reply(500), refused])
    await failed_turn(client, incoming(fake_connector, text="hi"), send_twice)
    assert posted(fake_connector) == [APOLOGY, "first", "second", APOLOGY]


async def test_the_apology_follows_what_the_turns_calls_showed_of_its_way(
    fake_connector, fake_aad, authenticated, monkeypatch
):
    # Entra ID asked again at once after it refused the credential (the provider waits
    # REFRESH_RETRY_SECONDS by default): the token comes on the second try, as after a
    # transient failure (which MSAL's own cache answers again for a few seconds here).
    monkeypatch.setattr("shared.auth.tokens.REFRESH_RETRY_SECONDS", 0.0)
    from shared.connector.errors import ConnectorError

    async def no_token_then_answered(turn):
        # The reply got no token; a lookup then got one (answered 404): the way is open.
        with contextlib.suppress(ConnectorError):
            await turn.reply("first")
        with contextlib.suppress(ConnectorError):
            await turn.member("29:nobody")
        raise RuntimeError("a bug")

    async def unanswered_here_then_token_trouble_elsewhere(turn):
        # The reply may have been posted; a token refused elsewhere and then had again
        # says nothing of this conversation's way.
        with contextlib.suppress(ConnectorError):
            await turn.reply("first")
        with contextlib.suppress(ConnectorError):
            await turn.member("29:ada")
        await turn.member("29:ada")
        raise RuntimeError("a bug")

    async def unanswered_here_then_refused_before_sending(turn):
        with contextlib.suppress(ConnectorError):
            await turn.reply("first")
        await turn.send({"type": "message", "value": {1, 2}})  # not JSON: nothing sent

    client = authenticated
    fake_connector.members[CONVERSATION] = [{"id": "29:ada", "name": "Ada"}]
    fake_aad.fail_next()
    await failed_turn(client, incoming(fake_connector, text="hi"), no_token_then_answered)
    assert posted(fake_connector) == [APOLOGY]

    refused = Reply(401, json={"error": {"code": "Unauthorized"}})
    fake_connector.script("POST", "activities", [Reply(500)])
    fake_connector.script("GET", "members/", [refused, refused])
    activity = incoming(fake_connector, text="hi")
    await failed_turn(client, activity, unanswered_here_then_token_trouble_elsewhere)
    assert posted(fake_connector) == [APOLOGY, "first"]

    fake_connector.script("POST", "activities", [Reply(500)])
    activity = incoming(fake_connector, text="hi")
    await failed_turn(client, activity, unanswered_here_then_refused_before_sending)
    assert posted(fake_connector) == [APOLOGY, "first", "first"]


def test_a_connector_answer_naming_a_token_timeout_is_not_the_bots_token():
    from shared.connector.errors import ConnectorError, ErrorKind

    answered = ConnectorError(ErrorKind.TRANSIENT, "x", status=504, code="TokenTimeout")
    ours = ConnectorError(ErrorKind.TRANSIENT, "x", code="TokenTimeout")
    assert (answered.no_token, ours.no_token) == (False, True)
