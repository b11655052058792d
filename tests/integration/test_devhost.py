"""tools/devhost runs function apps as the Functions host would: HTTP, queues, timers.

Most tests drive a real `python -m tools.devhost` subprocess over HTTP and real
Azurite queues; queue and timer corner cases run the host's own listeners in-process
on Azurite (so a lease can be 2 s instead of 10 min). They check what a user would
notice: statuses, bodies, what the functions received, what is left on the queues,
and that SIGTERM exits 0 without noise. Where the real host's behaviour is subtle
(404 for a method not listed, %2F in route values, how queue bodies bind, poison-queue
rules, NCrontab day matching) the test says which host rule it follows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import itertools
import json
import logging
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.queue import QueueClient

from tests.fixtures.devhost import DevHost, wait_for
from tests.fixtures.storage import (
    ANSWER_TEXT,
    UNREADABLE_ANSWERS,
    thread_hops,
    unreadable_storage,
)
from tools.azurite import listening as accepts_connections
from tools.devhost.app import (
    Function,
    FunctionSpec,
    HttpTrigger,
    QueueOptions,
    QueueTrigger,
    TimerTrigger,
    make_function,
)
from tools.devhost.http import compile_route
from tools.devhost.invoker import Invoker
from tools.devhost.queue import QueueListener, UndecodableMessage, decode_body, encode_body
from tools.devhost.settings import HostError, parse_timespan, resolve
from tools.devhost.storage import queue_service_client, resolve_connection
from tools.devhost.timer import IntervalSchedule, TimerListener, parse_schedule

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "tests" / "fixtures" / "apps"


@contextlib.contextmanager
def running(root: Path, logs: Path, env: dict[str, str], *extra: str) -> Iterator[DevHost]:
    """A started devhost that is always stopped, and must exit 0 on SIGTERM."""
    host = DevHost(env, logs, root=root, functions=(), extra=extra)
    try:
        yield host.wait_started()
    finally:
        code = host.stop()
    assert code == 0, host.stderr
    assert not accepts_connections(host.port)
    # Like the real worker, the host's process just ends: no teardown noise about clients
    # (aiohttp sessions) that function modules keep for the process lifetime.
    assert "Unclosed" not in host.stderr


JSON = {"Content-Type": "application/json"}


def request(
    host: DevHost,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request; `headers` as a list of pairs may repeat a name."""
    conn = http.client.HTTPConnection("127.0.0.1", host.port, timeout=30)
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    try:
        own_host = any(name.lower() == "host" for name, _ in pairs)
        conn.putrequest(method, path, skip_host=own_host, skip_accept_encoding=True)
        for name, value in pairs:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def wait_for_log(host: DevHost, text: str, timeout: float = 5.0) -> str:
    """The host's log once it contains `text`."""
    return wait_for(lambda: text in host.stderr and host.stderr, timeout, f"log line {text!r}")


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def queue(azurite) -> Iterator[Callable[[str], QueueClient]]:
    """Clients without encoding policies (they send and see the raw queue text), closed after."""
    clients: list[QueueClient] = []

    def make(name: str) -> QueueClient:
        clients.append(QueueClient.from_connection_string(azurite.connection_string, name))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- HTTP -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_host(tmp_path_factory) -> Iterator[DevHost]:
    # local.settings.json is git-ignored, so the app is copied and the file written here.
    root = tmp_path_factory.mktemp("http") / "http_app"
    shutil.copytree(APPS / "http_app", root)
    values = {"FROM_FILE": "file", "OVERRIDDEN": "file"}
    (root / "local.settings.json").write_text(json.dumps({"Values": values}))
    env = {"OVERRIDDEN": "environment", "PYTHON_THREADPOOL_THREAD_COUNT": "2"}
    with running(root, root.parent, env) as host:
        yield host


def test_startup_lists_functions_with_urls(http_host):
    assert f"echo_function: [POST,PUT] {http_host.url}/api/echo/{{item}}" in http_host.stdout
    assert f"sync_function: [GET] {http_host.url}/api/sync" in http_host.stdout


def test_a_gzip_body_reaches_the_function_as_it_was_sent(http_host):
    # The Functions host passes request bodies on as they came; aiohttp's server inflated
    # them, so a bot that answers 400 to gzip on Azure worked here.
    import gzip

    compressed = gzip.compress(b'{"hello": 1}')
    status, _, body = request(
        http_host, "POST", "/api/echo/z", compressed, {"Content-Encoding": "gzip"}
    )
    assert status == 201
    assert bytes.fromhex(json.loads(body)["body_bytes"]) == compressed


def test_post_reaches_async_function_with_real_http_request(http_host):
    status, headers, body = request(
        http_host, "POST", "/api/echo/item-42?q=find", b'{"hello": 1}', {"X-Test": "yes"}
    )
    assert status == 201
    assert headers["X-Echo"] == "1"
    assert headers["Content-Type"].startswith("application/json")
    echoed = json.loads(body)
    assert echoed["method"] == "POST"
    assert echoed["body"] == '{"hello": 1}'
    assert echoed["header"] == "yes"
    assert echoed["item"] == "item-42"
    assert echoed["query"] == "find"
    assert echoed["url"] == f"{http_host.url}/api/echo/item-42?q=find"
    assert echoed["type"].startswith("azure.functions.")
    assert echoed["is_http_request"] is True
    assert echoed["function"] == "echo_function"
    # No queue trigger in this app: the storage SDK is not even imported.
    assert echoed["queue_sdk_loaded"] is False
    wait_for_log(
        http_host, f"Executed 'Functions.echo_function' (Succeeded, Id={echoed['invocation_id']}"
    )


def test_async_invocations_share_one_loop_and_one_module_import(http_host):
    first = json.loads(request(http_host, "PUT", "/api/echo/a", b"")[2])
    second = json.loads(request(http_host, "POST", "/API/Echo/b", b"")[2])
    assert first["loop"] == second["loop"]
    assert first["imports"] == second["imports"] == 1
    assert second["item"] == "b"  # routes match case-insensitively, like the host's


def test_sync_function_runs_in_a_worker_thread_and_environment_wins(http_host):
    status, _, body = request(http_host, "GET", "/api/sync")
    assert status == 200
    payload = json.loads(body)
    assert payload["thread"] != "MainThread"
    assert payload["type"].startswith("azure.functions")
    assert payload["from_file"] == "file"
    assert payload["overridden"] == "environment"


def test_a_method_the_function_does_not_take_is_404_like_the_host(http_host):
    # The Functions host routes on path and method together: a known path with another
    # method (HEAD and OPTIONS included) is 404, not 405.
    assert request(http_host, "GET", "/api/echo/x")[0] == 404
    assert request(http_host, "OPTIONS", "/api/echo/x")[0] == 404
    assert request(http_host, "HEAD", "/api/sync")[0] == 404
    assert request(http_host, "GET", "/api/sync")[0] == 200
    assert request(http_host, "POST", "/api/nothing-here")[0] == 404
    assert request(http_host, "POST", "/echo/x")[0] == 404  # the route prefix is required
    # A client's readiness probe (the Agents Playground sends HEAD /api/messages) is a
    # routing 404 the host answers quietly: nothing about it at the default log level.
    assert "HEAD" not in http_host.stderr, http_host.stderr


def test_functions_are_imported_as_app_modules_like_the_worker(http_host):
    echoed = json.loads(request(http_host, "POST", "/api/echo/x", b"")[2])
    assert echoed["module"] == "__app__.echo_function"  # so logger names match Azure's


def test_a_chunked_body_does_not_reach_the_function_like_the_host(http_host):
    # The host passes a body only with a positive Content-Length.
    conn = http.client.HTTPConnection("127.0.0.1", http_host.port, timeout=30)
    try:
        conn.request("POST", "/api/echo/x", body=iter([b'{"hello":', b" 1}"]))  # chunked
        response = conn.getresponse()
        status, echoed = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 201
    assert echoed["body"] == ""
    assert request(http_host, "POST", "/api/echo/x", b'{"hello": 1}')[2]  # sized: passed


def test_route_params_keep_an_encoded_slash_and_decode_the_rest(http_host):
    status, _, body = request(http_host, "POST", "/api/echo/a%2Fb", b"")
    assert status == 201
    assert json.loads(body)["item"] == "a%2Fb"  # as ASP.NET Core leaves %2F in a route value
    assert json.loads(request(http_host, "POST", "/api/echo/caf%C3%A9", b"")[2])["item"] == "café"


