"""shared/activity.py: request-body validation, reply building, references."""

from __future__ import annotations

import json

import pytest

from shared.activity import (
    MAX_JSON_DEPTH,
    InvalidActivity,
    apply_conversation_reference,
    as_activity,
    check_content_type,
    check_size,
    conversation_key,
    conversation_reference,
    create_reply,
    is_bot_account,
    parse_activity,
    tenant_id,
    text_without_bot_mention,
)

SERVICE_URL = "https://smba.trafficmanager.net/amer/"


def incoming(**overrides) -> dict:
    activity = {
        "type": "message",
        "id": "act-1",
        "channelId": "msteams",
        "serviceUrl": SERVICE_URL,
        "from": {"id": "29:user", "name": "Ada", "aadObjectId": "aad-1"},
        "recipient": {"id": "28:bot", "name": "Bot"},
        "conversation": {"id": "a:conv", "tenantId": "tenant-1", "conversationType": "personal"},
        "locale": "en-GB",
        "text": "hello",
    }
    activity.update(overrides)
    return activity


def status_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except InvalidActivity as invalid:
        return invalid.status
    return None


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", None),
        ("application/json; charset=utf-8", None),
        ("Application/JSON ;charset=UTF-8", None),
        (None, 415),
        ("", 415),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("application/jsonp", 415),
        ("multipart/form-data; boundary=x", 415),
    ],
)
def test_content_type_must_be_json(content_type, status):
    assert status_of(check_content_type, content_type) == status


@pytest.mark.parametrize(
    ("content_length", "body", "status"),
    [
        (None, b"x" * 100, None),
        ("100", b"x" * 100, None),
        ("101", b"x" * 100, 413),  # declared length over the limit
        (None, b"x" * 101, 413),  # actual length over the limit, no header
        ("10", b"x" * 101, 413),  # header lies: the body still counts
        ("9" * 5000, b"", 413),  # absurd declared size, no int-parsing crash
        ("0" * 30 + "100", b"x" * 100, None),  # leading zeros are a valid length (1*DIGIT)
        ("0" * 30 + "101", b"x" * 100, 413),
        ("000", b"", None),
        ("-1", b"", 400),
        ("ten", b"", 400),
        ("\u0661\u0660", b"", 400),  # Arabic-Indic digits: isdigit() but not ASCII
    ],
)
def test_body_size_limit_checks_header_and_body(content_length, body, status):
    assert status_of(check_size, content_length, body, 100) == status


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b"\xff\xfe\x00garbage",
        b'{"type": NaN}',
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the parser's recursion limit
        b"1" * 5000,  # integer over Python's digit limit
        b'{"type": "message", "x": 1e999}',  # parses to inf, would be sent on as Infinity
        b'{"type": "message", "x": [-1e400]}',
    ],
)
def test_body_that_is_not_json_is_400(body):
    with pytest.raises(InvalidActivity) as raised:
        parse_activity(body)
    assert raised.value.status == 400
    assert raised.value.reason == "body is not valid JSON"


