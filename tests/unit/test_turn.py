"""shared/turn.py's typed view of the activity, Teams conversation kinds, cards sent through
`turn.send`, and the card/dialog routes of shared/router.py with the answers of
shared/invokes.py.

Routing is pure logic, so the Connector here is test_router's in-process recorder; the
HTTP path through botsim's FakeConnector is covered by tests/integration/
test_example_cards_and_state.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from shared.auth.tokens import create_token_provider
from shared.cards import (
    ADAPTIVE_CARD,
    HERO_CARD,
    adaptive_card,
    button,
    card_attachment,
    card_message,
    execute_action,
    fact_set,
    hero_card,
    refresh,
    text_block,
)
from shared.connector import ConnectorClient
from shared.invokes import (
    card_error,
    card_response,
    card_text_response,
    task_card,
    task_message,
    task_url,
)
from shared.router import Router
from shared.state import StateError
from shared.turn import TurnContext
from tests.unit.test_router import RecordingConnector, activity, turn_for
from tools.botsim.connector import Reply

TEAMS_CHANNEL = {
    "id": "19:general@thread.tacv2;messageid=1700",
    "conversationType": "channel",
    "isGroup": True,
    "tenantId": "tenant-1",
}


def teams_activity(**fields) -> dict:
    value = activity(
        "message",
        conversation=TEAMS_CHANNEL,
        text="<at>Bot</at> hello <at>Ada</at>",
        locale="de-DE",
        value={"x": 1},
        channelData={
            "tenant": {"id": "tenant-1"},
            "team": {"id": "19:team@thread.tacv2", "name": "Team"},
            "channel": {"id": "19:general@thread.tacv2"},
        },
        entities=[
            {
                "type": "mention",
                "mentioned": {"id": "28:bot", "name": "Bot"},
                "text": "<at>Bot</at>",
            },
            {
                "type": "mention",
                "mentioned": {"id": "29:ada", "name": "Ada"},
                "text": "<at>Ada</at>",
            },
            {"type": "clientInfo", "locale": "de-DE"},
        ],
        attachments=[{"contentType": "text/html", "content": "<p>hi</p>"}],
    )
    value.update(fields)
    return value


def test_typed_fields_read_the_wire_dict():
    turn = turn_for(teams_activity())
    assert turn.from_["id"] == "29:user" and turn.from_["name"] == "Ada"
    assert turn.recipient["id"] == "28:bot"
    assert turn.conversation["id"] == TEAMS_CHANNEL["id"]
    assert turn.value == {"x": 1}
    assert turn.channel_data["channel"]["id"] == "19:general@thread.tacv2"
    assert turn.tenant_id == "tenant-1"
    assert turn.team_id == "19:team@thread.tacv2"
    assert [e["type"] for e in turn.entities] == ["mention", "mention", "clientInfo"]
    assert [m["mentioned"]["name"] for m in turn.mentions] == ["Bot", "Ada"]
    assert turn.attachments[0]["contentType"] == "text/html"
    assert turn.locale == "de-DE"
    assert (turn.type, turn.channel_id) == ("message", "msteams")
    # The bot's own mention is taken out of the text; other mentions stay.
    assert turn.text == "hello <at>Ada</at>"


def test_absent_fields_read_as_empty():
    bare = {k: v for k, v in activity().items() if k not in ("from", "recipient")}
    turn = turn_for(bare)
    assert turn.from_ == {} and turn.recipient == {} and turn.channel_data == {}
    assert turn.entities == [] and turn.mentions == [] and turn.attachments == []
    assert turn.value is None and turn.locale is None
    assert turn.tenant_id is None and turn.team_id is None
    assert turn.card_action is None and turn.task_request == {}


def test_a_team_id_counts_only_on_teams():
    # Another channel's client can write anything into channelData: not a Teams team.
    turn = turn_for(teams_activity(channelId="webchat"))
    assert turn.team_id is None


def test_a_tenant_id_counts_only_on_teams():
    # Web Chat / Direct Line clients write channelData (and conversation) themselves: a
    # tenant they name is not a verified Microsoft Entra tenant.
    turn = turn_for(teams_activity(channelId="webchat"))
    assert turn.tenant_id is None
    conversation = dict(TEAMS_CHANNEL, tenantId="tenant-2")
    turn = turn_for(teams_activity(channelId="directline", conversation=conversation))
    assert turn.tenant_id is None
    # On msteams both places Teams puts it count.
    turn = turn_for(teams_activity(conversation=conversation, channelData={}))
    assert turn.tenant_id == "tenant-2"


@pytest.mark.parametrize(
    ("conversation", "personal", "group_chat", "channel"),
    [
        ({"id": "a:1", "conversationType": "personal"}, True, False, False),
        (
            {"id": "19:x@thread.v2", "conversationType": "groupChat", "isGroup": True},
            False,
            True,
            False,
        ),
        (TEAMS_CHANNEL, False, False, True),
        ({"id": "webchat-1"}, True, False, False),
        ({"id": "slack-group", "isGroup": True}, False, False, False),
    ],
)
def test_conversation_kinds(conversation, personal, group_chat, channel):
    turn = turn_for(activity(conversation=conversation))
    assert (turn.is_personal, turn.is_group_chat, turn.is_channel) == (
        personal,
        group_chat,
        channel,
    )


def test_user_state_needs_a_sender():
    bare = {k: v for k, v in activity().items() if k != "from"}
    with pytest.raises(StateError, match=r"no from\.id"):
        turn_for(bare).user_state  # noqa: B018 - the property raises


def test_state_keys_are_per_conversation_and_per_user():
    turn = turn_for(teams_activity())
    assert turn.conversation_state.key == f"conversation/msteams/{TEAMS_CHANNEL['id']}"
    assert turn.user_state.key == "user/msteams/29:user"
    assert turn.user_state is turn.user_state  # one State per turn


async def test_state_without_a_store_fails_clearly_on_first_use():
    turn = turn_for(activity())
    with pytest.raises(StateError, match="no state store"):
        await turn.user_state.load()
    await turn.save_state()  # nothing was loaded: nothing to save, no error


@pytest.fixture
async def client(aad_app, fake_connector):
    """The real Connector client over HTTP, to botsim's fake Connector (trusted)."""
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url)
    connector = ConnectorClient(settings, create_token_provider(settings))
    yield connector
    await connector.close()