def test_query_and_headers_reach_the_function_as_the_host_passes_them(http_host):
    status, _, body = request(
        http_host,
        "POST",
        "/api/echo/x?q=1&q=2&empty=&flag",
        b"",
        [("X-Multi", "a"), ("x-multi", "b")],
    )
    assert status == 201
    echoed = json.loads(body)
    assert echoed["params"] == {"q": "1,2"}  # repeated keys joined; empty values left out
    assert echoed["multi"] == "a,b"


def test_a_host_header_no_url_can_carry_is_a_400_without_a_traceback(http_host):
    # The host's web server refuses it; the local host answered 500 and logged two
    # tracebacks of its own.
    port = int(http_host.url.rsplit(":", 1)[1])
    # The host is shared by the module's tests: only what these requests made it log.
    out, err = len(http_host.stdout), len(http_host.stderr)
    for path in (b"/api/out", b"/nope", b"/admin/host/status"):  # whatever the path
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(
                b"GET " + path + b" HTTP/1.1\r\nHost: x:notaport\r\nConnection: close\r\n\r\n"
            )
            answer = b""
            while chunk := connection.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400"), path
    assert request(http_host, "GET", "/api/out")[0] == 200  # and it serves on
    assert "Traceback" not in http_host.stdout[out:] + http_host.stderr[err:]


def test_http_outputs_none_and_values_as_the_worker_handles_them(http_host):
    # `$return` with nothing returned: the worker cannot encode None, the invocation fails.
    status, _, body = request(http_host, "GET", "/api/none")
    assert (status, body) == (500, b"")
    wait_for_log(http_host, "Executed 'Functions.none_function' (Failed")
    # A named `http` output left unset: the host answers 200 with an empty body.
    status, _, body = request(http_host, "GET", "/api/out")
    assert (status, body) == (200, b"")
    assert request(http_host, "GET", "/api/out?set=1")[:3:2] == (202, b"set")
    # A value returned without a `$return` binding fails the invocation, as in the worker.
    assert request(http_host, "GET", "/api/out?set=1&return=1")[0] == 500
    wait_for_log(http_host, "without a $return binding returned a non-None value")


def test_sync_functions_share_a_pool_of_python_threadpool_thread_count_threads(http_host):
    results: list[bytes] = []

    def call() -> None:
        results.append(request(http_host, "GET", "/api/blocking?seconds=0.3")[2])

    callers = [threading.Thread(target=call) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=15)
    assert len(results) == 4
    assert len(set(results)) == 2  # PYTHON_THREADPOOL_THREAD_COUNT=2, as the worker honours


def test_raising_function_is_500_without_exception_text(http_host):
    status, _, body = request(http_host, "POST", "/api/boom", b"{}")
    assert status == 500
    assert body == b""
    log = wait_for_log(http_host, "Executed 'Functions.boom_function' (Failed")
    assert "RuntimeError" in log  # the developer sees what failed, in the log only


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_waits_for_invocations_in_flight(tmp_path, signum):
    # SIGHUP (the terminal closed) killed the host mid-invocation: the turn was cut off.
    # Started as from a terminal: a run under nohup (CI's, say) keeps SIGHUP ignored.
    with signal_disposition(signal.SIGHUP, signal.SIG_DFL):
        host = DevHost({}, tmp_path, root=APPS / "http_app", functions=())
    host.wait_started()
    result: dict[str, Any] = {}

    def call() -> None:
        result["response"] = request(host, "GET", "/api/slow?seconds=1.5")

    caller = threading.Thread(target=call)
    caller.start()
    try:
        wait_for(lambda: accepts_connections(host.port), 5, "listening")
        wait_for_log(host, "slow invocation started", timeout=10)  # running now
        host.process.send_signal(signum)
        assert host.wait_exit(timeout=15) == 0
    finally:
        caller.join(timeout=15)
        if host.process.poll() is None:
            host.stop()
    status, _, body = result["response"]
    assert (status, body) == (200, b"done")
    assert "Executed 'Functions.slow_function' (Succeeded" in host.stderr


@contextlib.contextmanager
def signal_disposition(signum: int, handler: Any) -> Iterator[None]:
    """`handler` for `signum` in this process meanwhile: a host started then inherits an
    ignored or default disposition (a handler of Python's is reset by the exec)."""
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def test_a_host_run_under_nohup_keeps_running_on_sighup(tmp_path):
    # Its SIGHUP handler replaced the ignored disposition nohup asked for.
    with signal_disposition(signal.SIGHUP, signal.SIG_IGN):  # inherited, as under nohup
        host = DevHost({}, tmp_path, root=APPS / "http_app", functions=())
    host.wait_started()
    try:
        host.process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert host.process.poll() is None
    finally:
        host.stop()


# --- the real app -----------------------------------------------------------------


def real_app_env(azurite, **settings: str) -> dict[str, str]:
    """The bot's settings for the local host, unauthenticated, on its own container."""
    return {
        "AzureWebJobsStorage": azurite.connection_string,
        "MicrosoftAppId": "",
        "BOT_ALLOW_UNAUTHENTICATED": "true",
        "BOT_REFERENCES_CONTAINER": f"devhost-real-{uuid.uuid4().hex[:8]}",
        **settings,
    }


def test_real_app_serves_messages_function(tmp_path, azurite):
    env = real_app_env(
        azurite,
        BOT_PROACTIVE_QUEUE=f"devhost-real-{uuid.uuid4().hex[:8]}",
        BOT_SCHEDULE="0 0 9 * * *",
    )
    ready = [
        name
        for name in ("messages_function", "proactive_function", "schedule_function")
        if (REPO / name / "__init__.py").is_file()
    ]
    with running(REPO, tmp_path, env, "--functions", *ready) as host:
        assert f"messages_function: [POST] {host.url}/api/messages" in host.stdout
        assert all(f"  {name}: " in host.stdout for name in ready)
        # An empty activity: rejected by the bot itself (its own 400 and reason, not the
        # host's 500), so no reply is attempted anywhere; the invocation itself succeeded.
        status, headers, body = request(
            host, "POST", "/api/messages", b"{}", {"Content-Type": "application/json"}
        )
        assert (status, body) == (400, b"missing type"), host.stderr
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        assert request(host, "GET", "/api/messages")[0] == 404
        wait_for_log(host, "Executed 'Functions.messages_function' (Succeeded")


def test_the_real_app_starts_with_the_app_s_defaults_for_its_binding_settings(tmp_path, azurite):
    # Neither BOT_PROACTIVE_QUEUE nor BOT_SCHEDULE set: the documented defaults apply
    # (the Functions host on Azure would not index the two functions; infra/ sets both).
    # Empty: the app reads it as unset (and the environment wins over a local.settings.json
    # that `make run` left in the repo).
    env = real_app_env(azurite, BOT_PROACTIVE_QUEUE="", BOT_SCHEDULE="")
    functions = ("messages_function", "proactive_function", "schedule_function")
    with running(REPO, tmp_path, env, "--functions", *functions) as host:
        assert all(f"  {name}: " in host.stdout for name in functions), host.stderr
        assert "proactive_function: queueTrigger (queue proactive-messages)" in host.stdout
        assert "schedule_function: timerTrigger (schedule 0 * * * * *" in host.stdout
        assert "BOT_SCHEDULE is not set: the app's default '0 * * * * *'" in host.stderr


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_an_activity_logs_one_line_by_default_and_its_detail_at_debug(
    tmp_path, azurite, fake_connector, debug
):
    env = {
        "AzureWebJobsStorage": azurite.connection_string,
        "MicrosoftAppId": "",
        "BOT_ALLOW_UNAUTHENTICATED": "true",
        "BOT_REFERENCES_CONTAINER": f"devhost-logs-{uuid.uuid4().hex[:8]}",
    }
    if debug:
        env["PYTHON_ENABLE_DEBUG_LOGGING"] = "1"  # the worker's setting, honoured locally too
    activity = {
        "type": "message",
        "id": "activity-1",
        "channelId": "msteams",
        "serviceUrl": fake_connector.url,
        "from": {"id": "29:user", "name": "Ada"},
        "recipient": {"id": "28:bot", "name": "Bot"},
        "conversation": {"id": "a:logs", "conversationType": "personal"},
        "text": "hello",
    }
    with running(REPO, tmp_path, env, "--functions", "messages_function") as host:
        before = len(host.stderr)
        headers = {"Content-Type": "application/json"}
        assert (
            request(host, "POST", "/api/messages", json.dumps(activity).encode(), headers)[0] == 200
        )
        wait_for_log(host, "Executed 'Functions.messages_function' (Succeeded")
        time.sleep(0.5)  # anything logged late would show now
        lines = host.stderr[before:].splitlines()
    assert fake_connector.activities[0]["text"] == "Echo: hello"  # the reference was written too
    if debug:
        detail = "\n".join(lines)
        assert "messages: activity='activity-1' conversation='msteams/a:logs'" in detail
        assert "references: created 'msteams/a:logs'" in detail, detail
    else:
        assert len(lines) == 1, lines
        assert "Executed 'Functions.messages_function' (Succeeded" in lines[0]
    # The app holds the Azure SDK at WARNING (no request/response header dumps), even at DEBUG.
    assert not any("azure.core" in line or "Request URL" in line for line in lines)


