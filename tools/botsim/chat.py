"""`make chat`: type messages to the locally running bot, as a channel would send them.

Starts botsim's fake Connector on a loopback port (the serviceUrl of every activity it
posts), opens a conversation with a `conversationUpdate` (so the bot welcomes you and
remembers the conversation), then posts each line you type as a `message` activity to
the bot's `/api/messages`. Everything the bot sends to the fake Connector is printed as
it arrives: replies, updates, and proactive messages sent later.

The local bot runs in unauthenticated mode (`BOT_ALLOW_UNAUTHENTICATED=true`, no app
id), so the chat sends no token; the bot accepts that only for loopback serviceUrls.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
import uuid
from typing import Any, TextIO

from tools.botsim.connector import FakeConnector, RecordedRequest

DEFAULT_BOT = "http://127.0.0.1:7071/api/messages"
DEFAULT_PORT = 3980  # trusted by local.settings.example.json


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
            with urllib.request.urlopen(request, timeout=20) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def show(self, request: RecordedRequest) -> None:
        activity = request.activity or {}
        kind = activity.get("type", "?")
        label = {"replyToActivity": "reply", "sendToConversation": "send"}.get(
            request.operation or "", request.operation or "?"
        )
        if kind == "message":
            text = activity.get("text") or ""
            extra = len(activity.get("attachments") or [])
            suffix = f" [+{extra} attachment(s)]" if extra else ""
            print(f"bot ({label})> {text}{suffix}", file=self.out, flush=True)
        else:
            print(f"bot ({label})> [{kind}]", file=self.out, flush=True)

    def start(self) -> int:
        return self.post(self.activity("conversationUpdate", membersAdded=[self.user, self.bot]))

    def say(self, text: str) -> int:
        return self.post(self.activity("message", text=text))


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.botsim chat", description=__doc__)
    parser.add_argument("--bot", default=DEFAULT_BOT, help="the bot's messages endpoint")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="fake Connector port")
    args = parser.parse_args(argv)

    with FakeConnector(port=args.port) as connector:
        chat = Chat(args.bot, connector, out)
        connector.subscribe(chat.show)
        try:
            status = chat.start()
        except urllib.error.URLError:
            print(f"no bot answers at {args.bot}: start it with `make run`", file=out)
            return 1
        if status != 200:
            print(f"the bot answered {status} to the conversation start", file=out, flush=True)
        print("Type a message and press Enter (Ctrl-D to quit).", file=out, flush=True)
        for line in stdin:
            text = line.strip()
            if not text:
                continue
            status = chat.say(text)
            if status != 200:
                print(f"(the bot answered HTTP {status})", file=out, flush=True)
    return 0
