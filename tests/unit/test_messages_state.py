"""State and user-data erasure in the POST /api/messages pipeline (shared/messages.py).

Real tokens from botsim, the bot's token from the fake AAD, replies over HTTP to the
FakeConnector; state in the in-memory store (the Blob store runs in
tests/integration/test_example_cards_and_state.py), or a Blob store whose storage is down.
"""

from __future__ import annotations

import asyncio

import pytest

from shared.config import Settings, StorageSettings
from shared.messages import SERVER_ERROR
from shared.router import APOLOGY, InvokeResponse, Router
from shared.state import (
    State,
    StateConflict,
    StateError,
    conversation_state_key,
    user_state_key,
)
from shared.state_blob import BlobStateStore
from shared.state_memory import MemoryStateStore
from shared.turn import TurnContext
from tests.fixtures.storage import FAST_STORAGE
from tests.unit.test_messages import (  # the fixtures build the bot as test_messages does
    CHANNEL,
    CONVERSATION,
    activity_for,
    attacker,  # noqa: F401
    bot_settings,  # noqa: F401
    channel_token,
    make_bot,  # noqa: F401
    post,
)
from tools.azurite import free_port

USER_KEY = user_state_key(CHANNEL, "29:user-1")


def state_router() -> Router:
    router = Router()

    @router.message(r"^read$")
    async def read(turn: TurnContext) -> None:
        data = await turn.user_state.load()
        await turn.reply(f"theme={data.get('theme')}")

    @router.message(r"^big$")
    async def big(turn: TurnContext) -> None:
        (await turn.user_state.load())["notes"] = "x" * 70_000
        await turn.reply("noted")

    @router.message(r"^counted$")
    async def counted(turn: TurnContext) -> None:
        await turn.conversation_state.update(lambda data: data.update(n=data.get("n", 0) + 1))
        (await turn.user_state.load())["seen"] = {"a set", "is not JSON"}
        await turn.reply("counted")

    @router.invoke("task/submit")
    async def submit(turn: TurnContext):
        await turn.conversation_state.update(lambda data: data.update(n=data.get("n", 0) + 1))
        value = (turn.activity.get("value") or {}).get("answer")
        if value == "bad status":
            return InvokeResponse(700, {"task": {"type": "message", "value": "saved"}})
        if value == "empty":
            return InvokeResponse(204, {"dropped": True})  # a 204 has no body
        return {"task": {"type": "message", "value": "saved"}, "at": {"not", "json"}}

    @router.message(r"^unsendable$")
    async def unsendable(turn: TurnContext) -> None:
        await turn.conversation_state.update(lambda data: data.update(n=data.get("n", 0) + 1))
        await turn.send({"text": "x", "value": {"a set", "is not JSON"}})

    @router.message(r"^fail$")
    async def fail(turn: TurnContext) -> None:
        (await turn.user_state.load())["theme"] = "half-done"
        raise RuntimeError("handler bug")

    @router.message()
    async def remember(turn: TurnContext) -> None:
        (await turn.user_state.load())["theme"] = turn.text
        (await turn.conversation_state.load())["last"] = turn.text
        await turn.reply("ok")

    return router


@pytest.fixture
async def bot(make_bot):  # noqa: F811
    bot = make_bot(state_router())
    bot.runtime.state = MemoryStateStore()
    return bot


async def say(bot, channel_identity, fake_connector, text: str, **fields):
    incoming = activity_for(fake_connector.url, text=text, **fields)
    return await bot.handle(post(incoming, channel_token(channel_identity, bot)))


async def test_changed_state_is_saved_after_the_turn(bot, channel_identity, fake_connector):
    response = await say(bot, channel_identity, fake_connector, "dark")
    assert response.status == 200
    store = bot.runtime.state
    assert (await store.read(USER_KEY)).data == {"theme": "dark"}
    conversation = conversation_state_key(CHANNEL, CONVERSATION)
    assert (await store.read(conversation)).data == {"last": "dark"}

    response = await say(bot, channel_identity, fake_connector, "read")
    assert response.status == 200
    assert fake_connector.requests[-1].json["text"] == "theme=dark"
    assert store.writes == 2  # reading wrote nothing