def test_a_platform_variable_of_the_machine_does_not_make_the_local_bot_refuse_local_mode(
    tmp_path, azurite, fake_connector
):
    # A container that sets CONTAINER_NAME for itself (as Azure's Linux instances do): the
    # bot takes it for Azure and refuses unauthenticated mode, but this host is never Azure.
    env = real_app_env(azurite, CONTAINER_NAME="dev-container", WEBSITE_SKU="Dynamic")
    activity = {
        "type": "message",
        "id": "activity-1",
        "channelId": "webchat",
        "serviceUrl": fake_connector.url,
        "from": {"id": "user-1"},
        "recipient": {"id": "bot"},
        "conversation": {"id": "markers"},
        "text": "hello",
    }
    with running(REPO, tmp_path, env, "--functions", "messages_function") as host:
        body = json.dumps(activity).encode()
        assert request(host, "POST", "/api/messages", body, JSON)[0] == 200, host.stderr
        for name in ("CONTAINER_NAME", "WEBSITE_SKU"):
            assert f"{name} is set: left out of the app's settings" in host.stderr
    assert [a["text"] for a in fake_connector.activities] == ["Echo: hello"]


# --- queues and timers -------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory, azurite) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("worker")
    suffix = uuid.uuid4().hex[:10]
    names = {
        "queue": f"devhost-ok-{suffix}",
        "fail": f"devhost-fail-{suffix}",
        "slow": f"devhost-slow-{suffix}",
    }
    files = {f"{name}_file": logs / f"{name}.jsonl" for name in ("record", "fail", "tick", "slow")}
    env = {
        "AzureWebJobsStorage": azurite.connection_string,
        "TEST_QUEUE": names["queue"],
        "TEST_FAIL_QUEUE": names["fail"],
        "TEST_SLOW_QUEUE": names["slow"],
        "TEST_SCHEDULE": "*/2 * * * * *",
        "AzureWebJobs.late_function.Disabled": "true",  # it has a test of its own
        "RECORD_FILE": str(files["record_file"]),
        "FAIL_FILE": str(files["fail_file"]),
        "TICK_FILE": str(files["tick_file"]),
        "SLOW_FILE": str(files["slow_file"]),
    }
    started = time.monotonic()
    with running(APPS / "worker_app", logs, env) as host:
        yield {"host": host, "started": started, **names, **files}


def test_base64_message_reaches_function_and_is_deleted(worker, queue):
    client = queue(worker["queue"])
    wait_for(lambda: _exists(client), 10, "the trigger queue to be created by the host")
    body = json.dumps({"id": "m-1", "text": "héllo"})
    sent = client.send_message(b64(body))
    got = wait_for(lambda: records(worker["record_file"]), 10, "the queue function")
    assert len(got) == 1
    entry = got[0]
    assert entry["id"] == sent.id
    assert entry["body"] == body
    assert entry["dequeue_count"] == 1
    assert entry["type"] == "azure.functions.queue.QueueMessage"
    assert entry["insertion_time"] and entry["expiration_time"] and entry["pop_receipt"]
    wait_for(lambda: _empty(client), 5, "the message to be deleted")
    assert "late_function" not in worker["host"].stdout  # AzureWebJobs.<name>.Disabled


def test_failing_message_is_retried_then_moved_to_poison(worker, queue):
    client = queue(worker["fail"])
    wait_for(lambda: _exists(client), 10, "the trigger queue")
    body = json.dumps({"id": "m-2", "text": "always fails"})
    client.send_message(b64(body))
    poison = queue(f"{worker['fail']}-poison")
    poisoned = wait_for(lambda: _peek(poison), 15, "the poison queue")
    assert [m.content for m in poisoned] == [b64(body)]  # the original text, same encoding
    attempts = records(worker["fail_file"])
    assert [a["dequeue_count"] for a in attempts] == [1, 2, 3]
    assert {a["body"] for a in attempts} == {body}
    assert all(a["thread"] != "MainThread" for a in attempts)  # a sync main
    wait_for(lambda: _empty(client), 5, "the message to leave the trigger queue")
    assert "has reached MaxDequeueCount of 3" in worker["host"].stderr
    assert worker["host"].stderr.count("Executed 'Functions.failing_function' (Failed") == 3


def test_message_that_is_not_base64_goes_to_poison_at_once(worker, queue):
    client = queue(worker["queue"])
    wait_for(lambda: _exists(client), 10, "the trigger queue")
    seen_before = len(records(worker["record_file"]))
    client.send_message("this is not base64!")
    poison = queue(f"{worker['queue']}-poison")
    poisoned = wait_for(lambda: _peek(poison), 10, "the poison queue")
    assert [m.content for m in poisoned] == ["this is not base64!"]
    assert len(records(worker["record_file"])) == seen_before


def test_a_batch_is_processed_concurrently(worker, queue):
    client = queue(worker["slow"])
    wait_for(lambda: _exists(client), 10, "the trigger queue")
    for n in range(4):
        client.send_message(b64(f"slow {n}"))
    done = wait_for(
        lambda: len(records(worker["slow_file"])) == 4 and records(worker["slow_file"]),
        10,
        "four slow messages",
    )
    # Processed in parallel (batchSize 4): two of them ran at once. (Not necessarily with
    # the first: on a busy machine the host may take it alone, the sends still under way.)
    pairs = itertools.combinations(done, 2)
    assert any(a["started"] < b["ended"] and b["started"] < a["ended"] for a, b in pairs), done


def test_timer_fires_on_its_ncrontab_schedule(worker):
    ticks = wait_for(
        lambda: len(records(worker["tick_file"])) >= 2 and records(worker["tick_file"]),
        max(1.0, 8.0 - (time.monotonic() - worker["started"])),
        "two timer ticks",
    )
    assert all(t["type"] == "azure.functions.timer.TimerRequest" for t in ticks)
    assert not any(t["past_due"] for t in ticks)
    seconds = [_second_of(t["at"]) for t in ticks]
    assert all(s % 2 == 0 for s in seconds)  # fired on even seconds, as */2 says
    assert ticks[0]["next"] and ticks[0]["next"] > ticks[0]["at"][:19]


def _second_of(iso: str) -> int:
    return int(iso[17:19])


def test_an_app_of_its_own_imports_its_own_shared_package(tmp_path):
    # The local host applied the bot's binding defaults by importing the bot's `shared`,
    # which then stood in for any other app's `shared`: ModuleNotFoundError, every call 500.
    with running(APPS / "shared_app", tmp_path, {}) as host:
        status, _, body = request(host, "GET", "/api/hello_function")
    assert (status, body) == (200, b"hello from the app's own shared (GET)")
    assert "BOT_PROACTIVE_QUEUE is not set" not in host.stderr  # the bot's, not this app's