@pytest.mark.parametrize("body", [b"[]", b'"message"', b"42", b"null", b"true"])
def test_body_must_be_an_object(body):
    with pytest.raises(InvalidActivity, match="JSON object"):
        parse_activity(body)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"type": None}, "missing type"),
        ({"type": ""}, "missing type"),
        ({"type": 7}, "missing type"),
        ({"channelId": None}, "missing channelId"),
        ({"channelId": ["msteams"]}, "missing channelId"),
        ({"serviceUrl": None}, "missing serviceUrl"),
        ({"serviceUrl": "ftp://example.com/"}, "missing serviceUrl"),
        ({"serviceUrl": "javascript:alert(1)"}, "missing serviceUrl"),
        ({"serviceUrl": "https://"}, "missing serviceUrl"),
        ({"serviceUrl": "http://[::1"}, "missing serviceUrl"),
        ({"serviceUrl": 3}, "missing serviceUrl"),
        ({"conversation": None}, "missing conversation.id"),
        ({"conversation": "a:conv"}, "missing conversation.id"),
        ({"conversation": {"name": "x"}}, "missing conversation.id"),
        ({"conversation": {"id": 5}}, "missing conversation.id"),
        ({"from": "29:user"}, "from must be an object"),
        ({"recipient": []}, "recipient must be an object"),
        ({"channelData": "x"}, "channelData must be an object"),
        ({"text": {"a": 1}}, "text must be a string"),
        ({"id": 12}, "id must be a string"),
        ({"name": 1}, "name must be a string"),
        ({"membersAdded": {"id": "x"}}, "membersAdded must be an array"),
        ({"membersAdded": ["x"]}, "membersAdded must hold objects"),
        ({"entities": [1]}, "entities must hold objects"),
        # Nested fields the bot reads: a wrong type would fail a handler or a route (a 500
        # and an apology posted with the bot's token) instead of a 400.
        ({"recipient": {"id": 28}}, "recipient.id must be a string"),
        ({"from": {"id": "29:user", "name": ["Ada"]}}, "from.name must be a string"),
        ({"from": {"id": "29:user", "aadObjectId": 1}}, "from.aadObjectId must be a string"),
        ({"from": {"id": "29:user", "role": {}}}, "from.role must be a string"),
        ({"conversation": {"id": "a:1", "isGroup": "false"}}, "conversation.isGroup must be a"),
        ({"conversation": {"id": "a:1", "conversationType": 1}}, "conversation.conversationType"),
        ({"conversation": {"id": "a:1", "tenantId": {"id": "t"}}}, "conversation.tenantId"),
        ({"conversation": {"id": "a:1", "name": 2}}, "conversation.name must be a string"),
        ({"membersAdded": [{"id": 29}]}, "membersAdded[0].id must be a string"),
        ({"membersRemoved": [{"id": "29:a"}, {"id": "29:b", "name": 0}]}, "membersRemoved[1].name"),
        ({"reactionsAdded": [{"type": ["like"]}]}, "reactionsAdded[0].type must be a string"),
        ({"entities": [{"type": 1}]}, "entities[0].type must be a string"),
        ({"entities": [{"type": "mention", "mentioned": "28:bot"}]}, "entities[0].mentioned"),
        (
            {"entities": [{"type": "mention", "mentioned": {"id": 28}, "text": "<at>B</at>"}]},
            "entities[0].mentioned.id must be a string",
        ),
        ({"entities": [{"type": "mention", "text": 5}]}, "entities[0].text must be a string"),
        ({"attachments": [{"contentType": None, "contentUrl": 1}]}, "attachments[0].contentUrl"),
        ({"channelData": {"tenant": "t-1"}}, "channelData.tenant must be an object"),
        ({"channelData": {"tenant": {"id": 1}}}, "channelData.tenant.id must be a string"),
        ({"channelData": {"team": {"id": "19:t", "name": 3}}}, "channelData.team.name must be"),
        ({"channelData": {"channel": {"id": []}}}, "channelData.channel.id must be a string"),
        ({"channelData": {"eventType": True}}, "channelData.eventType must be a string"),
        ({"replyToId": 17}, "replyToId must be a string"),
        # Members changed with no bot to tell apart: the bot would greet itself.
        ({"recipient": None, "membersAdded": [{"id": "28:bot"}]}, "missing recipient.id"),
        (
            {"recipient": {"name": "Bot"}, "membersRemoved": [{"id": "28:bot"}]},
            "missing recipient.id",
        ),
        # Checked before the members' items, as it always was (the 400's text is the body).
        ({"recipient": None, "membersAdded": [1]}, "missing recipient.id"),
    ],
)
def test_required_and_typed_fields(change, reason):
    activity = incoming()
    for key, value in change.items():
        if value is None and key in ("type", "channelId", "serviceUrl", "conversation"):
            del activity[key]
        else:
            activity[key] = value
    with pytest.raises(InvalidActivity) as raised:
        parse_activity(json.dumps(activity).encode())
    assert raised.value.status == 400
    assert raised.value.reason.startswith(reason)


def with_nesting(levels: int) -> bytes:
    """An activity whose `channelData.deep` nests `levels` arrays: total depth levels + 2."""
    body = json.dumps(incoming(channelData={"deep": "x"}))
    return body.replace('"x"', "[" * levels + "]" * levels).encode()


