"""shared/router.py + shared/turn.py: routing rules, turn context, error handling.

These tests drive the router directly. The connector here is an in-process recorder with
the ConnectorClient's four turn methods: routing is pure logic, and the HTTP path through
the real client and botsim's FakeConnector is covered in test_messages.py.
"""

from __future__ import annotations

import logging
import re

import pytest

from shared.router import APOLOGY, InvokeResponse, Router
from shared.turn import TurnContext

BOT = {"id": "28:bot", "name": "Bot"}
USER = {"id": "29:user", "name": "Ada"}


class RecordingConnector:
    """Records the turn's Connector calls; `fail` makes every call raise.

    A stand-in (not the real client) for routing tests, which assert which Connector call
    a turn makes, not what travels over HTTP: the same calls through the real
    ConnectorClient and botsim's HTTP FakeConnector are tested in test_messages*.py,
    test_turn.py and test_bot.py."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    async def _call(self, *call):
        self.calls.append(call)
        if self.fail:
            raise ConnectionError("connector down")
        return {"id": f"sent-{len(self.calls)}"}

    async def send_to_conversation(self, service_url, conversation_id, activity):
        return await self._call("send", service_url, conversation_id, activity)

    async def reply_to_activity(self, service_url, conversation_id, activity_id, activity):
        return await self._call("reply", service_url, conversation_id, activity_id, activity)

    async def update_activity(self, service_url, conversation_id, activity_id, activity):
        return await self._call("update", service_url, conversation_id, activity_id, activity)

    async def delete_activity(self, service_url, conversation_id, activity_id):
        await self._call("delete", service_url, conversation_id, activity_id)


def activity(type_: str = "message", **fields) -> dict:
    value = {
        "type": type_,
        "id": "in-1",
        "channelId": "msteams",
        "serviceUrl": "https://smba.trafficmanager.net/amer/",
        "from": USER,
        "recipient": BOT,
        "conversation": {"id": "a:conv"},
    }
    value.update(fields)
    return value


def turn_for(value: dict, connector: RecordingConnector | None = None) -> TurnContext:
    return TurnContext(value, connector or RecordingConnector())


def full_router(seen: list[str]) -> Router:
    """A router with one route per activity kind; each handler records its name."""
    router = Router()

    def record(name: str, result=None):
        async def handler(turn: TurnContext):
            seen.append(name)
            return result

        return handler

    router.message(r"^weather (?P<city>\w+)")(record("weather"))
    router.message()(record("message"))
    router.bot_added()(record("bot_added"))
    router.members_added()(record("members_added"))
    router.bot_removed()(record("bot_removed"))
    router.members_removed()(record("members_removed"))
    router.teams_event("teamRenamed")(record("teamRenamed"))
    router.teams_event("channelCreated")(record("channelCreated"))
    router.installation_added(upgrade=True)(record("install_upgrade"))
    router.installation_added()(record("install"))
    router.installation_removed()(record("uninstall"))
    router.reactions_added()(record("reactions_added"))
    router.reactions_removed()(record("reactions_removed"))
    router.message_update()(record("message_update"))
    router.message_delete()(record("message_delete"))
    router.event("tokens/response")(record("event_tokens"))
    router.event()(record("event_any"))
    router.invoke("adaptiveCard/action")(record("card_action", InvokeResponse(200, {"ok": 1})))
    router.invoke("composeExtension/query")(record("query", {"composeExtension": {}}))
    router.end_of_conversation()(record("end"))
    router.typing()(record("typing"))
    router.activity("handoff")(record("handoff"))
    return router


KINDS = [
    (activity(text="weather Paris"), "weather"),
    (
        activity(
            text="<at>Bot</at> WEATHER Oslo",
            entities=[{"type": "mention", "mentioned": BOT, "text": "<at>Bot</at>"}],
        ),
        "weather",
    ),
    (activity(text="hello"), "message"),
    (activity(text=None), "message"),
    (activity("conversationUpdate", membersAdded=[BOT]), "bot_added"),
    (activity("conversationUpdate", membersAdded=[USER]), "members_added"),
    (activity("conversationUpdate", membersRemoved=[BOT]), "bot_removed"),
    (activity("conversationUpdate", membersRemoved=[USER]), "members_removed"),
    (activity("conversationUpdate", channelData={"eventType": "teamRenamed"}), "teamRenamed"),
    (activity("conversationUpdate", channelData={"eventType": "channelCreated"}), "channelCreated"),
    (activity("installationUpdate", action="add"), "install"),
    (activity("installationUpdate", action="add-upgrade"), "install_upgrade"),
    (activity("installationUpdate", action="remove"), "uninstall"),
    (activity("installationUpdate", action="remove-upgrade"), "uninstall"),
    # The action's case: the store removes on `REMOVE`, so the handler runs on it too.
    (activity("installationUpdate", action="REMOVE"), "uninstall"),
    (activity("installationUpdate", action="Add"), "install"),
    (activity("messageReaction", reactionsAdded=[{"type": "like"}]), "reactions_added"),
    (activity("messageReaction", reactionsRemoved=[{"type": "like"}]), "reactions_removed"),
    (activity("messageUpdate", text="edited"), "message_update"),
    (activity("messageDelete"), "message_delete"),
    (activity("event", name="tokens/response"), "event_tokens"),
    (activity("event", name="custom"), "event_any"),
    (activity("invoke", name="adaptiveCard/action"), "card_action"),
    (activity("invoke", name="composeExtension/query"), "query"),
    (activity("endOfConversation"), "end"),
    (activity("typing"), "typing"),
    (activity("handoff"), "handoff"),
]


@pytest.mark.parametrize(("incoming", "expected"), KINDS, ids=[k[1] for k in KINDS])
async def test_each_activity_kind_reaches_its_handler(incoming, expected):
    seen: list[str] = []
    result = await full_router(seen).dispatch(turn_for(incoming))
    assert result.handled
    assert seen == [expected]


@pytest.mark.parametrize(
    "incoming",
    [
        activity("Message"),  # types compare exactly (spec A2011)
        activity("conversationUpdate"),  # nothing added or removed, no event type
        activity("conversationUpdate", channelData={"eventType": "teamDeleted"}),
        activity("installationUpdate", action="something"),
        activity("messageReaction", reactionsAdded=[]),
        activity("invoke", name="task/fetch"),
        activity("somethingNew"),
    ],
)
async def test_unmatched_activities_are_not_handled(incoming):
    seen: list[str] = []
    result = await full_router(seen).dispatch(turn_for(incoming))
    assert not result.handled
    assert seen == []


async def test_message_pattern_match_is_on_the_turn():
    router = Router()
    captured = {}

    @router.message(r"^weather (?P<city>\w+)")
    async def weather(turn: TurnContext) -> None:
        captured["city"] = turn.match["city"]

    await router.dispatch(turn_for(activity(text="Weather Lisbon please")))
    assert captured == {"city": "Lisbon"}


async def test_case_sensitive_patterns_when_asked():
    router = Router()
    seen: list[str] = []
    router.message("^HELP$", ignore_case=False)(lambda turn: seen.append("upper"))
    router.message(re.compile("^help$"))(lambda turn: seen.append("lower"))
    assert not (await router.dispatch(turn_for(activity(text="Help")))).handled
    await router.dispatch(turn_for(activity(text="HELP")))
    await router.dispatch(turn_for(activity(text="help")))
    assert seen == ["upper", "lower"]  # sync handlers work too


async def test_registration_order_is_match_order_and_first_match_wins():
    router = Router()
    seen: list[str] = []

    @router.message("hello")
    async def specific(turn):
        seen.append("specific")

    @router.message()
    async def general(turn):
        seen.append("general")

    @router.catch_all()
    async def anything(turn):
        seen.append("catch_all")

    for _ in range(3):  # stable across dispatches
        await router.dispatch(turn_for(activity(text="well hello there")))
    await router.dispatch(turn_for(activity(text="bye")))
    await router.dispatch(turn_for(activity("invoke", name="x")))
    assert seen == ["specific"] * 3 + ["general", "catch_all"]
    assert [route.name for route in router.routes] == ["specific", "general", "anything"]


async def test_an_async_rule_is_awaited_before_it_decides():
    # A rule that reads something (state, a lookup) is an async def: its answer decides,
    # not the coroutine object (always true), which would take every activity.
    router = Router()
    seen: list[str] = []

    async def members_only(turn):
        return turn.activity.get("from", {}).get("id") == "29:member"

    router.on(members_only)(lambda turn: seen.append("member"))
    router.message()(lambda turn: seen.append("anyone"))
    await router.dispatch(turn_for(activity(text="hi")))
    await router.dispatch(turn_for(activity(text="hi", **{"from": {"id": "29:member"}})))
    assert seen == ["anyone", "member"]
    result = await router.dispatch(turn_for(activity("invoke", name="composeExtension/query")))
    assert not result.handled  # answered 501 by the endpoint, not by the member's route


async def test_bot_and_members_added_together_go_to_the_first_registered_route():
    router = Router()
    seen: list[str] = []
    router.members_added()(lambda turn: seen.append([m["id"] for m in turn.members_added]))
    router.bot_added()(lambda turn: seen.append("bot"))
    await router.dispatch(turn_for(activity("conversationUpdate", membersAdded=[BOT, USER])))
    assert seen == [["29:user"]]  # the bot itself is not in turn.members_added


async def test_invoke_return_values():
    router = Router()
    router.invoke("a")(lambda turn: InvokeResponse(409, {"error": "conflict"}))
    router.invoke("b")(lambda turn: {"value": 1})
    router.invoke("c")(lambda turn: None)
    assert (await router.dispatch(turn_for(activity("invoke", name="a")))).value == InvokeResponse(
        409, {"error": "conflict"}
    )
    assert (await router.dispatch(turn_for(activity("invoke", name="b")))).value == {"value": 1}
    c = await router.dispatch(turn_for(activity("invoke", name="c")))
    assert c.handled and c.value is None


async def test_reply_is_built_per_spec_and_goes_to_reply_to_activity():
    connector = RecordingConnector()
    turn = turn_for(activity(text="hi", locale="en-GB"), connector)
    await turn.reply("Echo: hi")
    [(op, service_url, conversation_id, reply_to, sent)] = connector.calls
    assert (op, service_url, conversation_id, reply_to) == (
        "reply",
        "https://smba.trafficmanager.net/amer/",
        "a:conv",
        "in-1",
    )
    assert sent["from"] == BOT and sent["recipient"] == USER
    assert sent["replyToId"] == "in-1"
    assert sent["text"] == "Echo: hi" and sent["type"] == "message"
    assert sent["locale"] == "en-GB" and sent["channelId"] == "msteams"


async def test_send_update_and_delete():
    connector = RecordingConnector()
    turn = turn_for(activity(), connector)
    response = await turn.send({"type": "message", "attachments": [{"contentType": "x"}]})
    await turn.update_activity("sent-1", "changed")
    await turn.delete_activity("sent-1")
    assert response == {"id": "sent-1"}
    send, update, delete = connector.calls
    assert send[:3] == ("send", "https://smba.trafficmanager.net/amer/", "a:conv")
    assert "replyToId" not in send[3] and send[3]["attachments"] == [{"contentType": "x"}]
    assert update[:4] == ("update", "https://smba.trafficmanager.net/amer/", "a:conv", "sent-1")
    assert update[4]["id"] == "sent-1" and update[4]["text"] == "changed"
    assert delete == ("delete", "https://smba.trafficmanager.net/amer/", "a:conv", "sent-1")


async def test_reply_to_a_conversation_update_posts_to_the_conversation():
    connector = RecordingConnector()
    await turn_for(activity("conversationUpdate"), connector).reply("welcome")
    assert connector.calls[0][0] == "send"
    assert "replyToId" not in connector.calls[0][3]


async def test_expect_replies_buffers_instead_of_sending():
    connector = RecordingConnector()
    turn = turn_for(activity(text="hi", deliveryMode="expectReplies"), connector)
    assert await turn.reply("one") == {}  # buffered: no id yet (documented)
    assert await turn.send("two") == {}
    assert connector.calls == []
    assert [a["text"] for a in turn.buffered] == ["one", "two"]
    assert turn.buffered[0]["replyToId"] == "in-1"


async def test_raising_handler_gets_logged_and_the_user_an_apology(caplog):
    router = Router()

    @router.message()
    async def broken(turn):
        raise RuntimeError("secret detail: token=abc")

    connector = RecordingConnector()
    turn = turn_for(activity(text="hi", deliveryMode="expectReplies"), connector)
    with pytest.raises(RuntimeError):
        await router.dispatch(turn)
    with caplog.at_level(logging.ERROR, logger="shared.router"):
        await router.handle_error(turn, RuntimeError("secret detail: token=abc"))
    [(op, _, _, reply_to, sent)] = connector.calls  # posted even under expectReplies
    assert op == "reply" and reply_to == "in-1"
    assert sent["text"] == APOLOGY
    assert "secret" not in sent["text"]
    [record] = caplog.records
    assert "activity='in-1'" in record.getMessage()
    assert "conversation='msteams/a:conv'" in record.getMessage()


async def test_a_failed_turn_logs_why_when_the_error_is_the_apps_own(caplog):
    # The author needs "over the limit" or the channel's 400 BadArgument to fix the bot;
    # an arbitrary exception's text still never reaches the log.
    from shared.connector.errors import ConnectorError, ErrorKind
    from shared.state import StateTooLarge

    refused = ConnectorError(
        ErrorKind.INVALID,
        "the channel said: card text 'call Ada on 555'",
        status=400,
        code="BadArgument",
        operation="sendToConversation",
    )
    turn = turn_for(activity(text="hi"), RecordingConnector())
    with caplog.at_level(logging.ERROR, logger="shared.router"):
        for error in (
            StateTooLarge("state is 70001 bytes of JSON, over the limit of 65536"),
            refused,
            RuntimeError("secret detail: token=abc"),
        ):
            await Router().handle_error(turn, error)
    too_large, connector, other = (record.getMessage() for record in caplog.records)
    assert "(state is 70001 bytes of JSON, over the limit of 65536)" in too_large
    assert "(sendToConversation invalid 400 'BadArgument')" in connector
    assert "555" not in connector
    assert other.endswith("error=RuntimeError")  # no text, no reason


async def test_failing_apology_is_logged_not_raised(caplog):
    router = Router()
    connector = RecordingConnector(fail=True)
    with caplog.at_level(logging.WARNING, logger="shared.router"):
        await router.handle_error(turn_for(activity(), connector), ValueError("x"))
    assert len(connector.calls) == 1
    assert "could not apologise" in caplog.text


async def test_custom_error_handler_replaces_the_apology():
    router = Router(apology="unused")
    connector = RecordingConnector()

    @router.error
    async def on_error(turn, error):
        await turn.send(f"Oops ({type(error).__name__})")

    await router.handle_error(turn_for(activity(), connector), KeyError("k"))
    assert [c[3]["text"] for c in connector.calls] == ["Oops (KeyError)"]


def recording_error_handler() -> tuple[Router, list[BaseException]]:
    """A router whose error handler records each error it is called with, then replies."""
    router = Router()
    called: list[BaseException] = []

    @router.error
    async def on_error(turn, error):
        called.append(error)
        await turn.reply("Oops, that failed. Try again later.")

    return router, called


@pytest.mark.parametrize(
    "incoming",
    [
        activity("invoke", name="composeExtension/query"),  # one per keystroke
        activity("invoke", name="adaptiveCard/action", value={"trigger": "automatic"}),
        activity("installationUpdate", action="remove"),  # the bot was removed
        activity(text="hi", **{"from": BOT}),  # its own message, passed back by a channel
    ],
    ids=["search", "card refresh", "uninstall", "the bot's own message"],
)
async def test_a_custom_error_handler_is_not_called_where_no_apology_goes(incoming):
    # It replaces the apology, so it follows its rules: its reply was posted once per
    # keystroke of a failing search, per viewer of a failing refresh, and to a
    # conversation the bot had left.
    router, called = recording_error_handler()
    connector = RecordingConnector()

    await router.handle_error(turn_for(incoming, connector), KeyError("k"))
    assert (called, connector.calls) == ([], [])


async def test_a_custom_error_handler_is_not_called_with_less_than_a_second_left():
    import time

    from shared.router import APOLOGY_MARGIN

    class Timed(RecordingConnector):
        def retry_within(self, seconds):  # what the real client offers the error path
            return None

    router, called = recording_error_handler()
    connector = Timed()
    turn = turn_for(activity(), connector)
    turn.answer_by = time.monotonic() + APOLOGY_MARGIN + 0.5
    await router.handle_error(turn, KeyError("k"))
    assert (called, connector.calls) == ([], [])


async def test_a_custom_error_handler_is_not_called_after_the_connector_failed_here():
    from shared.connector.errors import ConnectorError, ErrorKind

    class Unavailable(RecordingConnector):
        async def _call(self, *call):
            self.calls.append(call)
            raise ConnectorError(ErrorKind.TRANSIENT, "unavailable", status=503)

    router, called = recording_error_handler()
    connector = Unavailable()
    turn = turn_for(activity(), connector)

    with pytest.raises(ConnectorError) as failed:
        await turn.reply("hello")  # the handler's own reply meets the Connector failing
    await router.handle_error(turn, failed.value)
    assert called == [] and len(connector.calls) == 1


async def test_a_custom_error_handler_is_seen_under_expect_replies():
    # The turn answers 500 then, so what the handler sends cannot wait for that answer.
    router = Router()
    connector = RecordingConnector()

    @router.error
    async def on_error(turn, error):
        await turn.reply("Oops, our side failed")

    turn = turn_for(activity(text="hi", deliveryMode="expectReplies"), connector)
    await router.handle_error(turn, KeyError("k"))
    [(op, _, _, reply_to, sent)] = connector.calls
    assert (op, reply_to, sent["text"]) == ("reply", "in-1", "Oops, our side failed")
    assert turn.buffered == []


async def test_teams_tells_an_edit_from_an_undelete_and_a_soft_delete_by_its_event_type():
    seen: list[str] = []
    router = Router()
    for event in ("editMessage", "undeleteMessage", "softDeleteMessage"):

        @router.teams_event(event)
        async def handler(turn, event=event):
            seen.append(event)

    for type_, event in (
        ("messageUpdate", "undeleteMessage"),
        ("messageDelete", "softDeleteMessage"),
        ("messageUpdate", "editMessage"),
    ):
        incoming = activity(type_, channelId="msteams", channelData={"eventType": event})
        await router.dispatch(turn_for(incoming))
    assert seen == ["undeleteMessage", "softDeleteMessage", "editMessage"]


@pytest.mark.parametrize("channel", ["webchat", "directline", "emulator"])
async def test_teams_events_match_only_on_teams(channel):
    # Elsewhere channelData is whatever the client wrote: "teamDeleted" from a Web Chat
    # page must not run the bot's handler for a deleted team.
    seen: list[str] = []
    router = full_router(seen)
    incoming = activity(
        "conversationUpdate", channelId=channel, channelData={"eventType": "teamRenamed"}
    )
    await router.dispatch(turn_for(incoming))
    assert seen == []


async def test_a_failed_turn_logs_its_ids_clipped(caplog):
    router = Router()
    connector = RecordingConnector(fail=True)
    incoming = activity(id="i" * 200_000, conversation={"id": "c" * 200_000})
    with caplog.at_level(logging.WARNING, logger="shared.router"):
        await router.handle_error(turn_for(incoming, connector), ValueError("x"))
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert max(len(r.getMessage()) for r in caplog.records) < 1000
    assert "activity='iiii" in caplog.text and "(200002 chars)" in caplog.text


def test_turn_members_and_text():
    turn = turn_for(
        activity(
            "conversationUpdate",
            membersAdded=[BOT, USER],
            membersRemoved=[{"id": "29:other"}],
        )
    )
    assert turn.members_added == [USER]
    assert turn.members_removed == [{"id": "29:other"}]
    assert turn.conversation_key == "msteams/a:conv"
    assert turn.bot_id == "28:bot"
    assert not turn.expects_replies


async def test_teams_bot_id_without_the_28_prefix_is_still_the_bot():
    router = Router()
    seen: list[str] = []
    router.bot_added()(lambda turn: seen.append("bot"))
    router.members_added()(lambda turn: seen.append("members"))
    unprefixed = {"id": "bot", "name": "Bot"}  # recipient.id is "28:bot"
    await router.dispatch(turn_for(activity("conversationUpdate", membersAdded=[unprefixed])))
    assert seen == ["bot"]
    assert turn_for(activity("conversationUpdate", membersAdded=[unprefixed])).members_added == []