async def test_code_outside_a_turn_reads_and_updates_the_same_state(
    bot, channel_identity, fake_connector
):
    await say(bot, channel_identity, fake_connector, "dark")

    # E.g. a proactive job: the user's state, by channel and user id, from the runtime.
    outside = State.for_user(bot.runtime.state, CHANNEL, "29:user-1")
    assert (await outside.load())["theme"] == "dark"
    await outside.update(lambda data: data.update(theme="solarized"))
    assert await outside.save()

    await say(bot, channel_identity, fake_connector, "read")
    assert fake_connector.requests[-1].json["text"] == "theme=solarized"


async def test_state_over_the_limit_fails_the_turn_and_writes_nothing(
    bot, channel_identity, fake_connector
):
    response = await say(bot, channel_identity, fake_connector, "big")
    assert response.status == 500
    texts = [request.json["text"] for request in fake_connector.requests]
    assert texts == ["noted", APOLOGY]
    assert await bot.runtime.state.read(USER_KEY) is None
    assert bot.runtime.state.writes == 0


async def test_a_state_that_cannot_be_stored_fails_the_turn_before_either_is_written(
    bot, channel_identity, fake_connector
):
    # The conversation state is fine, the user state is not JSON: writing the first would
    # count the turn again when the channel retries the 500.
    for _ in range(2):
        response = await say(bot, channel_identity, fake_connector, "counted")
        assert response.status == 500
    assert await bot.runtime.state.read(conversation_state_key(CHANNEL, CONVERSATION)) is None
    assert await bot.runtime.state.read(USER_KEY) is None
    assert bot.runtime.state.writes == 0


async def test_a_failed_handler_saves_no_state(bot, channel_identity, fake_connector):
    response = await say(bot, channel_identity, fake_connector, "fail")
    assert response.status == 500
    assert await bot.runtime.state.read(USER_KEY) is None


async def submit(bot, channel_identity, fake_connector, answer: str):
    """A dialog's task/submit, its handler answering as `answer` says (state_router)."""
    return await say(
        bot,
        channel_identity,
        fake_connector,
        "",
        type="invoke",
        name="task/submit",
        value={"answer": answer},
    )


@pytest.mark.parametrize("answer", ["not json", "bad status"])
async def test_an_invoke_answer_that_cannot_be_sent_fails_the_turn_before_state_is_saved(
    bot, channel_identity, fake_connector, answer
):
    for _ in range(2):  # the user, seeing the failure, submits again
        response = await submit(bot, channel_identity, fake_connector, answer)
        assert (response.status, response.body) == (500, SERVER_ERROR.encode())
    assert await bot.runtime.state.read(conversation_state_key(CHANNEL, CONVERSATION)) is None
    assert bot.runtime.state.writes == 0
    texts = [request.json["text"] for request in fake_connector.requests]
    assert texts == [APOLOGY, APOLOGY]  # as for any failed turn


async def test_expect_replies_that_cannot_be_sent_fail_the_turn_before_state_is_saved(
    bot, channel_identity, fake_connector
):
    for _ in range(2):  # the channel retries the 500
        response = await say(
            bot, channel_identity, fake_connector, "unsendable", deliveryMode="expectReplies"
        )
        assert (response.status, response.body) == (500, SERVER_ERROR.encode())
    assert await bot.runtime.state.read(conversation_state_key(CHANNEL, CONVERSATION)) is None
    assert bot.runtime.state.writes == 0
    assert [request.json["text"] for request in fake_connector.requests] == [APOLOGY] * 2


async def test_an_invoke_answered_204_sends_no_body_and_saves_its_state(
    bot, channel_identity, fake_connector
):
    response = await submit(bot, channel_identity, fake_connector, "empty")
    assert (response.status, response.body) == (204, b"")
    stored = await bot.runtime.state.read(conversation_state_key(CHANNEL, CONVERSATION))
    assert stored.data == {"n": 1}