def test_nesting_up_to_the_limit_is_accepted():
    levels = MAX_JSON_DEPTH - 2  # the activity and channelData are the first two
    parsed = parse_activity(with_nesting(levels))
    assert json.dumps(parsed["channelData"]["deep"]) == "[" * levels + "]" * levels


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH - 1, 940])
def test_nesting_deeper_than_the_limit_is_400(levels):
    # 940 levels still parse, but serialising the activity again deeper in the stack (the
    # reply, the stored reference, an expectReplies answer) hits the recursion limit: a 500.
    with pytest.raises(InvalidActivity) as raised:
        parse_activity(with_nesting(levels))
    assert raised.value.status == 400
    assert "nested" in raised.value.reason


def test_valid_body_parses_and_keeps_unknown_fields():
    activity = incoming(
        futureField={"nested": [1, 2]},
        value=[1, "any JSON"],
        text=None,
        serviceUrl="http://127.0.0.1:9/",
    )
    parsed = parse_activity(json.dumps(activity).encode("utf-8"))
    assert parsed == activity
    assert parsed["futureField"] == {"nested": [1, 2]}


def test_every_nested_field_of_a_teams_activity_is_accepted():
    activity = incoming(
        type="conversationUpdate",
        **{"from": {"id": "29:user", "name": "Ada", "aadObjectId": "aad-1", "role": "user"}},
        recipient={"id": "28:bot", "name": "Bot", "role": "bot", "extra": {"kept": 1}},
        conversation={
            "id": "19:c@thread.tacv2",
            "name": "General",
            "isGroup": True,
            "conversationType": "channel",
            "tenantId": "tenant-1",
            "unknown": [1],
        },
        membersAdded=[{"id": "28:bot"}, {"id": "29:new", "name": "New", "aadObjectId": "a"}],
        membersRemoved=[{"id": "29:old", "role": None}],
        reactionsAdded=[{"type": "like"}],
        entities=[
            {"type": "mention", "mentioned": {"id": "28:bot", "name": "Bot"}, "text": "<at>B</at>"},
            {"type": "clientInfo", "locale": "en-GB", "timezone": "Europe/London"},
            {"mentioned": "no type: not a mention, kept"},
        ],
        attachments=[{"contentType": "text/html", "content": {"any": "JSON"}, "name": "x"}],
        channelData={
            "tenant": {"id": "tenant-1"},
            "team": {"id": "19:team@thread.tacv2", "name": "Team", "aadGroupId": "g"},
            "channel": {"id": "19:c@thread.tacv2", "name": "General"},
            "eventType": "channelCreated",
            "settings": {"selectedChannel": {"id": "19:c@thread.tacv2"}},
        },
        replyToId="1700",
    )
    assert parse_activity(json.dumps(activity).encode()) == activity


def test_another_channels_channel_data_is_its_own():
    # Teams' channelData shape is checked on msteams only: on other channels channelData is
    # whatever the channel (or a Web Chat client) puts there, and the bot reads none of it.
    activity = incoming(channelId="webchat", channelData={"tenant": "any", "team": 1})
    assert parse_activity(json.dumps(activity).encode()) == activity


def test_utf16_body_is_accepted_as_json():
    # RFC 8259 wants UTF-8, but Python's json detects UTF-16/32; accept rather than 400.
    activity = incoming(text="héllo ✓")
    assert parse_activity(json.dumps(activity).encode("utf-16"))["text"] == "héllo ✓"


def test_create_reply_swaps_accounts_and_answers_the_incoming_id():
    reply = create_reply(incoming(), "Echo: hello")
    assert reply == {
        "type": "message",
        "from": {"id": "28:bot", "name": "Bot"},
        "recipient": {"id": "29:user", "name": "Ada", "aadObjectId": "aad-1"},
        "conversation": {"id": "a:conv", "tenantId": "tenant-1", "conversationType": "personal"},
        "channelId": "msteams",
        "serviceUrl": SERVICE_URL,
        "replyToId": "act-1",
        "locale": "en-GB",
        "text": "Echo: hello",
    }


def test_create_reply_copies_the_conversation():
    activity = incoming()
    reply = create_reply(activity)
    reply["conversation"]["id"] = "changed"
    assert activity["conversation"]["id"] == "a:conv"
    assert "text" not in reply