async def test_members_come_from_the_connector(client, fake_connector):
    # The real client over HTTP: the turn's connector is the whole ConnectorClient.
    fake_connector.members["a:conv"] = [
        {"id": "29:user", "name": "Ada", "aadObjectId": "aad-1"},
        {"id": "29:bob", "name": "Bob"},
    ]
    turn = TurnContext(activity(serviceUrl=fake_connector.url), client)
    members = await turn.members()
    bob = await turn.member("29:bob")
    assert [m["name"] for m in members] == ["Ada", "Bob"]
    assert bob == {"id": "29:bob", "name": "Bob"}
    # Teams reads its roster a page at a time: its unpaged call is deprecated there.
    assert [r.operation for r in fake_connector.requests] == [
        "getConversationPagedMembers",
        "getConversationMember",
    ]


async def test_a_teams_channel_post_asks_for_its_teams_members_page_by_page(client, fake_connector):
    # A post's conversation id (`…;messageid=…`) names no roster: the team's is read, all of
    # it, a page (of at most 500) at a time, and one member is looked up there too.
    team = [{"id": f"29:member-{n}", "name": f"Member {n}"} for n in range(1201)]
    fake_connector.members["19:team@thread.tacv2"] = team
    turn = TurnContext(teams_activity(serviceUrl=fake_connector.url), client)
    members = await turn.members()
    one = await turn.member("29:member-7")
    assert members == team
    assert one == {"id": "29:member-7", "name": "Member 7"}
    asked = [(r.operation, r.params.get("conversationId")) for r in fake_connector.requests]
    assert asked == [("getConversationPagedMembers", "19:team@thread.tacv2")] * 3 + [
        ("getConversationMember", "19:team@thread.tacv2")
    ]
    assert fake_connector.requests[0].query["pageSize"] == "500"


