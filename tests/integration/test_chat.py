"""`make chat`: a person's lines reach the locally running bot and its answers are printed."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from azure.storage.queue import QueueClient, TextBase64EncodePolicy

from shared.config import Settings
from shared.references import BlobReferenceStore
from tests.fixtures.devhost import DevHost, free_port
from tools.botsim import chat
from tools.botsim.server import BackgroundServer
from tools.devhost.settings import app_id_source

pytestmark = pytest.mark.integration


@pytest.fixture
def local_bot(azurite, unique_name, tmp_path):
    """The bot as `make run` starts it: local unauthenticated mode, trusting the chat's port."""
    port = free_port()
    env = {
        "BOT_ALLOW_UNAUTHENTICATED": "true",
        "BOT_TRUSTED_SERVICE_URLS": f"http://127.0.0.1:{port}",
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": unique_name("refs"),
    }
    host = DevHost(env, tmp_path).wait_started()
    try:
        yield host, port
    finally:
        host.stop()


def test_chat_prints_the_welcome_and_the_echo(local_bot):
    host, port = local_bot
    out = io.StringIO()

    code = chat.main(
        ["--bot", f"{host.url}/api/messages", "--port", str(port)],
        stdin=io.StringIO("hello bot\n\nsecond line\n"),
        out=out,
    )

    printed = out.getvalue()
    assert code == 0, printed + host.log
    assert "bot (send)> " in printed  # the welcome, sent to the conversation
    assert "bot (reply)> Echo: hello bot" in printed
    assert "bot (reply)> Echo: second line" in printed
    assert "answered HTTP" not in printed  # every line got a 200


def test_chat_replaces_bytes_its_input_encoding_cannot_read(local_bot):
    host, port = local_bot
    out = io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 ok\n"), encoding="utf-8")  # Latin-1 input

    code = chat.main(["--bot", f"{host.url}/api/messages", "--port", str(port)], stdin, out)

    assert code == 0, out.getvalue()
    assert "bot (reply)> Echo: caf\ufffd ok" in out.getvalue()  # no lone surrogate sent


def test_chat_shows_a_cards_texts_and_buttons():
    adaptive = {
        "contentType": "application/vnd.microsoft.card.adaptive",
        "content": {
            "type": "AdaptiveCard",
            "body": [
                {"type": "TextBlock", "text": "Clicks: 0"},
                {"type": "FactSet", "facts": [{"title": "Order", "value": "42"}]},
                {"type": "Container", "items": [{"type": "TextBlock", "text": "Tap below"}]},
            ],
            "actions": [{"type": "Action.Execute", "title": "Add one", "verb": "add"}],
        },
    }
    hero = {
        "contentType": "application/vnd.microsoft.card.hero",
        "content": {
            "title": "Menu",
            "buttons": [{"type": "imBack", "title": "Help", "value": "help"}],
        },
    }
    assert (
        chat.describe_attachment(adaptive) == "Clicks: 0 | Order: 42 | Tap below | buttons: Add one"
    )
    assert chat.describe_attachment(hero) == "Menu | buttons: Help"
    assert chat.describe_attachment({"contentType": "image/png"}) == "attachment: image/png"


def test_chat_prints_proactive_messages_as_they_arrive(azurite, unique_name, tmp_path):
    """A proactive send queued while the person is still typing shows up in the chat."""
    port, queue = free_port(), unique_name("proactive")
    env = {
        "BOT_ALLOW_UNAUTHENTICATED": "true",
        "BOT_TRUSTED_SERVICE_URLS": f"http://127.0.0.1:{port}",
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": unique_name("refs"),
        "BOT_PROACTIVE_QUEUE": queue,
    }
    host = DevHost(env, tmp_path, functions=("messages_function", "proactive_function"))
    host.wait_started()
    thread, write_end, out = chat_in_background(f"{host.url}/api/messages", port)
    try:
        with os.fdopen(write_end, "w") as typed:
            typed.write("hi\n")
            typed.flush()
            wait_until(lambda: "Echo: hi" in out.getvalue(), "the echo")
            key = asyncio.run(only_reference(env))
            QueueClient.from_connection_string(
                azurite.connection_string, queue, message_encode_policy=TextBase64EncodePolicy()
            ).send_message(json.dumps({"id": "p-1", "to": {"conversation": key}, "text": "ping"}))
            wait_until(lambda: "bot (send)> ping" in out.getvalue(), "the proactive message")
    finally:
        thread.join(timeout=30)
        host.stop()
    assert not thread.is_alive()


