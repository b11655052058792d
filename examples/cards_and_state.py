"""A richer sample bot: a card that updates itself, and state per user and per conversation.

What it shows, one handler each:

- ``card``: sends an Adaptive Card with a click counter. Pressing "Add one" sends an
  ``adaptiveCard/action`` invoke (Universal Actions); the bot counts the click in the
  conversation's state and answers with the updated card, which replaces the old one for
  the user who pressed it. The card also asks Teams to refresh it when shown, so the
  others (and a late reader) see the current count; to change it for everyone at once,
  a handler updates the message itself (``turn.update_activity``).
- ``theme dark`` / ``theme light``: a preference in the user's state, kept across
  conversations on the channel.
- ``nickname``: a card whose button opens a Teams dialog (``task/fetch``); what the user
  submits there (``task/submit``) is saved in their state.
- ``remind 90 stretch``: schedules a proactive message to this conversation in 90 seconds,
  through the proactive queue (``turn.send_later``): it arrives even if no one writes again,
  with the queue's retries and a delivery report.
- anything else: counts the user's messages (user state) and says what it knows.

Erasing a user's data needs no handler: on the channel's ``deleteUserData`` activity the
pipeline removes the user's state and their 1:1 conversations. The tests
(tests/integration/test_example_cards_and_state.py) run this router through the real
pipeline: channel tokens, the Connector, Blob storage.
"""

from __future__ import annotations

from typing import Any

from shared.activity import is_bot_account
from shared.cards import (
    adaptive_card,
    execute_action,
    refresh,
    submit_action,
    text_block,
)
from shared.invokes import card_error, card_response, task_card, task_message
from shared.router import Router
from shared.state import StateConflict
from shared.turn import TurnContext

router = Router()

THEMES = ("dark", "light")
MAX_NICKNAME = 40
MAX_REMINDER_SECONDS = 24 * 3600


def counter_card(clicks: int) -> dict[str, Any]:
    """The counter card; its refresh shows the current count to whoever opens it."""
    return adaptive_card(
        [
            text_block("Team counter", weight="Bolder", size="Medium"),
            text_block(f"Clicks: {clicks}"),
        ],
        actions=[execute_action("Add one", verb="add")],
        refresh=refresh("show"),
    )


def add_click(data: dict[str, Any]) -> None:
    data["clicks"] = data.get("clicks", 0) + 1


@router.message(r"^card$")
async def send_card(turn: TurnContext) -> None:
    clicks = (await turn.conversation_state.load()).get("clicks", 0)
    await turn.send(counter_card(clicks))


@router.card_action("add")
async def add_one(turn: TurnContext):
    # update() rather than editing the dict: if another click was saved meanwhile, the
    # save re-reads the count and adds this click again, so no click is lost.
    data = await turn.conversation_state.update(add_click)
    await turn.save_state()  # saved before the card says so
    return card_response(counter_card(data["clicks"]))


@router.card_action("show")
async def show(turn: TurnContext):
    clicks = (await turn.conversation_state.load()).get("clicks", 0)
    return card_response(counter_card(clicks))


@router.card_action()
async def unknown_action(turn: TurnContext):
    return card_error(400, "This card's action is not known to the bot.")


@router.message(r"^theme\s+(?P<theme>\w+)$")
async def set_theme(turn: TurnContext) -> None:
    theme = turn.match["theme"].lower()
    if theme not in THEMES:
        await turn.reply(f"Pick one of: {', '.join(THEMES)}.")
        return
    (await turn.user_state.load())["theme"] = theme
    try:
        await turn.save_state()  # saved before the user is told so
    except StateConflict:  # changed in another chat at the same moment
        await turn.discard_state()
        await turn.reply("Your theme was just changed elsewhere; try again.")
        return
    await turn.reply(f"Your theme is now {theme}.")


@router.message(r"^nickname$")
async def offer_nickname(turn: TurnContext) -> None:
    button = submit_action("Set my nickname", data={"msteams": {"type": "task/fetch"}})
    await turn.send(adaptive_card([text_block("How should I call you?")], actions=[button]))


@router.task_fetch()
async def nickname_dialog(turn: TurnContext):
    form = adaptive_card(
        [{"type": "Input.Text", "id": "nickname", "label": "Nickname", "maxLength": MAX_NICKNAME}],
        actions=[submit_action("Save")],
    )
    return task_card(form, title="Nickname", height="small", width="small")


@router.task_submit()
async def save_nickname(turn: TurnContext):
    data = turn.task_request.get("data")
    nickname = data.get("nickname") if isinstance(data, dict) else None
    if not isinstance(nickname, str) or not nickname.strip():
        return task_message("No nickname given; nothing changed.")
    nickname = nickname.strip()[:MAX_NICKNAME]
    (await turn.user_state.load())["nickname"] = nickname
    return task_message(f"Hello, {nickname}!")


@router.message(r"^remind\s+(?P<seconds>\d{1,6})\s+(?P<what>.+)$")
async def remind(turn: TurnContext) -> None:
    seconds = int(turn.match["seconds"])
    if seconds > MAX_REMINDER_SECONDS:
        await turn.reply("I can remind you within a day at most.")
        return
    # Plain, as every text the user wrote that the bot repeats: their Markdown (a link)
    # would read as the bot's own.
    reminder = {"type": "message", "text": f"Reminder: {turn.match['what']}"}
    await turn.send_later({**reminder, "textFormat": "plain"}, delay=seconds)
    await turn.reply(f"I will remind you in {seconds} s.")


@router.message()
async def count_messages(turn: TurnContext) -> None:
    if is_bot_account(turn.activity.get("from"), turn.bot_id):
        return  # its own message passed back by a channel: answered, it would come back
    data = await turn.user_state.update(lambda d: d.update(messages=d.get("messages", 0) + 1))
    await turn.save_state()  # saved before the reply says the count: a message sent meanwhile
    # elsewhere (another chat, another instance) is then counted in it
    name = data.get("nickname") or turn.from_.get("name") or "there"
    theme = data.get("theme", "not set")
    text = (
        f"Hi {name}: that is message {data['messages']} you sent me. Theme: {theme}. "
        "Say 'card', 'theme dark', 'nickname' or 'remind 60 stretch'."
    )
    await turn.reply({"type": "message", "text": text, "textFormat": "plain"})