async def test_a_turn_answered_after_the_channel_stopped_waiting_is_a_warning(
    bot, channel_identity, fake_connector, caplog, monkeypatch
):
    # The channel may send the activity again: the handler would run twice, and the
    # operator saw nothing to say why.
    import logging

    import shared.messages

    monkeypatch.setattr(shared.messages, "CHANNEL_WINDOW", 0.0)
    with caplog.at_level(logging.WARNING, logger="shared.messages"):
        assert (await say(bot, channel_identity, fake_connector, "dark")).status == 200
    [line] = [r.getMessage() for r in caplog.records if "answered after" in r.getMessage()]
    assert "the channel waits 0 s, then may send it again" in line

    caplog.clear()
    monkeypatch.setattr(shared.messages, "CHANNEL_WINDOW", 15.0)
    with caplog.at_level(logging.WARNING, logger="shared.messages"):
        assert (await say(bot, channel_identity, fake_connector, "dark")).status == 200
        # A message extension's query: Teams waits 5 s for it, not 15.
        monkeypatch.setattr(shared.messages, "EXTENSION_WINDOW", 0.0)
        query = {"type": "invoke", "name": "composeExtension/query", "value": {}}
        assert (await say(bot, channel_identity, fake_connector, "", **query)).status == 501
    [line] = [r.getMessage() for r in caplog.records if "answered after" in r.getMessage()]
    assert "type='invoke'" not in line and "'invoke' answered after" in line
    assert "the channel waits 0 s" in line

    # A removal may run on past the channel's wait by design: no warning.
    caplog.clear()
    monkeypatch.setattr(shared.messages, "CHANNEL_WINDOW", 0.0)
    with caplog.at_level(logging.WARNING, logger="shared.messages"):
        removal = {"type": "installationUpdate", "action": "remove"}
        assert (await say(bot, channel_identity, fake_connector, "", **removal)).status == 200
    assert "answered after" not in caplog.text


async def test_delete_user_data_erases_and_records_nothing(bot, channel_identity, fake_connector):
    await say(bot, channel_identity, fake_connector, "dark")
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is not None

    response = await say(bot, channel_identity, fake_connector, "", type="deleteUserData")

    assert (response.status, response.body) == (200, b"")
    assert await bot.runtime.state.read(USER_KEY) is None
    assert await bot.runtime.state.read(conversation_state_key(CHANNEL, CONVERSATION)) is None
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is None


async def test_delete_user_data_erases_even_when_a_handler_for_it_fails(
    make_bot,  # noqa: F811
    channel_identity,
    fake_connector,
):
    router = state_router()

    @router.catch_all()
    async def everything_else(turn: TurnContext) -> None:
        raise RuntimeError("handler bug")  # e.g. its own Connector call failed

    bot = make_bot(router)
    bot.runtime.state = MemoryStateStore()
    await say(bot, channel_identity, fake_connector, "dark")
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is not None

    response = await say(bot, channel_identity, fake_connector, "", type="deleteUserData")

    assert response.status == 500  # the handler failed, and the channel is told so
    assert await bot.runtime.state.read(USER_KEY) is None
    assert await bot.runtime.state.read(conversation_state_key(CHANNEL, CONVERSATION)) is None
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is None


async def test_delete_user_data_with_storage_down_is_500_and_keeps_the_reference(
    bot, channel_identity, fake_connector, caplog
):
    await say(bot, channel_identity, fake_connector, "dark")
    secret = "c2VjcmV0LWtleS12YWx1ZQ=="
    down = (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={secret};"
        f"BlobEndpoint=http://127.0.0.1:{free_port()}/devstoreaccount1;"
    )
    settings = Settings(storage=StorageSettings(connection_string=down))
    bot.runtime.state = BlobStateStore(settings, options=FAST_STORAGE)
    try:
        response = await say(bot, channel_identity, fake_connector, "", type="deleteUserData")
    finally:
        await bot.runtime.state.close()

    assert response.status == 500  # the channel's retry finishes the job
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is not None
    [line] = [r.getMessage() for r in caplog.records if "user data not erased" in r.getMessage()]
    assert "state store" in line  # why: which store failed, not only where
    assert secret not in caplog.text


# ---------------------------------------------------------------------------- removals


async def test_uninstall_deletes_the_1to1_state_so_none_outlives_erasure(
    bot, channel_identity, fake_connector
):
    await say(bot, channel_identity, fake_connector, "secret-note")
    conversation = conversation_state_key(CHANNEL, CONVERSATION)
    assert (await bot.runtime.state.read(conversation)).data == {"last": "secret-note"}

    response = await say(
        bot, channel_identity, fake_connector, "", type="installationUpdate", action="remove"
    )

    assert response.status == 200
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is None
    assert await bot.runtime.state.read(conversation) is None
    # The user's own state stays until they (or an operator) ask for erasure.
    assert (await bot.runtime.state.read(USER_KEY)).data == {"theme": "secret-note"}