def test_message_encoding_none(tmp_path, azurite, queue):
    name = f"devhost-plain-{uuid.uuid4().hex[:10]}"
    record_file = tmp_path / "plain.jsonl"
    env = {
        "AzureWebJobsStorage": azurite.connection_string,
        "TEST_QUEUE": name,
        "RECORD_FILE": str(record_file),
    }
    with running(APPS / "plain_app", tmp_path, env) as host:
        assert f"ping_function: [ANY] {host.url}/custom/ping_function" in host.stdout
        status, _, body = request(host, "DELETE", "/custom/ping_function")
        assert (status, body) == (200, b"pong DELETE")
        client = queue(name)
        wait_for(lambda: _exists(client), 10, "the trigger queue")
        client.send_message('{"plain": "text ✓"}')
        got = wait_for(lambda: records(record_file), 10, "the queue function")
        assert got == [{"body": '{"plain": "text ✓"}', "type": "str"}]
        # The admin endpoint runs a non-HTTP function by hand, as the real host's does: a
        # JSON object only (a web page can send text/plain or a form without asking).
        admin = "/admin/functions/plain_function"
        by_hand = json.dumps({"input": "by hand"}).encode()
        refused = [
            request(host, "POST", admin, by_hand, {"Content-Type": "text/plain"})[0],
            request(host, "POST", admin, by_hand)[0],  # no media type
            request(host, "POST", admin, b"", JSON)[0],
            request(host, "POST", admin, b"[1]", JSON)[0],
            request(host, "POST", admin, b"{", JSON)[0],
        ]
        assert refused == [415, 415, 400, 400, 400]
        # A page whose DNS name was rebound to 127.0.0.1: same-origin to itself, JSON and
        # all, but it names itself in Host and Origin.
        rebound = "rebind.attacker.example"
        for headers in (
            {**JSON, "Host": f"{rebound}:{host.port}"},
            {**JSON, "Origin": f"http://{rebound}:{host.port}"},
            {**JSON, "Origin": "null"},
        ):
            assert request(host, "POST", admin, by_hand, headers)[0] == 403, headers
        local = {
            **JSON,
            "Host": f"localhost:{host.port}",
            "Origin": f"http://localhost:{host.port}",
        }
        assert request(host, "GET", "/admin/host/status", None, local)[0] == 200
        assert len(records(record_file)) == 1  # none of them ran it
        status, _, _ = request(host, "POST", admin.replace("plain", "PLAIN"), by_hand, JSON)
        assert status == 202
        assert records(record_file)[-1] == {"body": "by hand", "type": "str"}


def test_a_message_failing_while_the_host_stops_is_released_not_lost(tmp_path, azurite, queue):
    name = f"devhost-late-{uuid.uuid4().hex[:10]}"
    late_file = tmp_path / "late.jsonl"
    env = {
        "AzureWebJobsStorage": azurite.connection_string,
        "TEST_LATE_QUEUE": name,
        "LATE_FILE": str(late_file),
    }
    host = DevHost(env, tmp_path, root=APPS / "worker_app", functions=("late_function",))
    host.wait_started()
    try:
        client = queue(name)
        wait_for(lambda: _exists(client), 10, "the trigger queue")
        client.send_message(b64("late"))
        wait_for(lambda: records(late_file), 10, "the function to start")
        host.process.send_signal(signal.SIGTERM)  # the function fails during the drain
        failed = _moment(
            lambda: "Executed 'Functions.late_function' (Failed" in host.stderr, "the failure"
        )
        back = _moment(lambda: client.peek_messages(max_messages=5), "the message back")
        assert host.wait_exit(timeout=15) == 0
    finally:
        host.stop()
    # Released with worker_app's visibilityTimeout (1 s): not visible again at once, nor
    # hidden for the 10 min of a lost lease.
    assert back - failed >= 0.5, host.stderr
    visible = client.peek_messages(max_messages=5)
    assert [(m.content, m.dequeue_count) for m in visible] == [(b64("late"), 1)]