def chat_in_background(bot_url: str, port: int) -> tuple[threading.Thread, int, io.StringIO]:
    """`make chat` in a thread: its thread, the fd to type into (close it to quit), its output."""
    read_end, write_end = os.pipe()
    out = io.StringIO()
    thread = threading.Thread(
        target=chat.main, args=(["--bot", bot_url, "--port", str(port)], os.fdopen(read_end), out)
    )
    thread.start()
    return thread, write_end, out


async def only_reference(env: dict[str, str]) -> str:
    store = BlobReferenceStore(Settings.from_env(env))
    try:
        [stored] = (await store.list(channel_id="botsim")).items
        return stored.key
    finally:
        await store.close()


def wait_until(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_chat_says_when_no_bot_answers():
    out = io.StringIO()
    code = chat.main(
        ["--bot", f"http://127.0.0.1:{free_port()}/api/messages", "--port", str(free_port())],
        stdin=io.StringIO("hello\n"),
        out=out,
    )
    assert code == 1
    assert "make run" in out.getvalue()


def test_chat_with_a_bot_that_requires_a_token_says_how_to_fix_it(azurite, unique_name, tmp_path):
    # local.settings.json with an app id: the bot wants a channel token the chat cannot mint.
    env = {
        "MicrosoftAppId": "00000000-0000-0000-0000-00000000a99d",
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": unique_name("refs"),
    }
    host = DevHost(env, tmp_path).wait_started()
    out = io.StringIO()
    try:
        code = chat.main(
            ["--bot", f"{host.url}/api/messages", "--port", str(free_port())],
            stdin=io.StringIO("hello\nagain\n"),
            out=out,
        )
    finally:
        host.stop()

    printed = out.getvalue()
    assert code == 1, printed
    assert "401" in printed
    assert '"MicrosoftAppId": ""' in printed and '"BOT_ALLOW_UNAUTHENTICATED": "true"' in printed
    assert "Type a message" not in printed  # no pointless prompt for lines that would all fail


def test_chat_on_a_port_in_use_says_so_without_a_traceback():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = io.StringIO()

        code = chat.main(["--port", str(port)], stdin=io.StringIO(""), out=out)

    assert code == 1
    assert f"port {port}" in out.getvalue() and "--port" in out.getvalue()


def test_chat_moves_to_a_free_port_when_the_default_one_is_taken(local_bot, monkeypatch):
    host, _ = local_bot
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setattr(chat, "DEFAULT_PORT", busy.getsockname()[1])
        out = io.StringIO()

        code = chat.main(
            ["--bot", f"{host.url}/api/messages"], stdin=io.StringIO("hello\n"), out=out
        )

    printed = out.getvalue()
    assert code == 0, printed + host.log
    # The port it took, which a later chat needs to reach this conversation again.
    [moved] = re.findall(r"is in use \(another chat\?\): using port (\d+);", printed)
    assert f"python -m tools.botsim chat --port {moved}" in printed
    [stored] = [line for line in printed.splitlines() if line.startswith("Conversation botsim/")]
    assert "(the key producer commands take)" in stored
    assert "bot (reply)> Echo: hello" in printed


def test_chat_on_a_port_of_the_users_choosing_says_nothing_of_the_default_one(local_bot):
    host, _ = local_bot
    out = io.StringIO()

    code = chat.main(
        ["--port", "0", "--bot", f"{host.url}/api/messages"], stdin=io.StringIO(""), out=out
    )

    assert code == 0, out.getvalue()
    assert "in use" not in out.getvalue()
    # The port it chose, which a later chat needs to reach this conversation again.
    [chosen] = re.findall(r"^using port (\d+);", out.getvalue(), re.MULTILINE)
    assert f"python -m tools.botsim chat --port {chosen}" in out.getvalue()


def stub_bot(handler) -> BackgroundServer:
    """A started server whose POST /api/messages answers with `handler` (a stand-in for
    the bot where the test is about how the chat takes its answers)."""
    app = web.Application()
    app.router.add_post("/api/messages", handler)
    return BackgroundServer(app).start()


def test_chat_survives_the_bot_going_away_mid_conversation():
    async def accept(request: web.Request) -> web.Response:
        return web.Response(status=200)

    bot = stub_bot(accept)
    out = io.StringIO()

    def typed():
        yield "first\n"
        bot.stop()  # the person stops `make run` while the chat is open
        yield "second\n"

    code = chat.main(
        ["--bot", f"{bot.url}/api/messages", "--port", str(free_port())], stdin=typed(), out=out
    )

    printed = out.getvalue()
    assert code == 0
    assert "is `make run` still running?" in printed
    assert "Traceback" not in printed


def chat_once(handler) -> tuple[int, str]:
    """`make chat` saying hello to a stand-in bot answering with `handler`: its exit code
    and what it printed."""
    bot = stub_bot(handler)
    out = io.StringIO()
    try:
        code = chat.main(
            ["--bot", f"{bot.url}/api/messages", "--port", str(free_port())],
            stdin=io.StringIO("hello\n"),
            out=out,
        )
    finally:
        bot.stop()
    return code, out.getvalue()


def test_a_proxy_set_for_the_machine_does_not_stand_between_the_chat_and_the_bot():
    # A developer's http_proxy (here one nothing answers) is for the outside world: the
    # chat reaches the bot on this machine directly. A process of its own, since urllib
    # reads the environment's proxies once per process.
    said: list[str] = []

    async def accept(request: web.Request) -> web.Response:
        said.append((await request.json()).get("text") or "")
        return web.Response(status=200)

    bot = stub_bot(accept)
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "http_proxy": dead, "HTTP_PROXY": dead, "NO_PROXY": "", "no_proxy": ""}
    try:
        command = ["tools.botsim", "chat", "--bot", f"{bot.url}/api/messages"]
        run = subprocess.run(
            [sys.executable, "-m", *command, "--port", str(free_port())],
            input="hello\n",
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            timeout=60,
        )
    finally:
        bot.stop()
    assert run.returncode == 0, run.stderr
    assert "is `make run` still running?" not in run.stdout
    assert "hello" in said