@pytest.mark.parametrize("delivery", ["normal", "expectReplies"])
async def test_a_removal_handler_that_saves_conversation_state_leaves_none_behind(
    make_bot,  # noqa: F811
    channel_identity,
    fake_connector,
    delivery,
):
    # The handler's save comes before the removal, whatever the delivery mode: run beside
    # the turn (as other expectReplies turns are recorded), the removal's delete came first
    # and the save wrote the state back, with no reference left to erase it through.
    import asyncio

    router = state_router()

    @router.installation_removed()
    async def goodbye(turn: TurnContext) -> None:
        data = await turn.conversation_state.load()
        await asyncio.sleep(0.05)  # e.g. a call to the bot's own backend
        data["uninstalled"] = True

    bot = make_bot(router)
    bot.runtime.state = MemoryStateStore()
    await say(bot, channel_identity, fake_connector, "secret-note")
    conversation = conversation_state_key(CHANNEL, CONVERSATION)
    assert await bot.runtime.state.read(conversation) is not None

    removal = {"type": "installationUpdate", "action": "remove"}
    if delivery == "expectReplies":
        removal["deliveryMode"] = "expectReplies"
    response = await say(bot, channel_identity, fake_connector, "", **removal)

    assert response.status == 200
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is None
    assert await bot.runtime.state.read(conversation) is None


async def test_team_deleted_deletes_the_state_of_its_channel_threads(
    bot, channel_identity, fake_connector
):
    team = {"team": {"id": "19:team@thread.tacv2"}, "tenant": {"id": "t-1"}}
    channel = {"conversationType": "channel", "isGroup": True, "tenantId": "t-1"}
    for thread in ("111", "222"):
        conversation = {**channel, "id": f"19:chan@thread.tacv2;messageid={thread}"}
        await say(
            bot, channel_identity, fake_connector, "hi", channelData=team, conversation=conversation
        )
    thread = conversation_state_key(CHANNEL, "19:chan@thread.tacv2;messageid=111")
    assert (await bot.runtime.state.read(thread)).data == {"last": "hi"}
    removed = {**team, "eventType": "teamDeleted"}

    response = await say(
        bot,
        channel_identity,
        fake_connector,
        "",
        type="conversationUpdate",
        channelData=removed,
        conversation={**channel, "id": "19:team@thread.tacv2"},
    )

    assert response.status == 200
    assert [item.key for item in (await bot.store.list()).items] == []
    for thread in ("111", "222"):
        key = conversation_state_key(CHANNEL, f"19:chan@thread.tacv2;messageid={thread}")
        assert await bot.runtime.state.read(key) is None


class StateDown(MemoryStateStore):
    """Memory state whose deletes fail while `down` (storage unreachable)."""

    down = True

    async def delete(self, key):
        if self.down:
            raise StateError("state store: delete failed: storage unreachable (OSError)")
        return await super().delete(key)


async def test_a_removal_whose_state_delete_fails_is_a_500_and_the_retry_finishes(
    bot, channel_identity, fake_connector, caplog
):
    bot.runtime.state = StateDown()
    bot.runtime.state.down = False
    await say(bot, channel_identity, fake_connector, "secret-note")
    bot.runtime.state.down = True
    uninstall = {"type": "installationUpdate", "action": "remove"}

    response = await say(bot, channel_identity, fake_connector, "", **uninstall)

    assert response.status == 500
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is not None  # state goes first
    assert "reference not removed" in caplog.text and "storage unreachable" in caplog.text
    bot.runtime.state.down = False  # the channel's retry
    assert (await say(bot, channel_identity, fake_connector, "", **uninstall)).status == 200
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is None
    assert await bot.runtime.state.read(conversation_state_key(CHANNEL, CONVERSATION)) is None