def _moment(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> float:
    """When `predicate` first held (time.monotonic(), polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def _exists(client: QueueClient) -> bool:
    try:
        client.get_queue_properties()
    except Exception:
        return False
    return True


def _peek(client: QueueClient) -> list[Any]:
    try:
        return client.peek_messages(max_messages=32)
    except Exception:
        return []


def _empty(client: QueueClient) -> bool:
    # Peek shows visible messages only; a failed message re-appears within 1 s here.
    return not client.peek_messages(max_messages=32)


# --- startup errors ----------------------------------------------------------------


def _app(root: Path, function_json: dict[str, Any], code: str = "def main(x):\n    pass\n") -> Path:
    root.mkdir(exist_ok=True)
    (root / "host.json").write_text('{"version": "2.0"}')
    folder = root / "only_function"
    folder.mkdir()
    (folder / "function.json").write_text(json.dumps(function_json))
    (folder / "__init__.py").write_text(code)
    return root


def _binding(kind: str, **extra: str) -> dict[str, Any]:
    return {"bindings": [{"type": kind, "direction": "in", "name": "x", **extra}]}


@pytest.mark.parametrize(
    ("function_json", "code", "expected"),
    [
        (
            _binding("blobTrigger", path="c/{n}"),
            "def main(x):\n    pass\n",
            "only_function/function.json: trigger type 'blobTrigger' is not supported",
        ),
        (
            _binding("timerTrigger", schedule="%NOPE%"),
            "def main(x):\n    pass\n",
            "only_function/function.json schedule: app setting 'NOPE'",
        ),
        (
            _binding("timerTrigger", schedule="0 * * *"),
            "def main(x):\n    pass\n",
            "is not an NCRONTAB expression",
        ),
        (
            _binding("queueTrigger", queueName="Bad_Name"),
            "def main(x):\n    pass\n",
            "'Bad_Name' is not a valid queue name",
        ),
        (
            _binding("queueTrigger", queueName="work-items"),
            "def main(x):\n    pass\n",
            "storage connection 'AzureWebJobsStorage' is not configured",
        ),
    ],
    ids=["unknown-trigger", "unresolved-setting", "4-field-cron", "queue-name", "no-storage"],
)
def test_startup_errors_are_clear(tmp_path, function_json, code, expected):
    app = _app(tmp_path, function_json, code)
    host = DevHost({}, tmp_path, root=app, functions=())
    assert host.wait_exit(timeout=20) == 1
    assert host.stderr.count(expected) == 1  # said once (it was logged and printed)
    assert "Traceback" not in host.stderr


@pytest.mark.parametrize("value", ["AccountKey=c2VjcmV0", "AccountKey=c2Vj:cmV0"])
def test_a_schedule_from_an_app_setting_names_the_setting_not_its_value(tmp_path, value):
    binding = _binding("timerTrigger", schedule="%WORK_SCHEDULE%")
    app = _app(tmp_path, binding, "def main(x):\n    pass\n")
    host = DevHost({"WORK_SCHEDULE": value}, tmp_path, root=app, functions=())
    assert host.wait_exit(timeout=20) == 1
    assert "schedule: %WORK_SCHEDULE% is not" in host.stderr  # an NCRONTAB / a TimeSpan
    assert "AccountKey" not in host.stderr


def test_a_queue_name_from_an_app_setting_names_the_setting(tmp_path):
    binding = _binding("queueTrigger", queueName="%WORK_QUEUE%")
    app = _app(tmp_path, binding, "def main(x):\n    pass\n")
    # Named, its value not shown: it may be any setting's (a connection string, say).
    host = DevHost({"WORK_QUEUE": "AccountKey=Bad_Name"}, tmp_path, root=app, functions=())
    assert host.wait_exit(timeout=20) == 1
    assert "queueName: %WORK_QUEUE% is not a valid queue name" in host.stderr
    assert "AccountKey" not in host.stderr


HTTP_BINDINGS = {
    "bindings": [
        {"type": "httpTrigger", "direction": "in", "name": "x"},
        {"type": "http", "direction": "out", "name": "$return"},
    ]
}


@pytest.mark.parametrize(
    ("function_json", "code", "reason"),
    [
        (HTTP_BINDINGS, "raise RuntimeError('broken at import')\n", "failed (RuntimeError)"),
        (HTTP_BINDINGS, "raise SystemExit(3)\n", "failed (SystemExit)"),
        (HTTP_BINDINGS, "import module_that_is_not_installed\n", "(ModuleNotFoundError)"),
        (HTTP_BINDINGS, "def main(x, y):\n    pass\n", "parameters not declared in function"),
        (HTTP_BINDINGS, "def start(x):\n    pass\n", "has no function main"),
        (
            _binding("timerTrigger", schedule="0 0 0 1 1 *"),
            "def main(x: dict):\n    pass\n",
            'type of x binding in function.json "timerTrigger" does not match its Python '
            'annotation "dict"',
        ),
        (
            HTTP_BINDINGS,
            "def main(x) -> dict:\n    return {}\n",
            'Python return annotation "dict" does not match binding type "http"',
        ),
    ],
    ids=["raises", "exits", "missing-module", "params", "no-main", "trigger-type", "return"],
)
def test_a_function_that_cannot_load_fails_alone_like_the_worker(
    tmp_path, function_json, code, reason
):
    # The real host serves the other functions; each invocation of this one fails.
    app = _app(tmp_path / "app", function_json, code)
    good = app / "good_function"
    good.mkdir()
    (good / "function.json").write_text(json.dumps(HTTP_BINDINGS))
    (good / "__init__.py").write_text("def main(x):\n    return 'fine'\n")

    with running(app, tmp_path, {}) as host:
        assert request(host, "POST", "/api/good_function")[0] == 200
        if "timerTrigger" in json.dumps(function_json):
            admin = "/admin/functions/only_function"
            assert request(host, "POST", admin, b"{}", JSON)[0] == 500
        else:
            assert request(host, "POST", "/api/only_function", b"{}")[0] == 500
        log = wait_for_log(host, "Function 'only_function' is not loaded")
    assert "Function 'only_function' failed to load" in log and reason in log
    assert "Executed 'Functions.only_function' (Failed" in log


def test_an_app_folder_named_like_an_installed_package_does_not_shadow_it(tmp_path):
    # The worker appends the app root to sys.path: the installed PyJWT wins over ./jwt.
    app = _app(
        tmp_path / "app",
        HTTP_BINDINGS,
        "import jwt\n\ndef main(x):\n    return getattr(jwt, 'SHADOW', 'installed')\n",
    )
    (app / "jwt").mkdir()
    (app / "jwt" / "__init__.py").write_text("SHADOW = 'app folder'\n")
    with running(app, tmp_path, {}) as host:
        assert request(host, "POST", "/api/only_function")[2] == b"installed"


# --- in-process listeners: the real QueueListener / TimerListener on Azurite ----------------


async def eventually(check: Callable[[], Awaitable[Any]], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


async def test_a_connection_string_with_empty_segments_reaches_the_queue(azurite):
    # As the Functions host and the app (shared.config) read it: empty `;` segments are
    # skipped (the host had refused what the app and Azure accept).
    spaced = " " + azurite.connection_string.replace(";", ";;") + ";\n"
    settings = {"AzureWebJobsStorage": spaced}
    service = queue_service_client(
        resolve_connection("AzureWebJobsStorage", settings, where="test"), where="test"
    )
    async with service:
        queue = service.get_queue_client(f"segments-{uuid.uuid4().hex[:8]}")
        await queue.create_queue()
        await queue.send_message("hello")
        assert [m.content async for m in queue.receive_messages()] == ["hello"]
        await queue.delete_queue()
    # Whitespace around the value is no part of it either (the app strips it too).
    development = {"AzureWebJobsStorage": " UseDevelopmentStorage=true\n"}
    resolved = resolve_connection("AzureWebJobsStorage", development, where="test")
    assert "QueueEndpoint=http://127.0.0.1:10001/" in (resolved.connection_string or "")


@pytest.fixture
async def storage(azurite) -> AsyncIterator[Any]:
    """The host's own async queue service client for Azurite."""
    settings = {"AzureWebJobsStorage": azurite.connection_string}
    service = queue_service_client(
        resolve_connection("AzureWebJobsStorage", settings, where="test"), where="test"
    )
    async with service:
        yield service


@contextlib.asynccontextmanager
async def listening(
    service: Any, main: Callable[..., Any], queue_name: str, *, data_type: str = "", **options: Any
) -> AsyncIterator[QueueListener]:
    """A queue listener for `main` running on this loop until the block ends."""
    trigger = QueueTrigger("msg", queue_name, "AzureWebJobsStorage", data_type=data_type)
    function = make_function(FunctionSpec("queue_function", APPS, trigger), main)
    visibility = options.pop("receive_visibility", 600)
    function_timeout = options.pop("function_timeout", None)
    defaults = {"max_polling_interval": 0.2, "visibility_timeout": 0.0, "max_dequeue_count": 1}
    executor = ThreadPoolExecutor(max_workers=2)
    invoker = Invoker(executor, function_timeout=function_timeout)
    listener = QueueListener(
        function,
        service,
        QueueOptions(**{**defaults, **options}),
        invoker,
        receive_visibility=visibility,
    )
    from azure.core.exceptions import ResourceExistsError

    with contextlib.suppress(ResourceExistsError):
        await service.get_queue_client(queue_name).create_queue()
    task = asyncio.create_task(listener.run())
    try:
        yield listener
    finally:
        listener.stop()
        await asyncio.wait_for(task, 10)
        assert await invoker.drain(10)
        executor.shutdown()


async def _texts(client: Any) -> list[str]:
    try:
        return [m.content for m in await client.peek_messages(max_messages=32)]
    except Exception:
        return []


async def _drained(client: Any) -> bool:
    """No message left at all, hidden ones included."""
    return (await client.get_queue_properties()).approximate_message_count == 0


async def _gone(client: Any) -> bool:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        await client.get_queue_properties()
    except ResourceNotFoundError:
        return True
    return False


async def test_a_queue_function_returning_a_value_fails_like_the_worker(storage, caplog):
    name = f"devhost-ret-{uuid.uuid4().hex[:10]}"
    calls: list[str] = []

    async def main(msg: func.QueueMessage) -> None:
        calls.append(msg.id)
        return "done"  # type: ignore[return-value]

    async with listening(storage, main, name):
        await storage.get_queue_client(name).send_message(b64("hello"))
        poison = storage.get_queue_client(f"{name}-poison")
        assert await eventually(lambda: _texts(poison), 10, "the poison queue") == [b64("hello")]
    assert len(calls) == 1
    assert "without a $return binding returned a non-None value" in caplog.text


@pytest.mark.parametrize(
    ("annotation", "data_type", "body", "expected"),
    [
        ("str", "", "héllo".encode(), ("str", "héllo")),
        ("bytes", "", "héllo".encode(), ("str", "héllo")),  # the host sends a string
        ("bytes", "binary", b"\xff\x00\xfe", ("bytes", "ff00fe")),
        ("func.QueueMessage", "binary", b"\xff\x00\xfe", ("QueueMessage", "ff00fe")),
        ("func.QueueMessage", "", b"\xff\x00\xfe", None),  # not UTF-8: binding fails
    ],
)
async def test_queue_bodies_bind_as_the_host_sends_them(
    storage, caplog, annotation, data_type, body, expected
):
    name = f"devhost-bind-{uuid.uuid4().hex[:10]}"
    received: list[tuple[str, str]] = []

    def record(msg: Any) -> None:
        value = msg.get_body() if isinstance(msg, func.QueueMessage) else msg
        shown = value.hex() if isinstance(value, bytes) else value
        received.append((type(msg).__name__, shown))

    namespace: dict[str, Any] = {"func": func, "record": record}
    exec(f"async def main(msg: {annotation}) -> None:\n    record(msg)\n", namespace)
    text = base64.b64encode(body).decode()
    async with listening(storage, namespace["main"], name, data_type=data_type):
        await storage.get_queue_client(name).send_message(text)
        if expected is None:
            poison = storage.get_queue_client(f"{name}-poison")
            assert await eventually(lambda: _texts(poison), 10, "the poison queue") == [text]
            assert "Exception binding parameter 'msg'" in caplog.text
        else:
            await eventually(lambda: asyncio.sleep(0, received), 10, "the function")
    assert received == ([] if expected is None else [expected])


async def test_a_message_dequeued_too_often_goes_to_poison_without_running(storage):
    name = f"devhost-over-{uuid.uuid4().hex[:10]}"
    client = storage.get_queue_client(name)
    await client.create_queue()
    await client.send_message(b64("tired"))
    for _ in range(2):  # two deliveries the host never finished (e.g. it was killed)
        message = await client.receive_message(visibility_timeout=30)
        await client.update_message(message, visibility_timeout=0)
    calls: list[int] = []

    async def main(msg: func.QueueMessage) -> None:
        calls.append(msg.dequeue_count)

    async with listening(storage, main, name, max_dequeue_count=2):
        poison = storage.get_queue_client(f"{name}-poison")
        assert await eventually(lambda: _texts(poison), 10, "the poison queue") == [b64("tired")]
    assert calls == []


async def test_a_long_invocation_keeps_its_message_invisible(storage):
    name = f"devhost-long-{uuid.uuid4().hex[:10]}"
    calls: list[int] = []

    async def main(msg: func.QueueMessage) -> None:
        calls.append(msg.dequeue_count)
        await asyncio.sleep(3.5)

    # Received hidden for 2 s (the host: 10 min), renewed while the function runs. Up to 5
    # dequeues: a delivery while it ran would call it again, not go to the poison queue.
    async with listening(storage, main, name, receive_visibility=2, max_dequeue_count=5):
        client = storage.get_queue_client(name)
        await client.send_message(b64("slow"))
        await eventually(lambda: asyncio.sleep(0, calls), 10, "the function")
        # Deleted with the renewed pop receipt once the function has returned (a delivery
        # while it ran would have called it again first, and been deleted after).
        await eventually(lambda: _drained(client), 10, "the message deleted")
    assert calls == [1]  # never delivered twice at once


async def test_a_failed_renewal_is_tried_again_before_the_lease_runs_out(storage, caplog):
    name = f"devhost-renew-{uuid.uuid4().hex[:10]}"
    calls: list[int] = []

    async def main(msg: func.QueueMessage) -> None:
        calls.append(msg.dequeue_count)
        await asyncio.sleep(7)

    async with listening(
        storage, main, name, receive_visibility=4, max_dequeue_count=5
    ) as listener:
        # Fault injection (storage cannot be made to refuse one request on cue): the first
        # renewal (at 2 s of the 4) fails after a second, as the storage SDK's would after
        # its own retries; the rest are real. Half a lease later would be too late.
        update = listener._queue.update_message
        failures = [HttpResponseError("renewal failed")]

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            if failures:
                await asyncio.sleep(1)
                raise failures.pop()
            return await update(*args, **kwargs)

        listener._queue.update_message = flaky
        client = storage.get_queue_client(name)
        await client.send_message(b64("slow"))
        await eventually(lambda: asyncio.sleep(0, calls), 10, "the function")
        await eventually(lambda: _drained(client), 15, "the message deleted")
    assert failures == []  # the failure happened
    assert calls == [1]  # renewed in time: never received again while it ran


async def test_a_lease_taken_away_is_no_longer_renewed(storage, caplog):
    name = f"devhost-gone-{uuid.uuid4().hex[:10]}"
    client = storage.get_queue_client(name)

    async def main(msg: func.QueueMessage) -> None:
        await client.delete_message(msg.id, msg.pop_receipt)  # someone else settles it
        await asyncio.sleep(5)

    with caplog.at_level(logging.DEBUG, logger="tools.devhost"):
        async with listening(storage, main, name, receive_visibility=2):
            await client.send_message(b64("taken"))
            await asyncio.sleep(6)
    assert "renewing message" not in caplog.text  # no failing renewals, each warned about
    assert caplog.text.count("Cannot renew message") == 1


async def test_a_poison_queue_has_no_poison_queue_of_its_own(storage):
    name = f"devhost-{uuid.uuid4().hex[:10]}-poison"
    calls: list[int] = []

    def main(msg: func.QueueMessage) -> None:
        calls.append(msg.dequeue_count)
        raise ValueError("still failing")

    async with listening(storage, main, name):
        client = storage.get_queue_client(name)
        await client.send_message(b64("again"))
        await eventually(lambda: asyncio.sleep(0, calls), 10, "the function")
        await asyncio.sleep(1)
        # Left invisible (not released, not moved), as the host does for such queues.
        assert await _texts(client) == []
        assert (await client.get_queue_properties()).approximate_message_count == 1
    assert await _gone(storage.get_queue_client(f"{name}-poison"))
    assert calls == [1]


async def test_no_more_than_batch_size_plus_new_batch_threshold_run_at_once(storage):
    # The host fetches a new batch only once no more than newBatchThreshold messages are
    # still being processed: at most batchSize + newBatchThreshold invocations at once.
    name = f"devhost-batch-{uuid.uuid4().hex[:10]}"
    started: list[str] = []
    running_now: list[int] = [0]
    peak: list[int] = [0]
    done: list[str] = []

    async def main(msg: func.QueueMessage) -> None:
        started.append(msg.id)
        running_now[0] += 1
        peak[0] = max(peak[0], running_now[0])
        # Short and long runs alternate: a batch's short one ends while its long one runs.
        await asyncio.sleep(0.6 if len(started) % 2 == 0 else 0.2)
        running_now[0] -= 1
        done.append(msg.get_body().decode())

    client = storage.get_queue_client(name)
    await client.create_queue()
    sent = [f"m{i}" for i in range(8)]
    for text in sent:
        await client.send_message(b64(text))
    async with listening(storage, main, name, batch_size=2, new_batch_threshold=1):
        await eventually(lambda: asyncio.sleep(0, len(done) == len(sent)), 15, "every message")
    assert sorted(done) == sorted(sent)
    assert peak[0] == 3  # 2 + 1: the threshold was reached, and never passed


async def test_a_failed_message_is_hidden_for_visibility_timeout_then_retried(storage):
    name = f"devhost-vis-{uuid.uuid4().hex[:10]}"
    calls: list[float] = []

    async def main(msg: func.QueueMessage) -> None:
        calls.append(time.monotonic())
        if msg.dequeue_count == 1:
            raise ValueError("fails once")

    async with listening(storage, main, name, visibility_timeout=2.0, max_dequeue_count=3):
        client = storage.get_queue_client(name)
        await client.send_message(b64("retry me"))
        await eventually(lambda: asyncio.sleep(0, len(calls) == 2), 10, "the retry")
        assert await _texts(client) == []  # succeeded the second time: deleted
    # Released with visibilityTimeout (not at once, not after the 10-min lease).
    assert 1.5 <= calls[1] - calls[0] <= 5


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
async def test_a_receive_answered_with_what_no_client_can_read_says_so(caplog, answer):
    # Storage answered (through a proxy, cut short): the listener logged "not reachable;
    # is the storage emulator running?" (the SDK's ParseError has no status), or a bare
    # "DecodeError (status=200)". It says the answer could not be read, never its text,
    # and keeps polling.
    calls: list[Any] = []

    async def main(msg: func.QueueMessage) -> None:
        calls.append(msg)

    async with unreadable_storage(answer) as fake:
        settings = {"AzureWebJobsStorage": fake.connection_string}
        service = queue_service_client(
            resolve_connection("AzureWebJobsStorage", settings, where="test"), where="test"
        )
        async with service, listening(service, main, "broken"):

            async def received_twice() -> bool:
                return sum("/broken/messages" in r for r in fake.requests) >= 2

            await eventually(received_twice, 10, "two receives")

    lines = [r.getMessage() for r in caplog.records if r.name == "tools.devhost.queue"]
    assert lines and all(
        line.startswith("Storage's answer could not be read receiving from queue 'broken' (")
        for line in lines
    ), lines
    assert "emulator" not in caplog.text and ANSWER_TEXT not in caplog.text
    assert calls == []


async def test_a_timer_run_later_than_scheduled_is_not_past_due():
    # The machine slept (or the clock jumped) past the next occurrence: the timer
    # extension passes isPastDue false to every scheduled run, late or not (its schedule
    # monitor alone sets it, at start); the local host said true for the late one.
    jump = [timedelta(0)]
    seen: list[bool] = []

    def wake_up_late() -> None:
        jump[0] = timedelta(seconds=30)

    async def main(timer: func.TimerRequest) -> None:
        seen.append(timer.past_due)
        if len(seen) == 2:  # while the listener sleeps until the third run
            asyncio.get_running_loop().call_later(0.1, wake_up_late)

    trigger = TimerTrigger("timer", "00:00:00.2", run_on_startup=False)
    function = make_function(FunctionSpec("tick_function", APPS, trigger), main)
    with ThreadPoolExecutor(max_workers=1) as executor:
        listener = TimerListener(
            function,
            IntervalSchedule(0.2),
            Invoker(executor),
            clock=lambda: datetime.now(UTC) + jump[0],
        )
        task = asyncio.create_task(listener.run())
        await eventually(lambda: asyncio.sleep(0, len(seen) >= 4), 5, "four runs")
        listener.stop()
        await asyncio.wait_for(task, 5)
    assert seen[:4] == [False, False, False, False]


async def test_run_on_startup_fires_once_at_start():
    started: list[tuple[bool, str]] = []

    async def main(timer: func.TimerRequest) -> None:
        started.append((timer.past_due, timer.schedule_status["Last"]))

    # Next occurrence in an hour: only runOnStartup can fire it during the test.
    trigger = TimerTrigger("timer", "01:00:00", run_on_startup=True)
    function = make_function(FunctionSpec("tick_function", APPS, trigger), main)
    with ThreadPoolExecutor(max_workers=1) as executor:
        listener = TimerListener(function, IntervalSchedule(3600), Invoker(executor))
        task = asyncio.create_task(listener.run())
        await eventually(lambda: asyncio.sleep(0, started), 5, "the startup run")
        await asyncio.sleep(0.3)
        listener.stop()
        await asyncio.wait_for(task, 5)
    assert started == [(False, "0001-01-01T00:00:00")]  # once, never run before


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_function_past_function_timeout_fails_and_its_message_is_retried(
    storage, caplog, kind
):
    # A sync function's thread cannot be stopped, but its invocation fails as the host's
    # does (it succeeded late: the message was deleted).
    caplog.set_level(logging.INFO, logger="tools.devhost")
    name = f"devhost-timeout-{uuid.uuid4().hex[:10]}"
    calls: list[int] = []

    async def hangs(msg: func.QueueMessage) -> None:
        calls.append(msg.dequeue_count)
        if msg.dequeue_count == 1:
            await asyncio.sleep(30)  # the host's functionTimeout ends it

    def blocks(msg: func.QueueMessage) -> None:
        calls.append(msg.dequeue_count)
        if msg.dequeue_count == 1:
            time.sleep(2)  # past the host's functionTimeout

    main = hangs if kind == "async" else blocks
    async with listening(storage, main, name, function_timeout=0.5, max_dequeue_count=3):
        client = storage.get_queue_client(name)
        await client.send_message(b64("hangs once"))
        await eventually(lambda: asyncio.sleep(0, calls == [1, 2]), 10, "the retry")
        await eventually(lambda: _drained(client), 5, "the message deleted")
    assert calls == [1, 2]
    assert "Function 'queue_function' timed out after 0.5s" in caplog.text
    assert "Executed 'Functions.queue_function' (Failed" in caplog.text


async def test_a_long_timer_run_never_overlaps_the_next():
    runs: list[list[float]] = []

    async def main(timer: func.TimerRequest) -> None:
        runs.append([time.monotonic(), 0.0])
        await asyncio.sleep(0.6)
        runs[-1][1] = time.monotonic()

    trigger = TimerTrigger("timer", "00:00:00.2", run_on_startup=False)
    function = make_function(FunctionSpec("tick_function", APPS, trigger), main)
    with ThreadPoolExecutor(max_workers=1) as executor:
        invoker = Invoker(executor)
        listener = TimerListener(function, IntervalSchedule(0.2), invoker)
        task = asyncio.create_task(listener.run())
        await asyncio.sleep(2.0)
        listener.stop()
        await asyncio.wait_for(task, 5)
    assert len(runs) >= 2
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(runs))