async def test_a_roster_whose_continuation_never_ends_is_read_once_through(client, fake_connector):
    # A Connector answering every page with the same continuation token: read until the
    # token repeats, not for ever.
    page = {"members": [{"id": "29:a"}], "continuationToken": "again"}
    fake_connector.script("GET", "pagedmembers", [Reply(200, json=page)] * 5)
    turn = TurnContext(activity(serviceUrl=fake_connector.url), client)
    assert await turn.members() == [{"id": "29:a"}, {"id": "29:a"}]
    assert len(fake_connector.requests) == 2


async def test_other_channels_ask_for_their_members_in_one_call(client, fake_connector):
    fake_connector.members["dl-conv"] = [{"id": "dl-user", "name": "Ada"}]
    incoming = activity(
        channelId="directline", serviceUrl=fake_connector.url, conversation={"id": "dl-conv"}
    )
    assert await TurnContext(incoming, client).members() == [{"id": "dl-user", "name": "Ada"}]
    assert [r.operation for r in fake_connector.requests] == ["getConversationMembers"]


async def test_an_id_a_handler_copied_into_what_it_sends_is_not_sent():
    # The channel gives a sent activity its id: one carried over from the incoming
    # activity (a reply built from it) is dropped; an update names its activity itself.
    connector = RecordingConnector()
    turn = turn_for(activity(text="hi"), connector)
    await turn.send({"type": "message", "text": "copy", "id": "in-1"})
    await turn.update_activity("sent-9", {"type": "message", "text": "edited", "id": "x"})
    [(_, _, _, sent), (_, _, _, _, updated)] = connector.calls
    assert "id" not in sent
    assert updated["id"] == "sent-9"


async def test_send_later_refuses_what_the_proactive_engine_cannot_send(tmp_path):
    from shared.proactive_schema import InvalidRequest
    from shared.producer import producer_settings

    # Storage that does not exist: the refusal comes before any storage call.
    settings = producer_settings({"AzureWebJobsStorage": "UseDevelopmentStorage=true"}, tmp_path)
    turn = TurnContext(activity(), RecordingConnector(), settings=settings)
    with pytest.raises(InvalidRequest):
        await turn.send_later({"type": "invoke", "name": "x"})
    with pytest.raises(InvalidRequest, match="delay"):
        await turn.send_later("later", delay=-5)
    assert turn.connector.calls == []