async def test_delete_user_data_erases_every_web_chat_visit(bot, channel_identity, fake_connector):
    # Web Chat starts a new Direct Line conversation per visit, under one user id.
    web_chat = {"channelId": "webchat", "channelData": None, "from": {"id": "dl_user-1"}}
    for n in range(10):
        visit = {**web_chat, "conversation": {"id": f"DL-conv-{n}"}, "id": f"DL-conv-{n}|1"}
        assert (
            await say(bot, channel_identity, fake_connector, f"visit {n}", **visit)
        ).status == 200
    assert len((await bot.store.list()).items) == 10

    erase = {**web_chat, "conversation": {"id": "DL-conv-9"}, "type": "deleteUserData"}
    assert (await say(bot, channel_identity, fake_connector, "", **erase)).status == 200

    assert (await bot.store.list()).items == []
    assert await bot.runtime.state.read(user_state_key("webchat", "dl_user-1")) is None
    states = [
        n
        for n in range(10)
        if await bot.runtime.state.read(conversation_state_key("webchat", f"DL-conv-{n}"))
    ]
    assert states == []


class LosesOneAnswer(MemoryStateStore):
    """Memory state whose first write is stored and then answered with an error (a
    timeout after storage took it)."""

    lose = 1

    async def write(self, key, data, *, etag, write_ids=()):
        stored = await super().write(key, data, etag=etag, write_ids=write_ids)
        if stored is not None and self.lose:
            self.lose -= 1
            raise StateError("state store: write timed out after 10s")
        return stored


async def test_a_turn_whose_state_was_stored_with_its_answer_lost_counts_it_once(
    make_bot,  # noqa: F811
    channel_identity,
    fake_connector,
):
    # The turn failed (500, an apology after the reply), and the channel's retry of the
    # activity ran the handler again over the stored write: one message counted twice.
    router = Router()

    @router.message()
    async def count(turn: TurnContext) -> None:
        await turn.conversation_state.update(lambda d: d.update(n=d.get("n", 0) + 1))
        await turn.reply("counted")

    bot = make_bot(router)
    bot.runtime.state = LosesOneAnswer()
    response = await say(bot, channel_identity, fake_connector, "one message")

    assert response.status == 200
    assert [r.json.get("text") for r in fake_connector.requests] == ["counted"]
    stored = await bot.runtime.state.read(conversation_state_key(CHANNEL, CONVERSATION))
    assert stored.data == {"n": 1} and bot.runtime.state.lose == 0


async def test_a_teams_users_state_is_erased_by_their_aad_object_id_alone(
    bot, channel_identity, fake_connector
):
    # The user writes in a team's channel only (no 1:1 is stored): an erasure by the
    # aadObjectId, as a privacy request names the user, left their state.
    from shared.userdata import erase_user_data

    channel = {"id": "19:c@thread.tacv2", "conversationType": "channel", "tenantId": "t-1"}
    response = await say(bot, channel_identity, fake_connector, "my secret", conversation=channel)
    assert response.status == 200
    assert (await bot.runtime.state.read(USER_KEY)).data == {"theme": "my secret"}

    erased = await erase_user_data(
        channel_id=CHANNEL,
        aad_object_id="AAD-USER-1",
        state=bot.runtime.state,
        references=bot.store,
    )

    assert erased.user_state and await bot.runtime.state.read(USER_KEY) is None


class FailsThenHangs(MemoryStateStore):
    """Memory state whose first write fails at once and whose next one never ends."""

    attempts = 0

    async def write(self, key, data, *, etag, write_ids=()):
        self.attempts += 1
        if self.attempts == 1:
            raise StateError("state store: write failed: HTTP 503 (HttpResponseError)")
        await asyncio.sleep(3600)


async def test_a_save_tried_again_ends_within_the_channels_wait():
    # The second save had no bound but the store's own timeouts: a storage brownout
    # answered long after the channel had given up (and sent the activity again).
    import time

    from tests.unit.test_router import RecordingConnector, activity

    store = FailsThenHangs()
    turn = TurnContext(activity(), RecordingConnector(), state=store)
    turn.answer_by = time.monotonic() + 2.5
    await turn.conversation_state.update(lambda data: data.update(n=1))

    started = time.monotonic()
    with pytest.raises(StateError, match="within the channel's wait"):
        await turn.save_state()
    assert store.attempts == 2 and time.monotonic() - started < 10  # not an hour


def slow_router(release: asyncio.Event) -> Router:
    router = Router()

    @router.message()
    async def slow(turn: TurnContext) -> None:  # waits on a model's answer, say
        (await turn.conversation_state.load())["last"] = turn.text
        (await turn.user_state.load())["theme"] = turn.text
        await release.wait()
        await turn.reply("done")

    return router