def test_apply_reference_addresses_an_outgoing_activity():
    reference = conversation_reference(incoming())
    outgoing = apply_conversation_reference(
        {"type": "message", "text": "hi", "from": {"id": "spoofed"}, "locale": "fr-FR"},
        reference,
    )
    assert outgoing["from"] == {"id": "28:bot", "name": "Bot"}
    assert outgoing["recipient"]["id"] == "29:user"
    assert outgoing["conversation"]["id"] == "a:conv"
    assert outgoing["serviceUrl"] == SERVICE_URL
    assert outgoing["channelId"] == "msteams"
    assert outgoing["locale"] == "fr-FR"  # the activity's own locale wins
    assert "replyToId" not in outgoing
    replied = apply_conversation_reference({"text": "hi"}, reference, reply=True)
    assert replied["replyToId"] == "act-1"
    assert replied["type"] == "message"
    assert replied["locale"] == "en-GB"


def test_conversation_reference_omits_activity_id_for_conversation_update():
    reference = conversation_reference(incoming(type="conversationUpdate"))
    assert "activityId" not in reference
    assert conversation_reference(incoming())["activityId"] == "act-1"
    assert conversation_key("msteams", "a:conv") == "msteams/a:conv"
    assert tenant_id(incoming()) == "tenant-1"


def test_as_activity():
    assert as_activity("hi") == {"type": "message", "text": "hi"}
    card = {"attachments": [{"contentType": "x"}]}
    assert as_activity(card) == {"type": "message", "attachments": [{"contentType": "x"}]}
    assert "type" not in card  # the caller's dict is not changed


def test_bot_mention_is_removed_from_text_but_other_mentions_stay():
    activity = incoming(
        text="<at>Bot</at> weather <at>Ada</at>",
        entities=[
            {"type": "mention", "mentioned": {"id": "28:bot"}, "text": "<at>Bot</at>"},
            {"type": "mention", "mentioned": {"id": "29:user"}, "text": "<at>Ada</at>"},
            {"type": "clientInfo", "locale": "en-GB"},
        ],
    )
    assert text_without_bot_mention(activity) == "weather <at>Ada</at>"
    assert text_without_bot_mention(incoming(text=None)) == ""


def test_a_bot_mention_without_its_text_is_removed_by_the_markup_of_its_name():
    # Teams has sent mentions of names with `&` without `text`: routes met the markup.
    activity = incoming(
        text="<at>Q&A Bot</at> help",
        entities=[{"type": "mention", "mentioned": {"id": "28:bot", "name": "Q&A Bot"}}],
    )
    assert text_without_bot_mention(activity) == "help"
    activity["text"] = "<at>Q&amp;A Bot</at> help"  # the text as HTML
    assert text_without_bot_mention(activity) == "help"


def test_bot_mention_naming_the_bot_without_its_prefix_is_removed_too():
    activity = incoming(
        text="<at>Bot</at> help",
        entities=[{"type": "mention", "mentioned": {"id": "bot"}, "text": "<at>Bot</at>"}],
    )
    assert text_without_bot_mention(activity) == "help"


def test_the_bots_mentions_are_removed_once_each_and_at_most_sixteen_distinct():
    # Each removal reads the whole text: a client's 5,000 mentions of the bot in a 1 MiB
    # message held the event loop for seconds per read. Repeats are removed once; past
    # sixteen distinct texts, the rest stay.
    def mention(text: str) -> dict:
        return {"type": "mention", "mentioned": {"id": "28:bot"}, "text": text}

    names = [f"<at>B{n}</at>" for n in range(20)]
    activity = incoming(
        text=" ".join(names) + " go",
        entities=[mention(names[0])] * 5000 + [mention(name) for name in names],
    )
    assert text_without_bot_mention(activity) == " ".join(names[16:]) + " go"
    repeated = incoming(text="<at>Bot</at> hi <at>Bot</at>", entities=[mention("<at>Bot</at>")] * 3)
    assert text_without_bot_mention(repeated) == "hi"


def test_is_bot_account():
    assert is_bot_account({"id": "28:bot"}, "28:bot")
    assert is_bot_account({"id": "bot"}, "28:bot")  # Teams sometimes drops the prefix
    assert not is_bot_account({"id": "29:bot"}, "28:bot")
    assert not is_bot_account({"id": "28:bot"}, None)
    assert not is_bot_account("28:bot", "28:bot")