# --- pure parts: routes, settings, schedules, encodings ------------------------------------


def test_ncrontab_day_and_day_of_week_must_both_match():
    # NCrontab (the timer extension's parser) ANDs the two day fields: Friday the 13th only.
    schedule = parse_schedule("0 0 0 13 * 5", {}, where="w")
    assert schedule.next_after(datetime(2026, 1, 1, tzinfo=UTC)) == datetime(
        2026, 2, 13, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("expression", "first_three"),
    [
        # As NCrontab reads them (croniter alone wraps 5-1 round the week, reads 9-9 as
        # every hour and refuses full names: the host did not start).
        ("0 0 9 * * 5-1", [(1, 9), (2, 9), (5, 9)]),  # Mon-Fri: 2026-01-01 is a Thursday
        ("0 0 9-9 * * *", [(1, 9), (2, 9), (3, 9)]),
        ("0 0 9 * * Monday", [(5, 9), (12, 9), (19, 9)]),
        ("0 0 22-2/10 * * *", [(1, 2), (1, 12), (1, 22)]),  # 2 to 22, by 10
    ],
)
def test_a_schedule_runs_as_the_timer_reads_it(expression, first_three):
    schedule = parse_schedule(expression, {}, where="w")
    when, seen = datetime(2026, 1, 1, tzinfo=UTC), []
    for _ in range(3):
        when = schedule.next_after(when)
        seen.append((when.day, when.hour))
    assert seen == first_three