@pytest.mark.parametrize(
    "removal",
    [
        {"type": "installationUpdate", "action": "remove"},
        {"type": "deleteUserData"},
    ],
)
async def test_a_turn_running_while_its_conversation_is_removed_does_not_write_it_back(
    make_bot,  # noqa: F811
    channel_identity,
    fake_connector,
    removal,
):
    # The slow turn ended after the removal had answered: its reference was stored again
    # (broadcasts kept sending to an uninstalled bot's chat) and its state saved again
    # (an erased user's theme came back).
    release = asyncio.Event()
    bot = make_bot(slow_router(release))
    bot.runtime.state = MemoryStateStore()
    key, state_key = f"{CHANNEL}/{CONVERSATION}", conversation_state_key(CHANNEL, CONVERSATION)
    release.set()
    assert (await say(bot, channel_identity, fake_connector, "first")).status == 200
    assert await bot.store.get(key) is not None
    assert await bot.runtime.state.read(state_key) is not None

    release.clear()
    turn = asyncio.create_task(say(bot, channel_identity, fake_connector, "second", id="2"))
    await asyncio.sleep(0.2)  # the turn waits in its handler
    removed = await say(bot, channel_identity, fake_connector, "", id="3", **removal)
    assert removed.status == 200 and await bot.store.get(key) is None
    release.set()
    assert (await turn).status == 200

    assert await bot.store.get(key) is None
    assert await bot.runtime.state.read(state_key) is None
    if removal["type"] == "deleteUserData":
        assert await bot.runtime.state.read(USER_KEY) is None
    # A turn that begins after the removal records the conversation again.
    assert (await say(bot, channel_identity, fake_connector, "third", id="4")).status == 200
    assert await bot.store.get(key) is not None
    assert (await bot.runtime.state.read(state_key)).data == {"last": "third"}


async def test_delete_user_data_erases_its_own_1to1_whose_reference_was_never_stored(
    bot, channel_identity, fake_connector
):
    # The reference's write after the first turn failed (only logged) while the turn's
    # state was saved: the erasure found 1:1s by stored reference only, and what the user
    # wrote in the very conversation where they asked to be forgotten stayed.
    from shared.references import MemoryReferenceStore, StoreError

    class Refusing(MemoryReferenceStore):
        async def upsert(self, reference, **kwargs) -> bool:
            raise StoreError("reference store: write failed (simulated outage)")

    bot.runtime.references = Refusing()
    assert (await say(bot, channel_identity, fake_connector, "my phone is 555")).status == 200
    state_key = conversation_state_key(CHANNEL, CONVERSATION)
    assert await bot.runtime.state.read(state_key) is not None

    response = await say(bot, channel_identity, fake_connector, "", type="deleteUserData")

    assert response.status == 200
    assert await bot.runtime.state.read(state_key) is None
    assert await bot.runtime.state.read(USER_KEY) is None


async def test_a_handler_that_catches_a_failed_save_and_discards_answers_as_it_chose(
    make_bot,  # noqa: F811
    channel_identity,
    fake_connector,
):
    # It caught StateTooLarge and told the user: the turn's own save failed the same way,
    # and the user got its message, the apology, and (the 500's retry) both again.
    from shared.state import StateTooLarge

    router = Router()

    @router.message()
    async def note(turn: TurnContext) -> None:
        notes = await turn.user_state.load()
        notes["notes"] = notes.get("notes", "") + turn.text
        try:
            await turn.save_state()
        except StateTooLarge:
            await turn.discard_state()
            await turn.reply("Your notebook is full; that note was not kept.")
            return
        await turn.reply("noted")

    bot = make_bot(router)
    bot.runtime.state = MemoryStateStore()
    assert (await say(bot, channel_identity, fake_connector, "short")).status == 200
    response = await say(bot, channel_identity, fake_connector, "x" * 70_000, id="2")

    assert response.status == 200
    assert [a["text"] for a in fake_connector.activities] == [
        "noted",
        "Your notebook is full; that note was not kept.",
    ]
    assert (await bot.runtime.state.read(USER_KEY)).data == {"notes": "short"}


