"""`make chat`: type messages to the locally running bot, as a channel would send them.

Starts botsim's fake Connector on a loopback port (the serviceUrl of every activity it
posts), opens a conversation with a `conversationUpdate` (so the bot welcomes you and
remembers the conversation), then posts each line you type as a `message` activity to
the bot's `/api/messages`. Everything the bot sends to the fake Connector is printed as
it arrives: replies, updates, and proactive messages sent later (what goes to another
conversation on this port, an earlier chat's, is labelled with that conversation's id).

The local bot runs in unauthenticated mode (`BOT_ALLOW_UNAUTHENTICATED=true`, no app
id), so the chat sends no token; the bot accepts that only for loopback serviceUrls (any
port, so when 3980 is taken the chat listens on another one).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, TextIO

from shared.command_output import terminal_text
from tools.args import http_url, tcp_port_or_any
from tools.botsim.connector import FakeConnector, RecordedRequest
from tools.devhost.settings import HostError, app_id_source, load_local_settings

DEFAULT_BOT = "http://127.0.0.1:7071/api/messages"
DEFAULT_PORT = 3980  # any loopback port works: unauthenticated mode accepts them all
TIMEOUT = 20.0  # the channel gives a bot 15 s

ROOT = Path(__file__).resolve().parents[2]  # where `make run` reads local.settings.json
NEEDS_TOKEN = (
    "the bot answered 401: it expects a channel token (MicrosoftAppId is set{where}), and the "
    "chat has none to send.\nTo chat locally, {fix}, then restart `make run`."
)
LOCAL_MODE = '"BOT_ALLOW_UNAUTHENTICATED": "true"'
FIXES = {
    "in the environment": (
        'make MicrosoftAppId "" in the environment `make run` starts from (or unset it: '
        f"`env -u MicrosoftAppId make run`) and set {LOCAL_MODE} in local.settings.json"
    ),
    "in local.settings.json": f'set in local.settings.json "MicrosoftAppId": "" and {LOCAL_MODE}',
    "": (
        f'set in local.settings.json "MicrosoftAppId": "" and {LOCAL_MODE} (and unset '
        "MicrosoftAppId in the environment `make run` starts from, if it is set there)"
    ),
}


def needs_token_hint() -> str:
    """What to change for a bot that answered 401, naming where its app id is set as the
    bot `make run` starts reads it (the environment, then local.settings.json), as far as
    this process can see: the bot may have been started from another environment."""
    try:
        where = app_id_source(load_local_settings(ROOT))
    except HostError:  # unreadable: the bot would not have started from it
        where = app_id_source({})
    return NEEDS_TOKEN.format(where=f" {where}" if where else "", fix=FIXES[where])


class BotUnreachable(Exception):
    """No answer from the bot's endpoint (not running, stopped, or too slow)."""