@pytest.mark.integration
async def test_send_later_ids_repeat_only_for_the_same_activity_asking_the_same(
    azurite, unique_name, tmp_path
):
    # A channel's resend repeats the activity's body: its requests get the ids they got
    # the first time (the queue sends each once). An edit, a deletion or a reaction
    # carries the id of the message it is about: those are other activities, whose
    # requests must not be taken for the first one's (they were dropped as done).
    import base64

    from azure.storage.queue import QueueClient

    from shared.producer import producer_settings
    from shared.storage import close_shared_clients

    queue = unique_name("later")
    env = {"AzureWebJobsStorage": azurite.connection_string, "BOT_PROACTIVE_QUEUE": queue}
    settings = producer_settings(env, tmp_path)
    message = activity(id="m-1", timestamp="2026-12-07T08:00:00.000Z", text="remind")
    ids = []

    async def asks(incoming, *texts, delay=0.0):
        turn = TurnContext(incoming, RecordingConnector(), settings=settings)
        ids.append([await turn.send_later(text, delay=delay) for text in texts])

    try:
        await asks(message, "stretch", "stretch", "drink at 08:00:01")  # 3 requests
        # Sent again: the same requests, whatever they hold this time (a time of day).
        await asks(dict(message), "stretch", "stretch", "drink at 08:00:21", delay=1)
        edited = dict(message, type="messageUpdate", timestamp="2026-12-07T08:01:00.000Z")
        await asks(edited, "stretch")
        by_ada = activity("messageReaction", id="m-1", timestamp="2026-12-07T08:02:00.000Z")
        by_bob = dict(by_ada, **{"from": {"id": "29:bob"}})
        await asks(by_ada, "thanks")
        await asks(by_bob, "thanks")
        # Without a timestamp (an emulator), the activity itself tells them apart.
        added = activity("messageReaction", id="m-1", reactionsAdded=[{"type": "like"}])
        removed = activity("messageReaction", id="m-1", reactionsRemoved=[{"type": "like"}])
        await asks(added, "thanks")
        await asks(removed, "thanks")
        again_added = dict(added)
        turn = TurnContext(again_added, RecordingConnector(), settings=settings)
        again_added["seen"] = 1  # a handler writing into the activity: no part of it
        again_added["from"]["seen"] = 1  # ... nor into a part of it
        ids.append([await turn.send_later("thanks")])
        # Two reactions at one timestamp, by one sender: still two activities.
        when = "2026-12-07T08:03:00.000Z"
        like = activity(
            "messageReaction", id="m-1", timestamp=when, reactionsAdded=[{"type": "like"}]
        )
        heart = dict(like, reactionsAdded=[{"type": "heart"}])
        await asks(like, "thanks")
        await asks(heart, "thanks")
    finally:
        await close_shared_clients()

    first, again, edit, ada, bob, add, remove, add_again, liked, hearted = ids
    assert again == first and len(set(first)) == 3
    assert add_again == add
    others = set(edit) | set(ada) | set(bob) | set(add) | set(remove) | set(liked) | set(hearted)
    assert len(set(first) | others) == 10
    await asyncio.sleep(1.2)  # the resend's requests, delayed a second, visible
    client = QueueClient.from_connection_string(azurite.connection_string, queue)
    queued = [
        json.loads(base64.b64decode(m.content))["id"]
        for m in client.receive_messages(max_messages=32)
    ]
    everything = first + again + edit + ada + bob + add + remove + add_again + liked + hearted
    assert sorted(queued) == sorted(everything)


# ---------------------------------------------------------------------------- cards


def counter(n: int) -> dict:
    return adaptive_card(
        [text_block(f"Count: {n}", weight="Bolder"), fact_set({"Owner": "Ada"})],
        actions=[execute_action("Add", verb="add", data={"step": 1})],
        refresh=refresh("show", user_ids=["29:user"]),
    )


def test_adaptive_card_builders_make_plain_json():
    card = counter(2)
    assert json.loads(json.dumps(card)) == card
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.5"
    assert card["body"][0] == {
        "type": "TextBlock",
        "text": "Count: 2",
        "wrap": True,
        "weight": "Bolder",
    }
    assert card["body"][1]["facts"] == [{"title": "Owner", "value": "Ada"}]
    assert card["actions"] == [
        {"type": "Action.Execute", "title": "Add", "verb": "add", "data": {"step": 1}}
    ]
    assert card["refresh"] == {
        "action": {"type": "Action.Execute", "verb": "show"},
        "userIds": ["29:user"],
    }


def test_hero_card_attachment():
    attachment = hero_card(
        "Title",
        subtitle="Sub",
        text="Body",
        images=["https://example.com/a.png"],
        buttons=[button("Yes", "yes")],
    )
    assert attachment == {
        "contentType": HERO_CARD,
        "content": {
            "title": "Title",
            "subtitle": "Sub",
            "text": "Body",
            "images": [{"url": "https://example.com/a.png"}],
            "buttons": [{"type": "imBack", "title": "Yes", "value": "yes"}],
        },
    }


def test_card_message_carries_cards_and_attachments():
    message = card_message(counter(1), hero_card("Hi"), text="Two cards", layout="carousel")
    assert message["type"] == "message" and message["text"] == "Two cards"
    assert [a["contentType"] for a in message["attachments"]] == [ADAPTIVE_CARD, HERO_CARD]
    assert message["attachmentLayout"] == "carousel"
    with pytest.raises(ValueError):
        card_message({"type": "message", "text": "not a card"})