async def test_a_discarded_conflict_leaves_the_other_writers_state_and_saves_nothing():
    store = MemoryStateStore()
    mine, theirs = State(store, USER_KEY), State(store, USER_KEY)
    (await mine.load())["theme"] = "dark"
    (await theirs.load())["theme"] = "light"
    assert await theirs.save()
    with pytest.raises(StateConflict):
        await mine.save()
    data = await mine.load()
    await mine.discard()
    assert data == {} and not mine.changed  # the dict held shows the state as it was read
    assert await mine.save() is False
    assert (await store.read(USER_KEY)).data == {"theme": "light"}
    (await mine.load())["count"] = 1  # later changes save as usual, merged with theirs
    assert await mine.save()
    assert (await store.read(USER_KEY)).data == {"theme": "light", "count": 1}


async def test_a_save_out_when_its_conversations_removal_lands_is_not_written_again():
    # Checked before the save only: the write was refused (deleted meanwhile), and its
    # conflict retry created the document again (or met the deletion as a conflict: 500).
    from shared.lifecycle import forget_conversation
    from shared.references import MemoryReferenceStore

    class HeldWrite(MemoryStateStore):
        gate: asyncio.Event | None = None

        async def write(self, key, data, **kwargs):
            if self.gate is not None:
                gate, self.gate = self.gate, None
                await gate.wait()  # on the wire while the removal runs
            return await super().write(key, data, **kwargs)

    state, references = HeldWrite(), MemoryReferenceStore()
    key = conversation_state_key("webchat", "c-1")
    await state.write(key, {"n": 1}, etag=None)
    reference = {
        "channelId": "webchat",
        "serviceUrl": "https://bot.example.com/",
        "conversation": {"id": "c-1"},
        "bot": {"id": "b"},
    }
    await references.upsert(reference)
    turn = TurnContext(
        {**reference, "type": "message", "id": "1", "from": {"id": "u"}, "recipient": {"id": "b"}},
        None,
        state=state,
    )
    (await turn.conversation_state.load())["m"] = "new"
    state.gate = gate = asyncio.Event()
    saving = asyncio.create_task(turn.save_state())
    await asyncio.sleep(0.05)
    await forget_conversation(references, state, "webchat/c-1", reference)
    gate.set()
    await saving
    assert await state.read(key) is None


async def test_a_handler_that_erases_its_user_then_saves_keeps_what_it_saved(
    make_bot,  # noqa: F811
    channel_identity,
    fake_connector,
):
    # Its own erasure counted as a removal the turn began before: the opt-out it then
    # saved was dropped without a word.
    router = Router()

    @router.message(r"^forget me$")
    async def forget(turn: TurnContext) -> None:
        await erase_sender(turn, bot)
        (await turn.user_state.load())["optedOut"] = True
        await turn.save_state()
        await turn.reply("Forgotten.")

    @router.message()
    async def other(turn: TurnContext) -> None:
        (await turn.user_state.load())["last"] = turn.text
        await turn.reply("ok")

    bot = make_bot(router)
    bot.runtime.state = MemoryStateStore()
    assert (await say(bot, channel_identity, fake_connector, "hi")).status == 200
    assert (await say(bot, channel_identity, fake_connector, "forget me", id="2")).status == 200
    assert (await bot.runtime.state.read(USER_KEY)).data == {"optedOut": True}
    # Its 1:1 is not recorded again after the turn: the erasure removed it.
    assert await bot.store.get(f"{CHANNEL}/{CONVERSATION}") is None


@pytest.mark.parametrize("edit", ["update", "direct"])
async def test_a_handler_that_erases_its_user_after_changing_their_state_writes_none_back(
    make_bot,  # noqa: F811
    channel_identity,
    fake_connector,
    edit,
):
    # Changed before the erasure (a visit counter), the states were saved at the turn's
    # end as the turn's own: the erased data came back, or (a direct edit meeting the
    # deletion) the turn answered 500 with the apology after "Forgotten.".
    router = Router()

    @router.message()
    async def visit(turn: TurnContext) -> None:
        if edit == "update":
            await turn.user_state.update(lambda d: d.update(visits=d.get("visits", 0) + 1))
        else:
            data = await turn.user_state.load()
            data["visits"] = data.get("visits", 0) + 1
        (await turn.conversation_state.load())["last"] = turn.text
        if turn.text == "forget me":
            await erase_sender(turn, bot)
            await turn.reply("Forgotten.")
        else:
            await turn.reply("ok")

    bot = make_bot(router)
    bot.runtime.state = MemoryStateStore()
    assert (await say(bot, channel_identity, fake_connector, "secret")).status == 200
    response = await say(bot, channel_identity, fake_connector, "forget me", id="2")

    assert response.status == 200
    assert [a["text"] for a in fake_connector.activities] == ["ok", "Forgotten."]
    assert await bot.runtime.state.read(USER_KEY) is None
    assert await bot.runtime.state.read(conversation_state_key(CHANNEL, CONVERSATION)) is None