def test_a_schedule_that_never_falls_due_never_runs_and_stops_nothing(caplog):
    # The timer takes 30 February and never fires it; croniter's error stopped the
    # host's timer listener ("A trigger listener stopped unexpectedly").
    from tools.devhost.timer import NEVER_DUE

    schedule = parse_schedule("0 0 0 30 2 *", {}, where="w")
    assert schedule.next_after(datetime(2026, 1, 1, tzinfo=UTC)) == NEVER_DUE
    assert "never falls due" in caplog.text


@pytest.mark.parametrize("expression", ["0 0 9 * *\t*", "0 0 9\n* * *"])
def test_a_schedule_separated_by_other_whitespace_than_spaces_is_refused(expression):
    # The timer splits on spaces only: it runs here and failed on Azure.
    with pytest.raises(HostError, match="separated by spaces"):
        parse_schedule(expression, {}, where="w")


def test_five_field_cron_runs_at_minute_starts_like_the_timer_extension():
    schedule = parse_schedule("*/5 * * * *", {}, where="w")
    start = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    assert schedule.next_after(start) == datetime(2026, 1, 1, 0, 5, tzinfo=UTC)


def _http_function(route: str, methods: frozenset[str] | None = None) -> Function:
    spec = FunctionSpec(
        name="f", directory=APPS, trigger=HttpTrigger("req", route, methods), http_output="$return"
    )
    return Function(spec=spec, main=lambda req: None, is_async=False, parameters=("req",))


@pytest.mark.parametrize(
    ("prefix", "route", "path", "params"),
    [
        ("api", "items/{id}", "/api/items/7", {"id": "7"}),
        ("api", "items/{id}", "/API/ITEMS/7/", {"id": "7"}),
        ("api", "items/{id:int}", "/api/items/x", None),
        ("api", "items/{id?}", "/api/items", {}),
        ("api", "files/{*rest}", "/api/files/a/b.txt", {"rest": "a/b.txt"}),
        ("api", "files/{name}.{ext}", "/api/files/a.txt", {"name": "a", "ext": "txt"}),
        ("", "hook", "/hook", {}),
        ("api", "items/{id}", "/api/items/7/more", None),
    ],
)
def test_route_templates_match_like_the_host(prefix, route, path, params):
    match = compile_route(prefix, _http_function(route)).pattern.match(path)
    if params is None:
        assert match is None
    else:
        assert match is not None
        assert {k: v for k, v in match.groupdict().items() if v is not None} == params


def test_settings_references_and_timespans():
    assert resolve("%A%-%B%", {"A": "x", "B": "y"}, where="w") == "x-y"
    with pytest.raises(HostError, match="'MISSING'"):
        resolve("%MISSING%", {}, where="w")
    assert parse_timespan("00:00:02", where="w") == 2.0
    assert parse_timespan("1.00:00:00.5", where="w") == 86400.5
    with pytest.raises(HostError, match="read it as days"):  # 1.x's milliseconds
        parse_timespan(1500, where="w")
    with pytest.raises(HostError, match="TimeSpan"):
        parse_timespan("2 seconds", where="w")


def test_storage_connections_resolve_like_the_host():
    dev = resolve_connection(
        "AzureWebJobsStorage", {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}, where="w"
    )
    assert "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1" in dev.connection_string
    short = resolve_connection(
        "Other", {"AzureWebJobsOther": "DefaultEndpointsProtocol=https"}, where="w"
    )
    assert short.setting == "AzureWebJobsOther"
    identity = resolve_connection(
        "AzureWebJobsStorage", {"AzureWebJobsStorage__accountName": "acct"}, where="w"
    )
    assert identity.account_url == "https://acct.queue.core.windows.net"
    with pytest.raises(HostError, match="AzureWebJobsStorage"):
        resolve_connection("AzureWebJobsStorage", {}, where="w")