@pytest.mark.parametrize(
    "sent",
    [counter(1), card_attachment(counter(1)), hero_card("Hi")],
    ids=["adaptive card", "attachment", "hero card"],
)
async def test_send_reply_and_update_take_a_card(sent):
    connector = RecordingConnector()
    turn = turn_for(activity(), connector)
    await turn.send(sent)
    await turn.reply(sent)
    await turn.update_activity("sent-1", sent)
    for call in connector.calls:
        outgoing = call[-1]
        assert outgoing["type"] == "message"
        [attachment] = outgoing["attachments"]
        assert attachment["contentType"] in (ADAPTIVE_CARD, HERO_CARD)
        assert outgoing["conversation"]["id"] == "a:conv"
    assert [call[0] for call in connector.calls] == ["send", "reply", "update"]


@pytest.mark.parametrize(
    "elsewhere",
    [
        {"conversation": {"id": "19:admins@thread.tacv2"}},
        {"serviceUrl": "https://smba.trafficmanager.net/emea/"},
        {"channelId": "webchat"},
    ],
    ids=["conversation", "serviceUrl", "channelId"],
)
async def test_an_activity_addressed_elsewhere_is_refused_not_posted_here(
    elsewhere, aad_app, fake_connector
):
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url)
    connector = ConnectorClient(settings, create_token_provider(settings))
    incoming = activity(serviceUrl=fake_connector.url + "/")
    turn = TurnContext(incoming, connector)
    outgoing = {"type": "message", "text": "for the admins only", **elsewhere}
    try:
        for send in (turn.send, turn.reply, lambda out: turn.update_activity("sent-1", out)):
            with pytest.raises(ValueError, match="not this conversation's"):
                await send(outgoing)
        assert fake_connector.requests == []
        # Naming this conversation, as a copy of the incoming activity's fields does, is
        # fine, and so is its serviceUrl without the trailing slash (the same endpoint).
        here = {k: incoming[k] for k in ("conversation", "serviceUrl", "channelId")}
        await turn.send({"type": "message", "text": "hi", **here})
        await turn.reply({"text": "hi", "serviceUrl": fake_connector.url})
    finally:
        await connector.close()
    assert [r.operation for r in fake_connector.requests] == [
        "sendToConversation",
        "replyToActivity",
    ]
    assert [a["conversation"]["id"] for a in fake_connector.activities] == ["a:conv"] * 2


# ------------------------------------------------------------------- card and dialog routes


def card_invoke(verb, **value) -> dict:
    return activity(
        "invoke",
        name="adaptiveCard/action",
        value={"action": {"type": "Action.Execute", "verb": verb, "data": {"n": 1}}, **value},
    )


def dialog_router(seen: list[str]) -> Router:
    router = Router()

    @router.card_action("add")
    async def add(turn: TurnContext):
        seen.append(f"add:{turn.card_action['action']['data']['n']}")
        return card_response(counter(2))

    @router.card_action()
    async def other(turn: TurnContext):
        seen.append("other")
        return card_error(400, "unknown verb", code="UnknownVerb")

    @router.task_fetch()
    async def fetch(turn: TurnContext):
        seen.append(f"fetch:{turn.task_request['context']['theme']}")
        return task_card(counter(0), title="Counter", height="small", width=400)

    @router.task_submit()
    async def submit(turn: TurnContext):
        seen.append(f"submit:{turn.task_request['data']['name']}")
        return task_message("Saved")

    return router


async def test_card_actions_route_by_verb_with_typed_values():
    seen: list[str] = []
    router = dialog_router(seen)
    result = await router.dispatch(turn_for(card_invoke("add", trigger="manual")))
    assert seen == ["add:1"]
    assert result.value.status == 200
    assert result.value.body == {
        "statusCode": 200,
        "type": "application/vnd.microsoft.card.adaptive",
        "value": counter(2),
    }

    result = await router.dispatch(turn_for(card_invoke("delete")))
    assert seen[-1] == "other"
    assert result.value.status == 200  # the client reads the error from the body
    assert result.value.body == {
        "statusCode": 400,
        "type": "application/vnd.microsoft.error",
        "value": {"code": "UnknownVerb", "message": "unknown verb"},
    }