def test_make_run_asks_no_proxy_for_this_machine():
    from tools.run_local import bypass_proxies_for_loopback

    # What the user listed stays, in both spellings (readers take either one first).
    environ = {"NO_PROXY": ".corp.example, localhost", "http_proxy": "http://proxy:3128"}
    bypass_proxies_for_loopback(environ)
    assert environ["NO_PROXY"] == environ["no_proxy"] == ".corp.example,localhost,127.0.0.1,::1"
    no_proxy = {"no": environ["no_proxy"]}
    assert urllib.request.proxy_bypass_environment("store.corp.example", no_proxy)
    assert urllib.request.proxy_bypass_environment("127.0.0.1", no_proxy)
    again = dict(environ)
    bypass_proxies_for_loopback(again)
    assert again == environ
    # `*` asks no proxy for any host, but only as a whole value: both spellings get it.
    for given in ({"no_proxy": "*"}, {"NO_PROXY": "*", "no_proxy": "corp.example"}):
        everything = {**given, "https_proxy": "http://proxy:3128"}
        bypass_proxies_for_loopback(everything)
        assert everything["no_proxy"] == everything["NO_PROXY"] == "*"
        assert urllib.request.proxy_bypass_environment("127.0.0.1", {"no": "*"})
    # Among other entries, `*` is no such thing: the proxy stays for the rest.
    some = {"no_proxy": "*, corp.example"}
    bypass_proxies_for_loopback(some)
    assert some["no_proxy"] == some["NO_PROXY"] == "*,corp.example,127.0.0.1,localhost,::1"


def test_chat_with_a_bot_answering_500_points_to_the_bots_log():
    # The reason (a setting that does not validate, say) is in the bot's log only.
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    code, printed = chat_once(broken)
    assert code == 0
    assert "answered 500 to the conversation start: its log" in printed
    assert "(the bot answered HTTP 500: its log says why)" in printed


def test_chat_names_the_conversation_of_a_message_sent_to_another_one():
    """An earlier chat's conversation is stored with the same serviceUrl (port 3980), so a
    broadcast reaches this chat's fake Connector once per conversation: the copy for the
    other conversation says whose it is instead of looking like a duplicate."""
    conversations: list[str] = []

    async def accept(request: web.Request) -> web.Response:
        conversations.append((await request.json())["conversation"]["id"])
        return web.Response(status=200)

    bot = stub_bot(accept)
    port = free_port()
    thread, write_end, out = chat_in_background(f"{bot.url}/api/messages", port)
    try:
        wait_until(lambda: "Type a message" in out.getvalue(), "the prompt")
        for conversation in ("botsim-earlier", conversations[0]):  # another chat's, then ours
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v3/conversations/{conversation}/activities",
                data=json.dumps({"type": "message", "text": "Maintenance at 6"}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10):
                pass
        wait_until(lambda: out.getvalue().count("Maintenance at 6") == 2, "both messages")
    finally:
        os.close(write_end)
        thread.join(timeout=30)
        bot.stop()

    lines = [line for line in out.getvalue().splitlines() if "Maintenance at 6" in line]
    assert lines == [
        "bot (send, to conversation botsim-earlier)> Maintenance at 6",
        "bot (send)> Maintenance at 6",
    ]


