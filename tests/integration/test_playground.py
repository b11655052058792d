"""The bot in Microsoft 365 Agents Playground, driven through its own page in headless Chromium.

Real parts end to end: the repo's local host (messages and proactive functions) on Azurite,
the Playground 0.2.28 from `.tools/playground` started as `make playground` starts it (no
browser spawned, telemetry off, loopback only), and Debian's chromium driven by Playwright.
The test does what a person would: reads the welcome, types a message and sees the echo,
mocks "Add user" and sees that user welcomed, sees a proactive message arrive on the open
page, and uninstalls the app, after which the stored conversation reference is gone.
On failure a screenshot of the page is saved in the test's output folder.

Without a browser (or the Playground) the test says why and skips; under CI=true that is a
failure, since `make test` installs both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient

from tests.fixtures.devhost import DevHost, wait_for
from tools.azurite import AZURITE_BIN, free_port, listening
from tools.playground import CLI as PLAYGROUND_CLI
from tools.playground import Playground

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not AZURITE_BIN.exists(), reason="Azurite is not installed"),
]

# Flags that let Chromium run headless here: no sandbox (root in a container), and none of
# its background connections (this machine has no outside network and refuses them).
# Playwright adds --headless and a fresh temporary profile (--user-data-dir) itself.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
SHOWN = 30_000  # ms for something the bot sent to appear on the page
STORED = 15.0  # s for a reference write or delete to show in storage


def unavailable(reason: str) -> None:
    """Skip on a developer's machine; fail under CI, where `make test` installs everything."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: `make test` should have installed it)")
    pytest.skip(reason)


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    unavailable("no chromium on PATH: `make test` installs Debian's chromium when run as root")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if not PLAYGROUND_CLI.exists():
        unavailable("the Agents Playground is not installed: `make test` installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_FLAGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def bot(azurite, unique_name, tmp_path) -> Iterator[tuple[DevHost, dict[str, str]]]:
    """The bot as `make run` runs it (example settings: local unauthenticated mode)."""
    env = {
        "AzureWebJobsStorage": azurite.connection_string,
        "MicrosoftAppId": "",
        "BOT_ALLOW_UNAUTHENTICATED": "true",
        "BOT_REFERENCES_CONTAINER": unique_name("refs"),
        "BOT_PROACTIVE_QUEUE": unique_name("proactive"),
    }
    queue = QueueClient.from_connection_string(
        azurite.connection_string, env["BOT_PROACTIVE_QUEUE"]
    )
    queue.create_queue()
    host = DevHost(env, tmp_path, functions=("messages_function", "proactive_function"))
    try:
        yield host.wait_started(), env
    finally:
        host.stop()
        queue.close()


@contextlib.contextmanager
def screenshot_on_failure(page: Any, folder: Path, logs: Callable[[], str]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        shot = folder / "playground-failure.png"
        with contextlib.suppress(Exception):
            page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the page: {shot}\n--- logs ---\n{logs()}")
        raise


def references(connection_string: str, container: str) -> list[dict[str, Any]]:
    """The stored conversation reference documents."""
    documents = []
    with ContainerClient.from_connection_string(connection_string, container) as client:
        if not client.exists():
            return []
        for blob in client.list_blobs(name_starts_with="refs/"):
            with contextlib.suppress(ResourceNotFoundError):  # deleted since it was listed
                documents.append(json.loads(client.download_blob(blob.name).readall()))
    return documents


def producer(env: dict[str, str], *args: str) -> str:
    """`python -m shared.producer ...` as an operator runs it; its stdout ("" on exit 1)."""
    result = subprocess.run(
        [sys.executable, "-m", "shared.producer", *args],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.stdout.strip() if result.returncode == 0 else ""


def mock_activity(page: Any, item: str) -> None:
    """The Playground's "Mock an Activity" menu, then the item's "Send activity" dialog."""
    page.get_by_text("Mock an Activity").click()
    page.get_by_text(item, exact=True).click()
    page.get_by_text("Send activity").click()


def bot_messages(page: Any, text: str) -> Any:
    return page.get_by_text(text)


def test_the_bot_in_the_agents_playground(browser, bot, azurite, tmp_path):
    host, env = bot
    container = env["BOT_REFERENCES_CONTAINER"]
    playground = Playground(
        f"{host.url}/api/messages", port=free_port(), log_file=tmp_path / "playground.log"
    ).start()
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    logs = lambda: "\n".join(playground.lines) + "\n" + host.log  # noqa: E731
    try:
        with screenshot_on_failure(page, tmp_path, logs):
            page.goto(playground.url)

            # Installing the app in a personal chat: Teams sends no name, the bot looks it up.
            welcome = "Welcome, Alex Wilber! Send me a message and I will echo it."
            bot_messages(page, welcome).first.wait_for(timeout=SHOWN)
            [stored] = wait_for(
                lambda: references(azurite.connection_string, container), STORED, "the reference"
            )
            assert stored["channelId"] == "msteams"

            page.get_by_role("textbox").click()
            page.keyboard.type("hello from the browser")
            page.keyboard.press("Enter")
            bot_messages(page, "Echo: hello from the browser").first.wait_for(timeout=SHOWN)

            # The welcome's text shows in more than one place (the message, the chat list's
            # preview): one more of them, not a count that one welcome already reaches.
            shown = bot_messages(page, welcome).count()
            mock_activity(page, "Add user")
            wait_for(
                lambda: bot_messages(page, welcome).count() > shown, SHOWN / 1000, "a 2nd welcome"
            )

            # A proactive message sent with the producer command appears on the open page.
            text = f"proactive hello {uuid.uuid4().hex[:8]}"
            request_id = producer(env, "send", "--conversation", stored["key"], "--text", text)
            bot_messages(page, text).first.wait_for(timeout=SHOWN)
            report = wait_for(
                lambda: json.loads(producer(env, "report", request_id) or "{}").get("delivered"),
                STORED,
                "the delivery report",
            )
            assert report == 1

            mock_activity(page, "Uninstall application")
            wait_for(
                lambda: not references(azurite.connection_string, container),
                STORED,
                "the reference to be removed",
            )
            # The Playground's readiness probe (HEAD /api/messages) was answered quietly.
            assert "HEAD" not in host.log
    finally:
        page.close()
        playground.stop()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (from /proc, IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_make_playground_serves_its_page_on_loopback_with_no_xdg_open(bot, tmp_path, stop):
    """`python -m tools.playground` (what `make playground` runs) on a PATH with nothing but
    node: no xdg-open to spawn, and none needed. Stopped by SIGTERM, or by SIGHUP (its
    terminal closed), it stops the Playground's node too."""
    if not PLAYGROUND_CLI.exists():
        unavailable("the Agents Playground is not installed: `make test` installs it")
    host, _ = bot
    only_node = tmp_path / "bin"
    only_node.mkdir()
    (only_node / "node").symlink_to(shutil.which("node"))
    port = free_port()
    out = tmp_path / "playground.out"
    with open(out, "w") as sink:
        command = [sys.executable, "-m", "tools.playground", "--port", str(port)]
        process = subprocess.Popen(
            [*command, "--bot", f"{host.url}/api/messages", "--channel", "webchat"],
            cwd=ROOT,
            env={"PATH": str(only_node), "HOME": str(tmp_path)},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: f"open http://127.0.0.1:{port} " in out.read_text(), 60, out.name)
        assert "Agents Playground (webchat)" in out.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200
        # Loopback only: 127.0.0.1, never the wildcard address (0.0.0.0 or ::).
        assert listening_addresses(port) == {"0100007F"}
    finally:
        process.send_signal(stop)
        code = process.wait(timeout=30)
    printed = out.read_text()
    assert code == 0, printed
    assert "Stopped the Playground." in printed
    assert "xdg-open" not in printed and "ENOENT" not in printed
    assert not listening(port)


def test_a_playground_that_could_not_have_its_port_starts_again_where_replies_reach_it(
    bot, monkeypatch
):
    # Taken between the check and node's bind (the check is forced to miss it here, the
    # one thing made up): the Playground listened elsewhere while its mock Connector's
    # serviceUrl named the taken port, and every reply of the bot was lost.
    import socket

    import tools.playground

    if not PLAYGROUND_CLI.exists():
        unavailable("the Agents Playground is not installed: `make test` installs it")
    host, _ = bot
    monkeypatch.setattr(tools.playground, "_bindable", lambda port: True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with Playground(f"{host.url}/api/messages", port=port) as playground:
            args = playground.process.args
            service_url = args[args.index("--service-url") + 1]
            assert playground.port != port
            assert service_url == f"http://127.0.0.1:{playground.port}/_connector"


def test_make_playground_against_a_bot_that_is_not_running_says_so(tmp_path):
    bot = f"http://127.0.0.1:{free_port()}/api/messages"
    result = subprocess.run(
        [sys.executable, "-m", "tools.playground", "--bot", bot, "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"no bot answers at {bot}: start it first" in result.stderr
    assert "Traceback" not in result.stderr and "Stopped" not in result.stdout


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        # Every activity was answered 401, which only the page's log panel showed.
        (
            {"MicrosoftAppId": "00000000-0000-0000-0000-0000000000a1"},
            "expect a channel token (MicrosoftAppId is set in the environment)",
        ),
        # No app id, and local mode not switched on: every activity was answered 500.
        (
            {"MicrosoftAppId": "", "BOT_ALLOW_UNAUTHENTICATED": "false"},
            "BOT_ALLOW_UNAUTHENTICATED is not true",
        ),
    ],
)
def test_make_playground_for_a_local_bot_that_would_refuse_it_says_so_and_starts_nothing(
    settings, said
):
    # Checked before it starts the bot: a bot already running on 7071 is used as it is.
    if listening(7071):
        pytest.skip("a bot runs on 7071 (make run): the Playground would use it as it is")
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    result = subprocess.run(
        [sys.executable, "-m", "tools.playground", "--port", str(free_port())],
        cwd=ROOT,
        env={**keep, **settings},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert said in result.stderr and '"BOT_ALLOW_UNAUTHENTICATED": "true"' in result.stderr
    assert "Traceback" not in result.stderr
    assert "starting it" not in result.stdout and "Stopped" not in result.stdout


def fetch_status(url: str, **headers: str) -> int:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def upgrade_status(url: str, origin: str) -> int:
    """The status a WebSocket upgrade sent with `origin` is answered (101: upgraded). In a
    thread of its own: Playwright's sync API keeps an event loop running in this one."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import aiohttp

    async def upgrade() -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            try:
                async with session.ws_connect(url, origin=origin) as socket:
                    await socket.close()
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, upgrade()).result()


def test_the_playground_answers_only_its_own_page_on_this_machine(bot):
    # Bound to loopback, it still answered any page a browser here opened: one whose DNS
    # name was rebound to 127.0.0.1 sent custom activities with a serviceUrl of its choice
    # (the bot then posted to any port of this machine), and any site read the chat over
    # a WebSocket (no same-origin rule covers those).
    if not PLAYGROUND_CLI.exists():
        unavailable("the Agents Playground is not installed: `make test` installs it")
    host, _ = bot
    with Playground(f"{host.url}/api/messages", port=free_port()) as playground:
        own, port = playground.url, playground.port
        assert fetch_status(f"{own}/") == 200
        assert fetch_status(f"{own}/", Origin=own) == 200
        assert fetch_status(f"http://localhost:{port}/") == 200
        assert fetch_status(f"{own}/", Host=f"rebound.example:{port}") == 403
        assert fetch_status(f"{own}/_internal/v1/config", Host=f"rebound.example:{port}") == 403
        assert fetch_status(f"{own}/", Origin="https://elsewhere.example") == 403
        assert fetch_status(f"{own}/", Origin="null") == 403
        # What a browser sends, without an Origin, for another site's <img> or link here.
        assert fetch_status(f"{own}/", **{"Sec-Fetch-Site": "cross-site"}) == 403
        assert fetch_status(f"{own}/", **{"Sec-Fetch-Site": "same-origin"}) == 200
        stream = f"ws://127.0.0.1:{port}/_ws_conversation/v1/conversations/stream"
        assert upgrade_status(stream, "https://elsewhere.example") == 403
        assert upgrade_status(stream, own) == 101


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as raw:
        pairs = [item.split(b"=", 1) for item in raw.read().split(b"\0") if b"=" in item]
    return {name.decode(): value.decode() for name, value in pairs}


def test_the_playground_gets_none_of_the_bots_secrets_and_sends_no_usage_reports(bot, monkeypatch):
    # It got the whole environment: the bot's secrets, and AUTH_* settings with which it
    # fetches tokens and sends them. And --disable-telemetry leaves Application Insights'
    # usage reports on (they ask the cloud's instance metadata endpoint, then Azure).
    if not PLAYGROUND_CLI.exists():
        unavailable("the Agents Playground is not installed: `make test` installs it")
    host, _ = bot
    monkeypatch.setenv("MicrosoftAppPassword", "not-for-the-playground")
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    monkeypatch.setenv("AUTH_CLIENT_SECRET", "not-for-the-playground")
    with Playground(f"{host.url}/api/messages", port=free_port()) as playground:
        node = environ_of(playground.process.pid)
    assert "not-for-the-playground" not in node.values()
    assert not {"MicrosoftAppPassword", "AzureWebJobsStorage", "AUTH_CLIENT_SECRET"} & set(node)
    assert node["APPLICATION_INSIGHTS_NO_STATSBEAT"] == "true"
    assert node["PATH"] == os.environ["PATH"]


def test_the_playground_ends_with_the_process_that_started_it_even_killed(bot, tmp_path):
    # Killed with SIGKILL (no handler runs), `python -m tools.playground` left node
    # serving its port, and the next run moved to another one without saying why.
    if not PLAYGROUND_CLI.exists():
        unavailable("the Agents Playground is not installed: `make test` installs it")
    host, _ = bot
    port = free_port()
    out = tmp_path / "playground.out"
    with open(out, "w") as sink:
        command = [sys.executable, "-m", "tools.playground", "--port", str(port)]
        process = subprocess.Popen(
            [*command, "--bot", f"{host.url}/api/messages"],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: f"open http://127.0.0.1:{port} " in out.read_text(), 60, out.name)
        assert listening(port)
    finally:
        process.kill()
        process.wait(timeout=30)
    wait_for(lambda: not listening(port), 10, "the Playground to end")