def test_card_answers_take_the_card_or_its_attachment_alike():
    card = counter(3)
    attached = card_attachment(card)
    assert card_response(attached) == card_response(card)
    assert task_card(attached, title="T") == task_card(card, title="T")
    assert card_attachment(attached) == attached  # not wrapped twice
    assert task_card(attached).body["task"]["value"]["card"] == attached
    with pytest.raises(ValueError, match="Adaptive Card"):
        card_response(hero_card("Not an adaptive card"))


@pytest.mark.parametrize(
    "value", [None, "text", {"action": "not an object"}, {"trigger": "manual"}]
)
async def test_a_malformed_card_action_matches_no_card_route(value):
    bad = activity("invoke", name="adaptiveCard/action", value=value)
    result = await dialog_router([]).dispatch(turn_for(bad))
    assert not result.handled  # the pipeline answers 501


async def test_a_message_named_like_an_invoke_is_not_a_card_action():
    fake = activity("message", name="adaptiveCard/action", value={"action": {"verb": "add"}})
    assert turn_for(fake).card_action is None


async def test_dialog_fetch_and_submit():
    seen: list[str] = []
    router = dialog_router(seen)
    fetch = activity("invoke", name="task/fetch", value={"data": {}, "context": {"theme": "dark"}})
    result = await router.dispatch(turn_for(fetch))
    assert result.value.body == {
        "task": {
            "type": "continue",
            "value": {
                "card": {"contentType": ADAPTIVE_CARD, "content": counter(0)},
                "title": "Counter",
                "height": "small",
                "width": 400,
            },
        }
    }
    submit = activity("invoke", name="task/submit", value={"data": {"name": "Ada"}})
    result = await router.dispatch(turn_for(submit))
    assert result.value.body == {"task": {"type": "message", "value": "Saved"}}
    assert seen == ["fetch:dark", "submit:Ada"]


def test_other_invoke_answers():
    assert card_text_response("Done").body == {
        "statusCode": 200,
        "type": "application/vnd.microsoft.activity.message",
        "value": "Done",
    }
    assert task_url("https://example.com/form", title="Form", fallback_url="https://x").body == {
        "task": {
            "type": "continue",
            "value": {
                "url": "https://example.com/form",
                "fallbackUrl": "https://x",
                "title": "Form",
            },
        }
    }
    with pytest.raises(ValueError):
        card_error(200, "not an error")
    # The error's code names its status unless the bot gives one.
    assert [card_error(s, "no").body["value"]["code"] for s in (400, 403, 412, 500, 599)] == [
        "BadRequest",
        "Forbidden",
        "PreconditionFailed",
        "InternalServerError",
        "InternalServerError",
    ]


@pytest.mark.parametrize(
    "build",
    [
        lambda: hero_card("t", images="https://example.com/a.png"),  # one image per character
        lambda: refresh("show", user_ids="29:abc"),  # nobody refreshed: ids of one character
        lambda: adaptive_card(text_block("x")),  # one element, not a list of them
        lambda: adaptive_card([text_block("x")], actions=execute_action("Go", verb="go")),
        lambda: hero_card("t", buttons=button("Yes", "yes")),
    ],
    ids=["images", "user ids", "body", "actions", "buttons"],
)
def test_a_single_value_where_a_card_builder_takes_a_list_is_a_clear_error(build):
    with pytest.raises(TypeError, match="takes a list"):
        build()


def test_a_card_answer_refuses_what_is_not_an_adaptive_card():
    # A message activity given as the card was sent as one: Teams shows an error.
    from shared.invokes import card_response, task_card

    message = card_message(adaptive_card([text_block("x")]))
    for answer in (card_response, task_card):
        with pytest.raises(ValueError, match="expected an Adaptive Card"):
            answer(message)
