"""botsim's fake Connector, driven by a plain HTTP client (not the bot's Connector client)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import pytest
import yarl

from shared.windows import Window
from tools.botsim.connector import OPERATIONS, FakeConnector, Reply


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def url(fake: FakeConnector, raw_path: str) -> yarl.URL:
    return yarl.URL(fake.url + raw_path, encoded=True)


async def test_it_serves_all_15_operations():
    assert len(OPERATIONS) == len(set(OPERATIONS)) == 15


async def test_requests_are_recorded_with_raw_and_decoded_paths(fake_connector, http):
    raw = "/v3/conversations/a%3Ab%40c%3Bd%2Fe/activities/1%2F2"
    async with http.post(
        url(fake_connector, raw + "?x=1"), json={"type": "message"}, headers={"X-Test": "yes"}
    ) as response:
        answer = await response.json()

    (request,) = fake_connector.requests
    assert request.method == "POST" and request.operation == "replyToActivity"
    assert request.raw_path == raw
    assert request.path == "/v3/conversations/a:b@c;d/e/activities/1/2"
    assert request.params == {"conversationId": "a:b@c;d/e", "activityId": "1/2"}
    assert request.query == {"x": "1"}
    assert request.headers["X-Test"] == "yes"
    assert request.json == {"type": "message"}
    assert (request.status, request.response) == (200, answer)
    assert answer["id"]


async def test_history_is_not_mistaken_for_a_reply(fake_connector, http):
    async with http.post(url(fake_connector, "/v3/conversations/c/activities/history"), json={}):
        pass
    assert fake_connector.requests[0].operation == "sendConversationHistory"


async def test_unknown_routes_answer_404_and_are_recorded(fake_connector, http):
    async with http.get(url(fake_connector, "/v3/nothing")) as response:
        assert response.status == 404
    assert fake_connector.requests[0].operation is None


@pytest.mark.parametrize(
    ("channel", "text", "status"),
    [
        ("webchat", "x" * 100_000, 200),
        ("webchat", "x" * 270_000, 413),  # the Bot Connector's 256 KiB request limit
        ("msteams", "x" * 50_000, 200),  # 100 KB as UTF-16: Teams' limit
        ("msteams", "x" * 52_000, 413),
        ("msteams", "\u4e2d" * 52_000, 413),  # 156 KB of UTF-8, 104 KB of UTF-16
        # 18 KB of UTF-16, sent as \\u escapes (54 KB of JSON): the text counts, not its spelling.
        ("msteams", "\u4e2d" * 9_000, 200),
        ("msteams", "\U0001f600" * 4_500, 200),
    ],
)
async def test_a_message_over_the_services_size_limits_is_refused(http, channel, text, status):
    activity = {"type": "message", "channelId": channel, "text": text}
    body = json.dumps(activity)  # ensure_ascii, as the bot's client sends it
    with FakeConnector() as fake:
        target = url(fake, "/v3/conversations/c/activities")
        headers = {"Content-Type": "application/json"}
        async with http.post(target, data=body, headers=headers) as answer:
            assert answer.status == status
            body = await answer.json()
    if status == 413:
        assert body["error"]["code"] == "MessageSizeTooBig"


async def test_scripts_answer_in_order_then_fall_back_to_defaults(fake_connector, http):
    fake_connector.script(
        "POST",
        r"/conversations/a%3A1/activities$",
        [
            Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "1"}),
            Reply(403, body='{"errorCode":209,"message":"{}"}'),
        ],
    )
    statuses = []
    for _ in range(3):
        async with http.post(
            url(fake_connector, "/v3/conversations/a%3A1/activities"), json={}
        ) as r:
            statuses.append((r.status, r.headers.get("Retry-After")))
    async with http.post(url(fake_connector, "/v3/conversations/a%3A2/activities"), json={}) as r:
        other = r.status

    assert statuses == [(429, "1"), (403, None), (200, None)]
    assert other == 200


async def test_a_scripted_delay_delays_the_answer(fake_connector, http):
    fake_connector.script("*", "members", [Reply(delay=0.3)])
    started = time.monotonic()
    async with http.get(url(fake_connector, "/v3/conversations/c/members")) as response:
        assert response.status == 200
    assert time.monotonic() - started >= 0.3


async def test_a_dropped_connection_looks_like_a_reset_to_the_client(fake_connector, http):
    fake_connector.script("POST", ".", [Reply(drop=True)])
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.post(url(fake_connector, "/v3/conversations/c/activities"), json={}):
            pass
    assert len(fake_connector.requests) == 1


async def test_limits_are_enforced_per_conversation_when_asked(http):
    with FakeConnector(enforce_limits=True) as fake:
        statuses = []
        for _ in range(8):
            async with http.post(url(fake, "/v3/conversations/a%3A1/activities"), json={}) as r:
                statuses.append(r.status)
                retry_after = r.headers.get("Retry-After")
        async with http.post(url(fake, "/v3/conversations/a%3A2/activities"), json={}) as r:
            other = r.status
        async with http.get(url(fake, "/v3/conversations/a%3A1/members")) as r:
            read = r.status

        assert statuses == [200] * 7 + [429]
        assert retry_after == "1"
        assert (other, read) == (200, 200)  # other conversations and reads are not counted
        (violation,) = fake.violations
        assert violation.conversation_id == "a:1" and violation.window == Window(7, 1.0)


async def test_the_fake_clock_decides_the_windows(http):
    now = [0.0]
    with FakeConnector(enforce_limits=True, clock=lambda: now[0]) as fake:
        for step in range(20):
            now[0] = step * 0.2  # 5 per second: under 7/1 s, over 8/2 s
            async with http.post(url(fake, "/v3/conversations/c/activities"), json={}):
                pass
        assert {v.window for v in fake.violations} == {Window(8, 2.0)}


async def test_a_thread_gets_at_most_1800_operations_an_hour(http):
    # Teams' fourth per-thread window (the bot's pacer leaves it to the channel): a
    # conversation under every shorter limit is still refused after 1,800 in an hour.
    now = [0.0]
    with FakeConnector(enforce_limits=True, clock=lambda: now[0]) as fake:
        statuses = []
        for step in range(1801):
            now[0] = step * 0.55  # 1.8 per second: under 7/1 s, 8/2 s and 60/30 s
            async with http.post(url(fake, "/v3/conversations/c/activities"), json={}) as r:
                statuses.append(r.status)
        assert statuses[:1800] == [200] * 1800 and statuses[1800] == 429
        assert {v.window for v in fake.violations} == {Window(1800, 3600.0)}


async def test_a_global_limit_counts_every_request(http):
    with FakeConnector(global_limit=Window(3, 10.0)) as fake:
        statuses = []
        for n in range(4):
            async with http.get(url(fake, f"/v3/conversations/c{n}/members")) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 200, 429]
        assert fake.violations[0].conversation_id is None


async def test_the_tenant_limit_knows_a_conversations_tenant_when_the_body_names_none(http):
    # Teams counts a request against the tenant its conversation belongs to; a bot that
    # sends only the conversation id (no tenantId in the body) still counts against it.
    with FakeConnector(tenant_limit=Window(2, 10.0)) as fake:
        fake.conversation_tenants = {"a:1": "t1", "a:2": "t2"}

        async def post(conversation: str, body: dict) -> int:
            path = f"/v3/conversations/{conversation}/activities"
            async with http.post(url(fake, path), json=body) as r:
                return r.status

        t1 = [await post("a%3A1", {"text": str(n)}) for n in range(3)]
        t2 = await post("a%3A2", {"text": "x"})
        named = await post("a%3A2", {"conversation": {"tenantId": "t9"}})  # the body wins

        assert t1 == [200, 200, 429]
        assert (t2, named) == (200, 200)
        assert [v.tenant_id for v in fake.violations] == ["t1"]


async def test_a_request_refused_by_one_limit_counts_against_none(http):
    # Nine sends to one conversation at once under a tenant limit of 9/s: two are refused by
    # the conversation's 7/1 s, and the tenant still takes two more (to another conversation).
    now = [0.0]
    with FakeConnector(
        enforce_limits=True, tenant_limit=Window(9, 1.0), clock=lambda: now[0]
    ) as fake:
        fake.conversation_tenants = {"a:1": "t", "b:1": "t"}

        async def post(conversation: str) -> int:
            path = f"/v3/conversations/{conversation}/activities"
            async with http.post(url(fake, path), json={}) as r:
                return r.status

        a = [await post("a%3A1") for _ in range(9)]
        b = [await post("b%3A1") for _ in range(3)]
    assert a == [200] * 7 + [429] * 2
    assert b == [200, 200, 429]
    assert [v.tenant_id for v in fake.violations] == [None, None, "t"]


async def test_a_subscriber_that_fails_changes_no_answer(fake_connector, http):
    def broken(request):  # `make chat | head` closed its pipe, say
        raise BrokenPipeError

    fake_connector.subscribe(broken)
    async with http.post(url(fake_connector, "/v3/conversations/c/activities"), json={}) as r:
        assert r.status == 200


async def test_subscribers_receive_each_activity_as_it_arrives(fake_connector, http):
    queue: asyncio.Queue = asyncio.Queue()
    received = []
    unsubscribe_queue = fake_connector.subscribe(queue)
    fake_connector.subscribe(received.append)

    async with http.post(
        url(fake_connector, "/v3/conversations/c/activities"), json={"text": "one"}
    ):
        pass
    first = await asyncio.wait_for(queue.get(), 2)
    unsubscribe_queue()
    async with http.post(
        url(fake_connector, "/v3/conversations/c/activities/9"), json={"text": "two"}
    ):
        pass
    async with http.get(url(fake_connector, "/v3/conversations/c/members")):
        pass

    assert first.activity == {"text": "one"} and first.operation == "sendToConversation"
    assert [r.activity["text"] for r in received] == ["one", "two"]  # reads are not activities
    assert queue.empty()


async def test_wait_for_returns_when_the_condition_holds(fake_connector, http):
    async def later():
        await asyncio.sleep(0.1)
        async with http.post(url(fake_connector, "/v3/conversations/c/activities"), json={}):
            pass

    task = asyncio.create_task(later())
    found = await fake_connector.wait_for(lambda rs: rs and rs[-1], timeout=2)
    await task
    assert found.operation == "sendToConversation"
    with pytest.raises(TimeoutError):
        await fake_connector.wait_for(lambda rs: len(rs) > 5, timeout=0.1)


def test_wait_for_sync_works_without_an_event_loop(fake_connector):
    def send():
        async def main():
            async with aiohttp.ClientSession() as session:
                await session.post(fake_connector.url + "/v3/conversations/c/activities", json={})

        asyncio.run(main())

    thread = threading.Thread(target=send)
    thread.start()
    requests = fake_connector.wait_for_sync(lambda rs: rs, timeout=5)
    thread.join()
    assert requests[0].operation == "sendToConversation"


async def test_create_conversation_answers_id_activity_id_and_service_url(fake_connector, http):
    body = {"members": [{"id": "29:u"}], "activity": {"type": "message"}}
    async with http.post(url(fake_connector, "/teams/v3/conversations"), json=body) as response:
        created = await response.json()
    async with http.get(url(fake_connector, "/v3/conversations/x/members")) as response:
        defaults = await response.json()

    assert created["serviceUrl"] == f"{fake_connector.url}/teams/"
    assert created["activityId"]
    assert fake_connector.members[created["id"]] == [{"id": "29:u"}]
    assert len(defaults) == 3


async def test_paged_members_continue_until_the_last_page(fake_connector, http):
    fake_connector.members["c"] = [{"id": f"29:{n}"} for n in range(5)]
    seen, token = [], None
    while True:
        query = "?pageSize=2" + (f"&continuationToken={token}" if token else "")
        async with http.get(url(fake_connector, "/v3/conversations/c/pagedmembers" + query)) as r:
            page = await r.json()
        seen += [m["id"] for m in page["members"]]
        token = page.get("continuationToken")
        if not token:
            break
    assert seen == [f"29:{n}" for n in range(5)]


async def test_auth_check_rejects_requests_without_an_accepted_token(http):
    with FakeConnector(auth_check=lambda token: token == "good") as fake:
        headers = {"Authorization": "Bearer bad"}
        async with http.get(url(fake, "/v3/conversations/c/members"), headers=headers) as r:
            bad = r.status
        headers = {"Authorization": "Bearer good"}
        async with http.get(url(fake, "/v3/conversations/c/members"), headers=headers) as r:
            good = r.status
    assert (bad, good) == (401, 200)