def post_to_chat(port: int, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v3/conversations/x/activities",
        data=body,
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_web_page_cannot_write_into_the_chat_and_no_text_drives_the_terminal():
    """The chat's Connector listens on loopback, where a page open in the person's browser
    can POST (a text/plain body needs no preflight): refused, nothing shown. What the bot
    sends is shown with the terminal's controls escaped, never obeyed."""

    async def accept(request: web.Request) -> web.Response:
        return web.Response(status=200)

    bot = stub_bot(accept)
    port = free_port()
    thread, write_end, out = chat_in_background(f"{bot.url}/api/messages", port)
    forged = json.dumps({"type": "message", "text": "from a page"}).encode()
    try:
        wait_until(lambda: "Type a message" in out.getvalue(), "the prompt")
        page = {"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://evil.example"}
        assert post_to_chat(port, forged, page) == 403
        linked = {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}
        assert post_to_chat(port, forged, linked) == 403
        assert post_to_chat(port, forged, {"Content-Type": "text/plain"}) == 415
        assert post_to_chat(port, b"", {}) == 415  # a POST is JSON, even an empty one
        text = "\x1b]0;title\x07\x1b[31mred\u202eevil\nsecond line\tend \U0001f468\u200d\U0001f469"
        sent = json.dumps({"type": "message", "text": text}).encode()
        assert post_to_chat(port, sent, {"Content-Type": "application/json"}) == 200
        wait_until(lambda: "second line" in out.getvalue(), "the bot's message")
    finally:
        os.close(write_end)
        thread.join(timeout=30)
        bot.stop()
    printed = out.getvalue()
    assert "from a page" not in printed
    assert "\x1b" not in printed and "\u202e" not in printed
    shown = "bot (send, to conversation x)> \\x1b]0;title\\x07\\x1b[31mred\\u202eevil\n"
    # A joiner is text (a family emoji), not a control: shown as it is.
    assert shown + "second line\tend \U0001f468\u200d\U0001f469" in printed


@pytest.mark.parametrize(
    ("variable", "core_tools", "where"),
    [
        (None, False, "in local.settings.json"),
        ("00000000-0000-0000-0000-00000000a99e", False, "in the environment"),
        # The local host lets a variable set empty win over the file: it runs with no app id.
        ("", False, ""),
        # Core Tools fill an empty variable in from the file.
        ("", True, "in local.settings.json"),
        # Blank but not empty: a value, for either host.
        (" ", True, ""),
    ],
)
def test_where_the_app_id_is_set_is_judged_as_the_host_make_run_starts_reads_it(
    variable, core_tools, where, monkeypatch, tmp_path
):
    # The chat's 401 hint and the Playground's check judged an empty variable differently.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if core_tools:
        # Core Tools cannot be installed here: an executable of that name on PATH stands in
        # for them (only its presence is looked at).
        func = bin_dir / "func"
        func.write_text("#!/bin/sh\nexit 1\n")
        func.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    if variable is None:
        monkeypatch.delenv("MicrosoftAppId", raising=False)
    else:
        monkeypatch.setenv("MicrosoftAppId", variable)
    local = {"MicrosoftAppId": "00000000-0000-0000-0000-00000000a99d"}
    assert app_id_source(local) == where
    (tmp_path / "local.settings.json").write_text(json.dumps({"Values": local}))
    monkeypatch.setattr(chat, "ROOT", tmp_path, raising=False)
    hint = chat.needs_token_hint()
    assert (f"(MicrosoftAppId is set {where})" if where else "(MicrosoftAppId is set)") in hint


@pytest.mark.parametrize("where", ["in the environment", "in local.settings.json"])
def test_the_401_hint_names_where_the_app_id_is_set(where, monkeypatch, tmp_path):
    # It said to set "MicrosoftAppId": "" in local.settings.json when the environment set it.
    app_id = "00000000-0000-0000-0000-00000000a99d"
    settings = {"MicrosoftAppId": "" if where == "in the environment" else app_id}
    (tmp_path / "local.settings.json").write_text(json.dumps({"Values": settings}))
    # The repo's file, as the chat sees it.
    monkeypatch.setattr(chat, "ROOT", tmp_path, raising=False)
    if where == "in the environment":
        monkeypatch.setenv("MicrosoftAppId", app_id)
    else:
        monkeypatch.delenv("MicrosoftAppId", raising=False)

    async def wants_a_token(request: web.Request) -> web.Response:
        return web.Response(status=401)

    code, printed = chat_once(wants_a_token)
    assert code == 1
    assert f"(MicrosoftAppId is set {where})" in printed
    if where == "in the environment":
        assert 'set in local.settings.json "MicrosoftAppId": ""' not in printed
        assert "env -u MicrosoftAppId make run" in printed
    else:
        assert 'set in local.settings.json "MicrosoftAppId": ""' in printed
    assert '"BOT_ALLOW_UNAUTHENTICATED": "true"' in printed