def test_message_encodings_round_trip():
    body = "héllo ✓".encode()
    assert decode_body(encode_body(body, "base64"), "base64") == body
    assert decode_body(encode_body(body, "none"), "none") == body
    with pytest.raises(UndecodableMessage):
        decode_body("not base64!", "base64")


async def _thread_hops_of_one_receive_and_delete(service: Any, queue_name: str) -> int:
    """How many times the host's client hands work to a thread for one receive and one
    delete (aiohttp's netrc and proxy lookups when it trusts the environment)."""
    queue = service.get_queue_client(queue_name)
    await queue.create_queue()
    await queue.send_message("a")  # the connection is made
    with thread_hops() as submitted:
        [message] = [m async for m in queue.receive_messages(max_messages=1)]
        await queue.delete_message(message)
    return submitted[0]


async def test_the_hosts_queue_calls_make_no_thread_hop(azurite, unique_name, monkeypatch):
    # One receive per batch and one delete per message: two thread wake-ups each, with the
    # event loop busy delivering, cost the host ~0.4 ms of CPU per message (profiled).
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = {"AzureWebJobsStorage": azurite.connection_string}
    connection = resolve_connection("AzureWebJobsStorage", settings, where="test")
    async with queue_service_client(connection, where="test") as service:
        assert await _thread_hops_of_one_receive_and_delete(service, unique_name("q")) == 0

    # A proxy in the environment is still honoured (NO_PROXY keeps loopback direct).
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    async with queue_service_client(connection, where="test") as service:
        assert await _thread_hops_of_one_receive_and_delete(service, unique_name("q")) > 0


def test_an_app_setting_overrides_host_json_queue_options_as_on_azure(tmp_path: Path) -> None:
    # The proactive function reads the same override to know its last attempt: the local
    # host must poison after as many attempts as the function counts.
    from proactive_function import max_dequeue_count
    from tools.devhost.app import HostError, read_host_config

    (tmp_path / "host.json").write_text(
        json.dumps({"version": "2.0", "extensions": {"queues": {"maxDequeueCount": 5}}})
    )
    assert read_host_config(tmp_path).queues.max_dequeue_count == 5
    settings = {
        "AzureFunctionsJobHost__extensions__queues__maxDequeueCount": "2",
        "azurefunctionsjobhost__Extensions__Queues__visibilityTimeout": "00:00:07",
    }
    config = read_host_config(tmp_path, settings)
    assert (config.queues.max_dequeue_count, config.queues.visibility_timeout) == (2, 7.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AzureFunctionsJobHost__extensions__queues__maxDequeueCount", "2")
        assert max_dequeue_count() == 2  # the function and the host agree
    with pytest.raises(HostError, match="maxDequeueCount"):
        read_host_config(
            tmp_path, {"AzureFunctionsJobHost__extensions__queues__maxDequeueCount": "many"}
        )


def test_queue_defaults_and_timespans_are_read_as_the_host_reads_them(
    tmp_path: Path, monkeypatch
) -> None:
    import os

    from tools.devhost.app import HostError, read_host_config

    (tmp_path / "host.json").write_text('{"extensions": {"queues": {"batchSize": 32}}}')
    # Half a batch per processor, as the host's QueuesOptions (never refused: 64 processors
    # make 1,024, past what a host.json value may be).
    processors = len(os.sched_getaffinity(0))
    assert read_host_config(tmp_path).queues.new_batch_threshold == 16 * processors
    # This machine has not 64 processors: the count is all that is made up here.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert read_host_config(tmp_path).queues.new_batch_threshold == 1024
    # Functions 1.x's milliseconds: the host since 2.x reads 2000 as 2,000 days.
    (tmp_path / "host.json").write_text('{"extensions": {"queues": {"maxPollingInterval": 2000}}}')
    with pytest.raises(HostError, match="maxPollingInterval"):
        read_host_config(tmp_path)


def test_host_json_keys_are_read_in_any_case_as_on_azure(tmp_path: Path) -> None:
    # The host reads host.json as .NET configuration: "MaxDequeueCount" is the same key.
    # Read exactly, the local host and the proactive function both counted to 5 while
    # Azure poisoned after 2, so the function never knew its last attempt.
    from proactive_function import _host_json_max_dequeue_count
    from tools.devhost.app import read_host_config

    path = tmp_path / "host.json"
    document = {
        "version": "2.0",  # the one key the host reads exactly
        "FunctionTimeout": "00:00:30",
        "Extensions": {
            "Queues": {"MaxDequeueCount": 2, "VisibilityTimeout": "00:00:03"},
            "HTTP": {"RoutePrefix": "bots"},
        },
    }
    path.write_text(json.dumps(document))
    config = read_host_config(tmp_path)
    assert (config.queues.max_dequeue_count, config.queues.visibility_timeout) == (2, 3.0)
    assert (config.route_prefix, config.function_timeout) == ("bots", 30.0)
    assert _host_json_max_dequeue_count(path) == 2
    # Keys differing only in case: the last wins and sections merge, as the host's
    # flattened configuration has it; and a BOM, which the host reads past.
    text = (
        '{"version": "2.0", "extensions": {"queues": {"batchSize": 8, "maxDequeueCount": 5}},'
        ' "Extensions": {"Queues": {"MaxDequeueCount": 3}}}'
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "host.json").write_text(text, encoding="utf-8-sig")
    queues = read_host_config(other).queues
    assert (queues.batch_size, queues.max_dequeue_count) == (8, 3)
    assert _host_json_max_dequeue_count(other / "host.json") == 3


# --- who may reach it ------------------------------------------------------------------

LOCAL_MODE = {"MicrosoftAppId": "", "BOT_ALLOW_UNAUTHENTICATED": "true"}  # the example's


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
@pytest.mark.parametrize("source", ["local.settings.json", "environment"])
def test_an_unauthenticated_bot_is_not_served_beyond_loopback(tmp_path, address, source):
    # It trusts loopback serviceUrls: anyone reaching it could make it post to any port of
    # this machine (and it would store that conversation).
    app = _app(tmp_path / "app", HTTP_BINDINGS)
    if source == "local.settings.json":
        (app / "local.settings.json").write_text(json.dumps({"Values": LOCAL_MODE}))
    env = LOCAL_MODE if source == "environment" else {}
    host = DevHost(env, tmp_path, root=app, functions=(), extra=("--host", address))
    code = host.wait_exit(timeout=20)
    assert not accepts_connections(host.port)
    assert code == 1
    lines = host.stderr.strip().splitlines()
    assert len(lines) == 1, host.stderr  # one line, nothing loaded or logged before it
    assert lines[0].startswith(f"devhost: error: --host {address}: ")
    assert "loopback only" in lines[0] and "set MicrosoftAppId" in lines[0]
    assert host.stdout == ""  # no function listed: nothing started


@pytest.mark.parametrize(
    ("address", "settings", "refused"),
    [
        ("127.0.0.1", LOCAL_MODE, False),
        ("::1", LOCAL_MODE, False),
        ("localhost", LOCAL_MODE, False),
        ("127.0.0.2", LOCAL_MODE, False),
        ("192.0.2.10", LOCAL_MODE, True),
        ("bot.example", LOCAL_MODE, True),  # a name may resolve anywhere
        ("", LOCAL_MODE, True),  # every interface
        ("0.0.0.0", {**LOCAL_MODE, "BOT_ALLOW_UNAUTHENTICATED": "TRUE "}, True),
        (
            "0.0.0.0",
            {**LOCAL_MODE, "MicrosoftAppId": "00000000-0000-0000-0000-0000000000a1"},
            False,
        ),
        ("0.0.0.0", {"BOT_ALLOW_UNAUTHENTICATED": "false"}, False),  # the bot refuses all
        ("0.0.0.0", {}, False),  # another app's settings
    ],
)
def test_which_hosts_an_unauthenticated_bot_may_listen_on(address, settings, refused):
    from tools.devhost.__main__ import check_exposure

    if refused:
        with pytest.raises(HostError, match="loopback only"):
            check_exposure(address, settings)
    else:
        check_exposure(address, settings)