async def test_a_handlers_own_save_after_its_users_erasure_elsewhere_writes_nothing(
    make_bot,  # noqa: F811
    channel_identity,
    fake_connector,
):
    # State.save() called by the handler itself wrote a new document (no conflict met):
    # only the turn's save_state left a removed state alone.
    release = asyncio.Event()
    router = Router()

    @router.message()
    async def slow(turn: TurnContext) -> None:
        (await turn.user_state.load())["theme"] = turn.text
        await release.wait()
        await turn.user_state.save()
        await turn.reply("saved")

    bot = make_bot(router)
    bot.runtime.state = MemoryStateStore()
    turn = asyncio.create_task(say(bot, channel_identity, fake_connector, "dark"))
    await asyncio.sleep(0.2)
    erased = await say(bot, channel_identity, fake_connector, "", id="2", type="deleteUserData")
    assert erased.status == 200
    release.set()
    assert (await turn).status == 200
    assert await bot.runtime.state.read(USER_KEY) is None


async def test_a_handler_that_erases_its_user_then_deletes_and_writes_keeps_what_it_wrote(
    make_bot,  # noqa: F811
    channel_identity,
    fake_connector,
):
    # Its state read before the erasure (a visit counter), the handler deleted it and
    # saved an opt-out: dropped without a word, the first read counting as its last.
    router = Router()

    @router.message()
    async def visit(turn: TurnContext) -> None:
        await turn.user_state.update(lambda d: d.update(visits=d.get("visits", 0) + 1))
        if turn.text == "forget me":
            await erase_sender(turn, bot)
            await turn.user_state.delete()  # what it holds is the erased data: start anew
            (await turn.user_state.load())["optedOut"] = True
        await turn.reply("ok")

    bot = make_bot(router)
    bot.runtime.state = MemoryStateStore()
    assert (await say(bot, channel_identity, fake_connector, "hi")).status == 200
    assert (await say(bot, channel_identity, fake_connector, "forget me", id="2")).status == 200
    assert (await bot.runtime.state.read(USER_KEY)).data == {"optedOut": True}


async def test_a_state_read_while_its_users_erasure_ran_is_not_written_back():
    # The read began before the erasure's deletes and ended after them: timed at its
    # end, it passed for a read after the erasure, and what it read was written back.
    from shared.references import MemoryReferenceStore
    from shared.removals import current_turn
    from shared.userdata import erase_user_data

    class HeldRead(MemoryStateStore):
        gate: asyncio.Event | None = None

        async def read(self, key):
            found = await super().read(key)
            if self.gate is not None:
                gate, self.gate = self.gate, None
                await gate.wait()  # the document read; its answer still on the way
            return found

    store = HeldRead()
    await store.write(USER_KEY, {"name": "Ada"}, etag=None)
    incoming = activity_for("https://bot.example.com/", id="1")
    token = current_turn.set(object())  # one turn: the erasure is its own
    try:
        turn = TurnContext(incoming, None, state=store)
        store.gate = gate = asyncio.Event()
        reading = asyncio.create_task(turn.user_state.load())
        await asyncio.sleep(0.05)
        await erase_user_data(
            channel_id=CHANNEL,
            user_id="29:user-1",
            state=store,
            references=MemoryReferenceStore(),
        )
        gate.set()
        data = await reading
        data["greeting"] = f"Hi {data['name']}"
        await turn.save_state()
    finally:
        current_turn.reset(token)
    assert await store.read(USER_KEY) is None


async def erase_sender(turn: TurnContext, bot) -> None:
    """What a "forget me" handler does: erase its sender's data itself."""
    from shared.userdata import erase_user_data

    await erase_user_data(
        channel_id=turn.channel_id,
        user_id=turn.from_["id"],
        state=turn.state_store,
        references=bot.runtime.references,
    )