# The bot runs on this machine: a proxy set for the machine (`http_proxy`) never reaches it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Chat:
    """One conversation between a person at a terminal and the bot."""

    def __init__(self, bot_url: str, connector: FakeConnector, out: TextIO) -> None:
        self.bot_url = bot_url
        self.connector = connector
        self.out = out
        self.conversation_id = f"botsim-{uuid.uuid4().hex[:12]}"
        self.user = {"id": "botsim-user", "name": "You"}
        self.bot = {"id": "botsim-bot", "name": "Bot"}

    def activity(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "id": uuid.uuid4().hex,
            "channelId": "botsim",
            "serviceUrl": self.connector.url,
            "conversation": {"id": self.conversation_id, "conversationType": "personal"},
            "from": self.user,
            "recipient": self.bot,
            "locale": "en-US",
            **fields,
        }

    def post(self, activity: dict[str, Any]) -> int:
        request = urllib.request.Request(
            self.bot_url,
            data=json.dumps(activity).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with _DIRECT.open(request, timeout=TIMEOUT) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except TimeoutError:
            raise BotUnreachable(f"the bot did not answer within {TIMEOUT:.0f} s") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            raise BotUnreachable(f"no bot answers at {self.bot_url}") from None

    def show(self, request: RecordedRequest) -> None:
        activity = request.activity or {}
        kind = activity.get("type", "?")
        label = {
            "replyToActivity": "reply",
            "sendToConversation": "send",
            "updateActivity": "update",
            "deleteActivity": "delete",
        }.get(request.operation or "", request.operation or "?")
        conversation = request.conversation_id
        if conversation and conversation != self.conversation_id:
            # An earlier chat's conversation has the same serviceUrl (this port): a
            # broadcast reaches it here too, and must not look like a duplicate.
            label = f"{label}, to conversation {conversation}"
        if request.operation == "deleteActivity":
            line = f"bot ({label})> [activity {request.params.get('activityId')}]"
        elif kind == "message":
            text = activity.get("text") or ""
            attachments = activity.get("attachments") or []
            shown = [describe_attachment(a) for a in attachments if isinstance(a, dict)]
            suffix = "".join(f" [{item}]" for item in shown)
            line = f"bot ({label})> {text}{suffix}"
        else:
            line = f"bot ({label})> [{kind}]"
        # What the bot sends may carry what a client wrote (an echo): shown, never obeyed.
        print(terminal_text(line), file=self.out, flush=True)

    def start(self) -> int:
        return self.post(self.activity("conversationUpdate", membersAdded=[self.user, self.bot]))

    def say(self, text: str) -> int:
        return self.post(self.activity("message", text=text))


_CARD_ACTIONS = frozenset(
    {
        "imBack",
        "messageBack",
        "postBack",
        "openUrl",
        "invoke",
        "signin",
        "call",
        "showImage",
        "downloadFile",
        "playAudio",
        "playVideo",
    }
)


def describe_attachment(attachment: dict) -> str:
    """A card's texts and buttons on one line (press them in `make playground`); another
    attachment's content type."""
    kind = str(attachment.get("contentType") or "?")
    content = attachment.get("content")
    if not isinstance(content, dict) or not kind.startswith("application/vnd.microsoft.card."):
        return f"attachment: {kind}"
    texts: list[str] = []
    buttons: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            node_type = str(node.get("type") or "")
            # Adaptive Card actions; a hero card's buttons (card actions; a fact, with its
            # title and value too, is no button).
            if node_type.startswith("Action.") or node_type in _CARD_ACTIONS:
                buttons.append(str(node.get("title") or node_type))
                return
            if not node_type and "title" in node and "value" in node:  # a FactSet's fact
                texts.append(f"{node['title']}: {node['value']}")
                return
            for field in ("title", "subtitle", "text"):
                if isinstance(node.get(field), str) and node[field]:
                    texts.append(node[field])
            for field in ("body", "items", "columns", "facts", "actions", "buttons"):
                walk(node.get(field))

    walk(content)
    line = " | ".join(texts) or "card"
    return f"{line} | buttons: {', '.join(buttons)}" if buttons else line


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.botsim chat", description=__doc__)
    parser.add_argument(
        "--bot", type=http_url, default=DEFAULT_BOT, help="the bot's messages endpoint"
    )
    parser.add_argument(
        "--port",
        type=tcp_port_or_any,
        help=f"fake Connector port (default {DEFAULT_PORT}, else any free one; 0: any free one)",
    )
    args = parser.parse_args(argv)
    for stream in (stdin, out):  # a byte the terminal's encoding lacks: replaced, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")

    connector = start_connector(args.port, out)
    if connector is None:
        return 1
    try:
        return converse(Chat(args.bot, connector, out), stdin, out)
    finally:
        connector.stop()


def start_connector(port: int | None, out: TextIO) -> FakeConnector | None:
    """The fake Connector on `port`, or on 3980 (any free port when 3980 is taken)."""
    for candidate in (port,) if port is not None else (DEFAULT_PORT, 0):
        connector = FakeConnector(port=candidate, refuse_browsers=True)
        try:
            connector.start()
        except OSError as error:
            connector.stop()
            if port is not None:
                print(
                    f"cannot listen on port {port} ({error.strerror}): pick another --port",
                    file=out,
                )
                return None
            continue
        if candidate == 0:  # --port 0 too: the port chosen is worth knowing
            chosen = urllib.parse.urlsplit(connector.url).port
            taken = f"port {DEFAULT_PORT} is in use (another chat?): " if port is None else ""
            print(
                f"{taken}using port {chosen}; "
                f"`python -m tools.botsim chat --port {chosen}` reaches this conversation's "
                "proactive messages later",
                file=out,
            )
        return connector
    return None


def converse(chat: Chat, stdin: TextIO, out: TextIO) -> int:
    """Open the conversation, then send each typed line; 1 when the bot cannot be talked to."""
    chat.connector.subscribe(chat.show)
    try:
        status = chat.start()
    except BotUnreachable as error:
        print(f"{error}: start it with `make run`", file=out, flush=True)
        return 1
    if status == 401:
        print(needs_token_hint(), file=out, flush=True)
        return 1
    if status >= 500:
        print(
            f"the bot answered {status} to the conversation start: its log (the `make run` "
            "terminal) says why",
            file=out,
            flush=True,
        )
    elif status != 200:
        print(f"the bot answered {status} to the conversation start", file=out, flush=True)
    print(
        f"Conversation botsim/{chat.conversation_id} (the key producer commands take). "
        "Type a message and press Enter (Ctrl-D to quit).",
        file=out,
        flush=True,
    )
    for line in stdin:
        text = line.strip()
        if not text:
            continue
        try:
            status = chat.say(text)
        except BotUnreachable as error:
            print(f"({error}; is `make run` still running?)", file=out, flush=True)
            continue
        if status == 401:
            print(needs_token_hint(), file=out, flush=True)
            return 1
        if status >= 500:
            print(f"(the bot answered HTTP {status}: its log says why)", file=out, flush=True)
        elif status != 200:
            print(f"(the bot answered HTTP {status})", file=out, flush=True)
    return 0
