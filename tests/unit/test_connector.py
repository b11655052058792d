"""The Connector client against botsim's fake Connector (HTTP) with tokens from the fake AAD.

Retry waits are measured with an injected clock and sleep (VirtualTime), so the tests
check the exact waits without spending them; one test checks the bound in wall-clock time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
import yarl

from shared.auth.tokens import create_token_provider
from shared.config import Settings, SettingsError
from shared.connector import (
    NO_RETRY,
    ConnectorClient,
    ConnectorError,
    ErrorKind,
    RetryPolicy,
    departure_tracing,
    parse_error_body,
    parse_retry_after,
)
from shared.connector.client import REQUEST_RESERVE_SECONDS
from shared.connector.scope import pacing_scope
from shared.connector.transport import follow_redirect
from shared.ratelimit import Pacer, Scope
from shared.serviceurl import parse_service_url
from shared.windows import Window
from tests.fixtures.connector import VirtualTime
from tests.fixtures.recursion import collector_paused
from tools.botsim.aad import AadError
from tools.botsim.connector import FakeConnector, Reply

# Teams ids really look like this: every character a naive client would get wrong.
CONVERSATION = "a:1Xy-Z@thread.skype;messageid=1700000000000/part"
ACTIVITY = "1:act@id;v=1/2"
MEMBER = "29:1AbC/dEf@x;y"
ATTACHMENT = "att:1@2;3/4"
ENC_CONVERSATION = "a%3A1Xy-Z%40thread.skype%3Bmessageid%3D1700000000000%2Fpart"
ENC_ACTIVITY = "1%3Aact%40id%3Bv%3D1%2F2"
ENC_MEMBER = "29%3A1AbC%2FdEf%40x%3By"
ENC_ATTACHMENT = "att%3A1%402%3B3%2F4"

NO_JITTER = RetryPolicy(jitter=0.0)


@pytest.fixture
def settings(aad_app, fake_connector) -> Settings:
    return aad_app.settings(
        BOT_TRUSTED_SERVICE_URLS=fake_connector.url, BOT_CONNECTOR_RATE_LIMIT="1000"
    )


@pytest.fixture
def vtime() -> VirtualTime:
    return VirtualTime()


@pytest.fixture
async def client(settings, vtime):
    connector = ConnectorClient(
        settings,
        create_token_provider(settings),
        retry=NO_JITTER,
        sleep=vtime.sleep,
        clock=vtime.clock,
    )
    yield connector
    await connector.close()


# --- the 15 operations ---------------------------------------------------------------


async def test_send_to_conversation(client, fake_connector):
    activity = {"type": "message", "text": "hello"}
    result = await client.send_to_conversation(fake_connector.url, CONVERSATION, activity)

    (request,) = fake_connector.requests
    assert request.method == "POST"
    assert request.raw_path == f"/v3/conversations/{ENC_CONVERSATION}/activities"
    assert request.params == {"conversationId": CONVERSATION}
    assert request.json == activity
    assert result == request.response and result["id"]


async def test_reply_to_activity(client, fake_connector):
    activity = {"type": "message", "text": "re", "replyToId": ACTIVITY}
    result = await client.reply_to_activity(fake_connector.url, CONVERSATION, ACTIVITY, activity)

    (request,) = fake_connector.requests
    assert (request.method, request.operation) == ("POST", "replyToActivity")
    assert request.raw_path == f"/v3/conversations/{ENC_CONVERSATION}/activities/{ENC_ACTIVITY}"
    assert request.params == {"conversationId": CONVERSATION, "activityId": ACTIVITY}
    assert request.json == activity
    assert result == request.response and result["id"]


async def test_update_activity(client, fake_connector):
    activity = {"type": "message", "text": "edited", "id": ACTIVITY}
    result = await client.update_activity(fake_connector.url, CONVERSATION, ACTIVITY, activity)

    (request,) = fake_connector.requests
    assert (request.method, request.operation) == ("PUT", "updateActivity")
    assert request.raw_path == f"/v3/conversations/{ENC_CONVERSATION}/activities/{ENC_ACTIVITY}"
    assert request.json == activity
    assert result == {"id": ACTIVITY}


async def test_delete_activity(client, fake_connector):
    result = await client.delete_activity(fake_connector.url, CONVERSATION, ACTIVITY)

    (request,) = fake_connector.requests
    assert (request.method, request.operation) == ("DELETE", "deleteActivity")
    assert request.raw_path == f"/v3/conversations/{ENC_CONVERSATION}/activities/{ENC_ACTIVITY}"
    assert request.body == b""
    assert result is None


async def test_send_conversation_history(client, fake_connector):
    transcript = {"activities": [{"type": "message", "text": "earlier"}]}
    result = await client.send_conversation_history(fake_connector.url, CONVERSATION, transcript)

    (request,) = fake_connector.requests
    assert (request.method, request.operation) == ("POST", "sendConversationHistory")
    assert request.raw_path == f"/v3/conversations/{ENC_CONVERSATION}/activities/history"
    assert request.json == transcript
    assert result == request.response


async def test_get_activity_members(client, fake_connector):
    fake_connector.members[CONVERSATION] = [{"id": MEMBER, "name": "Ada"}]
    result = await client.get_activity_members(fake_connector.url, CONVERSATION, ACTIVITY)

    (request,) = fake_connector.requests
    assert (request.method, request.operation) == ("GET", "getActivityMembers")
    assert request.raw_path == (
        f"/v3/conversations/{ENC_CONVERSATION}/activities/{ENC_ACTIVITY}/members"
    )
    assert result == [{"id": MEMBER, "name": "Ada"}]


async def test_create_conversation(client, fake_connector):
    parameters = {
        "bot": {"id": "28:bot"},
        "members": [{"id": MEMBER}],
        "channelData": {"tenant": {"id": "tenant-1"}},
        "tenantId": "tenant-1",
        "activity": {"type": "message", "text": "hi"},
    }
    result = await client.create_conversation(fake_connector.url, parameters)

    (request,) = fake_connector.requests
    assert (request.method, request.raw_path) == ("POST", "/v3/conversations")
    assert request.json == parameters
    assert set(result) == {"id", "activityId", "serviceUrl"}
    assert result["serviceUrl"].startswith(fake_connector.url)


async def test_get_conversations_with_continuation(client, fake_connector):
    fake_connector.conversations.extend({"id": f"a:{n}"} for n in range(150))

    first = await client.get_conversations(fake_connector.url)
    second = await client.get_conversations(fake_connector.url, first["continuationToken"])

    assert [r.raw_path for r in fake_connector.requests] == ["/v3/conversations"] * 2
    assert fake_connector.requests[1].query == {"continuationToken": first["continuationToken"]}
    assert len(first["conversations"]) + len(second["conversations"]) == 150
    assert "continuationToken" not in second


async def test_get_conversation_members(client, fake_connector):
    result = await client.get_conversation_members(fake_connector.url, CONVERSATION)

    (request,) = fake_connector.requests
    assert (request.method, request.operation) == ("GET", "getConversationMembers")
    assert request.raw_path == f"/v3/conversations/{ENC_CONVERSATION}/members"
    assert isinstance(result, list) and result == request.response


async def test_get_conversation_paged_members(client, fake_connector):
    fake_connector.members[CONVERSATION] = [{"id": f"29:{n}"} for n in range(5)]
    token = "tok/en=+&1%2e%2e"  # continuation tokens are opaque: must survive the query

    fake_connector.script(
        "GET",
        "pagedmembers",
        [Reply(json={"members": [{"id": "29:0"}], "continuationToken": token})],
    )
    first = await client.get_conversation_paged_members(fake_connector.url, CONVERSATION, 2)
    await client.get_conversation_paged_members(fake_connector.url, CONVERSATION, 2, token)
    page = await client.get_conversation_paged_members(fake_connector.url, CONVERSATION, 2, "2")

    requests = fake_connector.requests_for("getConversationPagedMembers")
    assert requests[0].raw_path == f"/v3/conversations/{ENC_CONVERSATION}/pagedmembers"
    assert requests[0].query == {"pageSize": "2"}
    assert requests[1].query == {"pageSize": "2", "continuationToken": token}
    assert first["continuationToken"] == token
    assert page == {"members": [{"id": "29:2"}, {"id": "29:3"}], "continuationToken": "4"}


async def test_get_conversation_member(client, fake_connector):
    fake_connector.members[CONVERSATION] = [{"id": MEMBER, "name": "Ada"}]
    result = await client.get_conversation_member(fake_connector.url, CONVERSATION, MEMBER)

    (request,) = fake_connector.requests
    assert (request.method, request.operation) == ("GET", "getConversationMember")
    assert request.raw_path == f"/v3/conversations/{ENC_CONVERSATION}/members/{ENC_MEMBER}"
    assert request.params["memberId"] == MEMBER
    assert result == {"id": MEMBER, "name": "Ada"}


async def test_delete_conversation_member(client, fake_connector):
    fake_connector.members[CONVERSATION] = [{"id": MEMBER}, {"id": "29:other"}]
    result = await client.delete_conversation_member(fake_connector.url, CONVERSATION, MEMBER)

    (request,) = fake_connector.requests
    assert (request.method, request.operation) == ("DELETE", "deleteConversationMember")
    assert request.raw_path == f"/v3/conversations/{ENC_CONVERSATION}/members/{ENC_MEMBER}"
    assert result is None
    assert fake_connector.members[CONVERSATION] == [{"id": "29:other"}]


async def test_attachments_upload_info_and_view(client, fake_connector):
    content = bytes(range(256)) * 10
    upload = {
        "type": "application/octet-stream",
        "name": "data.bin",
        "originalBase64": base64.b64encode(content).decode(),
    }

    uploaded = await client.upload_attachment(fake_connector.url, CONVERSATION, upload)
    info = await client.get_attachment_info(fake_connector.url, uploaded["id"])
    view = await client.get_attachment(fake_connector.url, uploaded["id"], "original")

    upload_request, info_request, view_request = fake_connector.requests
    assert (upload_request.method, upload_request.raw_path) == (
        "POST",
        f"/v3/conversations/{ENC_CONVERSATION}/attachments",
    )
    assert upload_request.json == upload
    assert (info_request.method, info_request.operation) == ("GET", "getAttachmentInfo")
    assert info == {
        "name": "data.bin",
        "type": "application/octet-stream",
        "views": [{"viewId": "original", "size": len(content)}],
    }
    assert view_request.status == 302  # the view is served from elsewhere: redirect followed
    assert view == content


async def test_attachment_ids_are_percent_encoded(client, fake_connector):
    fake_connector.attachments[ATTACHMENT] = {"name": "x", "originalBase64": "aGk="}
    fake_connector.redirect_attachments = False

    assert await client.get_attachment(fake_connector.url, ATTACHMENT, "original") == b"hi"
    info = await client.get_attachment_info(fake_connector.url, ATTACHMENT)

    paths = [r.raw_path for r in fake_connector.requests]
    assert paths == [
        f"/v3/attachments/{ENC_ATTACHMENT}/views/original",
        f"/v3/attachments/{ENC_ATTACHMENT}",
    ]
    assert info["name"] == "x"


async def test_a_service_url_with_a_path_prefix_is_kept(client, fake_connector, aad_app):
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=f"{fake_connector.url}/amer")
    connector = ConnectorClient(settings, create_token_provider(settings))
    try:
        await connector.send_to_conversation(
            f"{fake_connector.url}/amer/", "a:1", {"type": "message"}
        )
    finally:
        await connector.close()
    assert fake_connector.requests[0].raw_path == "/amer/v3/conversations/a%3A1/activities"


# --- tokens --------------------------------------------------------------------------


async def test_one_token_for_many_calls_across_turns(client, fake_connector, fake_aad, aad_app):
    for turn in range(5):  # five turns, a few calls each, on the process's one client
        await client.reply_to_activity(fake_connector.url, f"a:{turn}", "1", {"type": "message"})
        await client.send_to_conversation(fake_connector.url, f"a:{turn}", {"type": "message"})
        await client.get_conversation_members(fake_connector.url, f"a:{turn}")

    assert fake_aad.issued[aad_app.app_id] == 1
    headers = {r.authorization for r in fake_connector.requests}
    assert len(headers) == 1
    (header,) = headers
    assert header.startswith("Bearer ") and fake_aad.is_valid_token(header[len("Bearer ") :])


async def test_expiry_gives_one_refresh_for_50_concurrent_calls(
    settings, fake_connector, fake_aad, aad_app
):
    vtime = VirtualTime(start=1_000_000.0)
    connector = ConnectorClient(settings, create_token_provider(settings, clock=vtime.clock))
    try:
        await connector.get_conversation_members(fake_connector.url, "a:0")
        vtime.now += 3600  # the token has expired
        fake_aad.delay = 0.1
        await asyncio.gather(
            *(
                connector.send_to_conversation(fake_connector.url, f"a:{n}", {"type": "message"})
                for n in range(50)
            )
        )
    finally:
        await connector.close()

    assert fake_aad.issued[aad_app.app_id] == 2
    sends = fake_connector.requests_for("sendToConversation")
    assert len(sends) == 50 and len({r.authorization for r in sends}) == 1
    assert sends[0].authorization != fake_connector.requests[0].authorization


async def test_401_refreshes_the_token_once_and_retries(client, fake_connector, fake_aad, aad_app):
    fake_connector.script(
        "POST", "activities$", [Reply(401, json={"error": {"code": "Unauthorized"}})]
    )

    result = await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    first, second = fake_connector.requests
    assert (first.status, second.status) == (401, 200)
    assert first.authorization != second.authorization
    assert fake_aad.issued[aad_app.app_id] == 2
    assert result["id"]
    assert fake_connector.activities == [{"type": "message"}]


async def test_a_second_401_is_a_credentials_error_naming_the_setting(
    client, fake_connector, fake_aad, aad_app
):
    # Defect 5: classed `invalid`, it sent every queued proactive message to the poison queue.
    body = {"error": {"code": "BotNotRegistered", "message": "No registration found for this bot."}}
    fake_connector.script("POST", "activities$", [Reply(401, json=body)] * 3)

    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert (caught.value.kind, caught.value.status) == (ErrorKind.CREDENTIALS, 401)
    assert caught.value.setting == "MicrosoftAppId"
    assert not caught.value.retryable and not caught.value.terminal
    assert caught.value.code == "BotNotRegistered"
    assert len(fake_connector.requests) == 2
    assert fake_aad.issued[aad_app.app_id] == 2


async def test_token_failures_become_connector_errors_and_nothing_is_sent(
    fake_connector, aad_app, fake_aad
):
    settings = aad_app.settings(
        MicrosoftAppPassword="not-the-secret", BOT_TRUSTED_SERVICE_URLS=fake_connector.url
    )
    connector = ConnectorClient(settings, create_token_provider(settings))
    try:
        with pytest.raises(ConnectorError) as caught:
            await connector.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
    finally:
        await connector.close()

    # Defect 5: a refused secret is the bot's configuration, not the message's fault.
    assert caught.value.kind is ErrorKind.CREDENTIALS
    assert caught.value.setting == "MicrosoftAppPassword"
    assert caught.value.code == "AADSTS7000215"
    assert "MicrosoftAppPassword" in str(caught.value)
    assert "not-the-secret" not in str(caught.value)
    assert fake_connector.requests == []


# --- retries -------------------------------------------------------------------------


async def test_429_twice_then_success_is_delivered_once_after_the_waits(
    client, fake_connector, vtime
):
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "1"})
    fake_connector.script("POST", "activities$", [throttled, throttled])

    result = await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert [r.status for r in fake_connector.requests] == [429, 429, 200]
    assert vtime.sleeps == [1.0, 1.0]
    assert fake_connector.activities == [{"type": "message"}]
    assert result == fake_connector.requests[-1].response


async def test_retry_after_as_an_http_date_is_honoured(client, fake_connector, vtime):
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    fake_connector.script("POST", "activities$", [Reply(503, headers={"Retry-After": when})])

    await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert len(vtime.sleeps) == 1 and 1.5 <= vtime.sleeps[0] <= 3.0


@pytest.mark.parametrize("retry_after", ["0", "0.01"])
async def test_a_retry_after_of_a_moment_waits_the_backoff(
    client, fake_connector, vtime, retry_after
):
    # Retried after 10 ms, each attempt met the same 429 (and cut the tenant's rate): five
    # in about 50 ms.
    throttled = Reply(429, headers={"Retry-After": retry_after})
    fake_connector.script("POST", "activities$", [throttled, throttled])

    await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert [r.status for r in fake_connector.requests] == [429, 429, 200]
    assert vtime.sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status", [412, 502, 503, 504])
async def test_transient_statuses_are_retried_with_backoff(client, fake_connector, vtime, status):
    fake_connector.script("POST", "activities$", [Reply(status), Reply(status)])

    await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert [r.status for r in fake_connector.requests] == [status, status, 200]
    assert vtime.sleeps == [0.5, 1.0]  # base 0.5 s, doubling (no jitter in this policy)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET"])
async def test_every_method_is_retried(client, fake_connector, method):
    fake_connector.script(method, ".", [Reply(503)])
    if method == "PUT":
        await client.update_activity(fake_connector.url, "a:1", "2", {"type": "message"})
    elif method == "DELETE":
        await client.delete_activity(fake_connector.url, "a:1", "2")
    else:
        await client.get_conversation_members(fake_connector.url, "a:1")
    assert [r.status for r in fake_connector.requests] == [503, 200]


async def test_500_is_not_retried(client, fake_connector):
    fake_connector.script("POST", "activities$", [Reply(500, body="boom")])

    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert len(fake_connector.requests) == 1
    # Defect 3: the message may have been posted; `transient` made callers send it again.
    assert (caught.value.kind, caught.value.status) == (ErrorKind.UNCERTAIN, 500)
    assert not caught.value.retryable


async def test_a_connection_dropped_after_a_post_was_written_is_not_retried(
    client, fake_connector, vtime
):
    # The channel read the request and may have acted on it: resending could post it twice
    # (the Azure SDKs and urllib3 likewise retry such a failure only for idempotent methods).
    fake_connector.script("POST", "activities$", [Reply(drop=True)])

    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert caught.value.kind is ErrorKind.UNCERTAIN
    assert len(fake_connector.requests) == 1
    assert vtime.sleeps == []


async def test_a_dropped_connection_is_retried_for_a_read(client, fake_connector, vtime):
    fake_connector.script("GET", "members$", [Reply(drop=True)])

    members = await client.get_conversation_members(fake_connector.url, "a:1")

    # Retried at once by aiohttp itself (an idempotent request on a reused connection) or
    # after the client's backoff: either way it was read again and answered.
    assert len(fake_connector.requests) == 2
    assert isinstance(members, list)


async def test_a_dropped_post_on_a_session_without_departure_tracing_is_not_sent_again(
    fake_connector,
):
    # A session of the caller's own cannot say whether the request had been written.
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    fake_connector.script("POST", "activities$", [Reply(drop=True)])
    async with aiohttp.ClientSession() as session:
        client = ConnectorClient(settings, None, session=session)
        with pytest.raises(ConnectorError) as caught:
            await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert caught.value.kind is ErrorKind.UNCERTAIN
    assert len(fake_connector.requests_for("sendToConversation")) == 1


async def _raw_server(*answers: bytes):
    """A loopback server that reads each request's head and answers the next of `answers`
    (the last one again once they run out), then hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answers[min(len(heads), len(answers)) - 1])
        await writer.drain()
        writer.close()

    heads: list[bytes] = []
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads


CUT_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"


async def test_a_success_whose_body_breaks_off_is_a_success_and_not_sent_again(vtime):
    # The status line says the message was posted (or deleted): only its id is lost.
    server, url, heads = await _raw_server(CUT_200)
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, sleep=vtime.sleep, clock=vtime.clock)
    try:
        assert await client.send_to_conversation(url, "a:1", {"type": "message"}) == {}
        await client.delete_activity(url, "a:1", "act-1")
        with pytest.raises(ConnectorError) as caught:  # a read's result did not arrive
            await client.get_conversation_members(url, "a:1")
    finally:
        await client.close()
        server.close()
    assert caught.value.kind is ErrorKind.TRANSIENT
    assert [head.split(b" ", 1)[0] for head in heads][:2] == [b"POST", b"DELETE"]
    assert len(heads) > 3  # the read was tried again


async def test_an_error_whose_body_breaks_off_is_decided_by_its_status(vtime):
    # A 429 says nothing was posted: retried after its Retry-After, never `uncertain`.
    cut_429 = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 200\r\n\r\n{"
    ok = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
        b'{"id": "x"}'
    )
    server, url, heads = await _raw_server(cut_429, ok)
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, sleep=vtime.sleep, clock=vtime.clock)
    try:
        sent = await client.send_to_conversation(url, "a:1", {"type": "message"})
    finally:
        await client.close()
        server.close()
    assert sent == {"id": "x"}
    assert len(heads) == 2 and vtime.sleeps == [2.0]


async def test_a_broken_answer_to_a_post_is_uncertain_and_not_sent_again(vtime):
    server, url, heads = await _raw_server(b"HTTP/1.1 2OO OK\r\n\r\n")
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, sleep=vtime.sleep, clock=vtime.clock)
    try:
        with pytest.raises(ConnectorError) as caught:
            await client.send_to_conversation(url, "a:1", {"type": "message"})
    finally:
        await client.close()
        server.close()
    # `invalid` put a proactive message in the poison queue, whence it may be sent again.
    assert caught.value.kind is ErrorKind.UNCERTAIN
    assert len(heads) == 1


# A 2xx whose body is not the result asked for: HTML from a gateway, another JSON shape, or
# a close-framed body cut short (HTTP cannot tell it is short).
HTML_200 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 22\r\n\r\n"
    b"<html>gateway ok</html"
)
SHAPE_200 = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n"ok"'
CUT_CLOSE_200 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    b'{"members": [{"id": "29:a"}], "continuationToken": "2'
)
EMPTY_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
NO_ID_200 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 28\r\n\r\n"
    b'{"message": "upstream busy"}'
)


@pytest.mark.parametrize("answer", [HTML_200, SHAPE_200, CUT_CLOSE_200, EMPTY_200])
async def test_a_read_whose_answer_cannot_be_read_is_an_error_not_an_empty_result(vtime, answer):
    # `[]` members or a last page would tell the bot nobody is there, or that paging ended.
    server, url, heads = await _raw_server(answer)
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, sleep=vtime.sleep, clock=vtime.clock)
    reads = {
        "members": lambda: client.get_conversation_members(url, "a:1"),
        "paged": lambda: client.get_conversation_paged_members(url, "a:1"),
        "member": lambda: client.get_conversation_member(url, "a:1", "29:a"),
        "conversations": lambda: client.get_conversations(url),
    }
    kinds = {}
    try:
        for name, read in reads.items():
            with pytest.raises(ConnectorError) as caught:
                await read()
            kinds[name] = caught.value.kind
    finally:
        await client.close()
        server.close()
    assert set(kinds.values()) == {ErrorKind.TRANSIENT}
    assert len(heads) > 2 * len(reads)  # each was tried again


@pytest.mark.parametrize(
    "first", [(CUT_200, CUT_200), (HTML_200, CUT_CLOSE_200), (NO_ID_200, EMPTY_200)]
)
async def test_a_new_conversation_whose_answer_cannot_be_read_is_tried_again(vtime, first):
    # Broken off, cut short where HTTP cannot tell, or a gateway's page: its id is the
    # result, and an empty success would fail a user target for good.
    good = (
        b"HTTP/1.1 201 Created\r\n"
        b'Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{"id": "a:9"}'
    )
    server, url, heads = await _raw_server(*first, good)
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, sleep=vtime.sleep, clock=vtime.clock)
    try:
        created = await client.create_conversation(
            url, {"isGroup": False, "members": [{"id": "29:u"}], "bot": {"id": "28:b"}}
        )
    finally:
        await client.close()
        server.close()
    assert created == {"id": "a:9"}  # a new conversation's id is what a user target needs
    assert len(heads) == 3


async def test_an_upload_answered_without_an_id_is_tried_again(vtime):
    good = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    server, url, heads = await _raw_server(NO_ID_200, good + b'{"id": "at1"}')
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, sleep=vtime.sleep, clock=vtime.clock)
    try:
        uploaded = await client.upload_attachment(url, "a:1", {"type": "image/png"})
    finally:
        await client.close()
        server.close()
    assert uploaded == {"id": "at1"} and len(heads) == 2


async def test_a_new_conversation_with_a_message_whose_answer_cannot_be_read_is_not_sent_again(
    vtime,
):
    server, url, heads = await _raw_server(HTML_200)
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, sleep=vtime.sleep, clock=vtime.clock)
    parameters = {"isGroup": False, "members": [{"id": "29:u"}], "activity": {"type": "message"}}
    try:
        with pytest.raises(ConnectorError) as caught:
            await client.create_conversation(url, parameters)
    finally:
        await client.close()
        server.close()
    assert caught.value.kind is ErrorKind.UNCERTAIN  # posted, its id unknown
    assert len(heads) == 1


async def _stalling_server(answer: bytes):
    """A loopback server that answers each request with `answer` and then never finishes
    its body (the connection stays open for a minute)."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(60)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads


async def test_a_success_whose_body_stalls_is_a_success_and_not_sent_again():
    # The status line said it was posted (deleted): neither `uncertain` nor a second request.
    stall = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{"
    server, url, heads = await _stalling_server(stall)
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, retry=RetryPolicy(max_total_seconds=1.0, jitter=0))
    started = time.monotonic()
    try:
        assert await client.send_to_conversation(url, "a:1", {"type": "message"}) == {}
        await client.delete_activity(url, "a:1", "act-1")
    finally:
        await client.close()
        server.close()
    assert [head.split(b" ", 1)[0] for head in heads] == [b"POST", b"DELETE"]
    assert time.monotonic() - started < 3  # within each call's budget


async def test_an_error_whose_body_stalls_is_decided_by_its_status():
    # A 429 says nothing was posted: never `uncertain` because its body did not arrive.
    stall = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Length: 20\r\n\r\n{"
    server, url, heads = await _stalling_server(stall)
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, retry=RetryPolicy(max_total_seconds=1.0, jitter=0))
    try:
        with pytest.raises(ConnectorError) as caught:
            await client.send_to_conversation(url, "a:1", {"type": "message"})
    finally:
        await client.close()
        server.close()
    assert (caught.value.kind, caught.value.status) == (ErrorKind.THROTTLED, 429)
    assert caught.value.retry_after == 30 and len(heads) == 1


async def test_a_success_larger_than_the_limit_to_a_send_is_a_success(vtime):
    # Refusing it as `invalid` sent the message to the poison queue, whence it is sent again.
    big = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b'Content-Length: 40000000\r\n\r\n{"id": "1"}'
    )
    server, url, heads = await _raw_server(big)
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    client = ConnectorClient(settings, None, sleep=vtime.sleep, clock=vtime.clock)
    try:
        assert await client.send_to_conversation(url, "a:1", {"type": "message"}) == {}
        with pytest.raises(ConnectorError) as caught:  # a read's result is still refused
            await client.get_conversation_members(url, "a:1")
    finally:
        await client.close()
        server.close()
    assert caught.value.kind is ErrorKind.INVALID and "larger than" in caught.value.message
    assert len(heads) == 2


async def test_a_401_whose_refresh_fails_is_reported_as_entra_said(
    fake_connector, fake_aad, aad_app
):
    # Not the refused token sent again and a second 401 called a credentials problem.
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url)
    client = ConnectorClient(settings, create_token_provider(settings))
    try:
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
        fake_connector.script("POST", "activities$", [Reply(401)])
        fake_aad.fail_next(AadError("temporarily_unavailable", 50196, "Try again.", 503))
        with pytest.raises(ConnectorError) as caught:
            await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
    finally:
        await client.close()
    assert (caught.value.kind, caught.value.code) == (ErrorKind.TRANSIENT, "HTTP503")
    assert [r.status for r in fake_connector.requests] == [200, 401]


async def test_a_send_in_the_token_s_last_minutes_does_not_wait_for_a_slow_entra(
    fake_connector, fake_aad, aad_app
):
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url)
    later = VirtualTime(start=time.time())
    client = ConnectorClient(settings, create_token_provider(settings, clock=later.clock))
    try:
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
        later.now += 3600 - 240  # 4 minutes left: inside the refresh margin
        fake_aad.delay = 1.0  # MSAL waits up to 10 s, most of a send's 12 s budget
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
        assert fake_aad.issued[aad_app.app_id] == 1  # sent before the refresh came back
        first, second = fake_connector.requests
        assert second.status == 200 and second.authorization == first.authorization
        async with asyncio.timeout(10):  # the refresh lands for the sends after
            while fake_aad.issued[aad_app.app_id] < 2:  # noqa: ASYNC110 - the fake is a thread
                await asyncio.sleep(0.05)
    finally:
        await client.close()


async def test_a_server_that_is_down_gives_up_as_transient(settings, aad_app, vtime):
    with FakeConnector() as gone:
        url = gone.url
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=url)
    connector = ConnectorClient(
        settings, create_token_provider(settings), sleep=vtime.sleep, clock=vtime.clock
    )
    try:
        with pytest.raises(ConnectorError) as caught:
            await connector.send_to_conversation(url, "a:1", {"type": "message"})
    finally:
        await connector.close()
    assert caught.value.kind is ErrorKind.TRANSIENT and caught.value.status is None
    # Backoffs of 0.5, 1, 2, 4 s, each up to 20 % shorter: a fourth or a fifth attempt, as
    # the jitter falls, never one that starts with less than the request's own 5 s left.
    assert 3 <= len(vtime.sleeps) <= 4
    assert sum(vtime.sleeps) <= RetryPolicy().max_total_seconds - REQUEST_RESERVE_SECONDS


async def test_endless_429s_give_up_within_the_bounds_as_throttled(client, fake_connector, vtime):
    start = vtime.now
    throttled = Reply(429, headers={"Retry-After": "2"})
    fake_connector.script("POST", "activities$", [throttled] * 50)

    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert (caught.value.kind, caught.value.status) == (ErrorKind.THROTTLED, 429)
    assert caught.value.retry_after == 2.0
    # 0, 2, 4, 6 s; one at 8 s would leave less than the 5 s kept for the request itself.
    assert len(fake_connector.requests) == 4
    assert vtime.now - start <= NO_JITTER.max_total_seconds
    assert fake_connector.activities == []


async def test_endless_503s_give_up_within_the_total_time(client, fake_connector, vtime):
    start = vtime.now
    fake_connector.script("POST", "activities$", [Reply(503, headers={"Retry-After": "5"})] * 50)

    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert (caught.value.kind, caught.value.status) == (ErrorKind.TRANSIENT, 503)
    # 0 s and 5 s; one at 10 s would leave less than the 5 s of 12 kept for the request.
    assert len(fake_connector.requests) == 2
    assert vtime.now - start <= 12.0


async def test_a_retry_after_beyond_the_budget_gives_up_at_once(client, fake_connector, vtime):
    fake_connector.script("POST", "activities$", [Reply(429, headers={"Retry-After": "120"})])

    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert caught.value.kind is ErrorKind.THROTTLED and caught.value.retry_after == 120.0
    assert len(fake_connector.requests) == 1 and vtime.sleeps == []


async def test_give_up_is_bounded_in_wall_clock_time(settings, fake_connector):
    # Real sleeps: the bound holds end to end, not only in virtual time.
    policy = RetryPolicy(max_attempts=10, max_total_seconds=1.0, base_delay=0.2, jitter=0.0)
    fake_connector.script("POST", "activities$", [Reply(503, headers={"Retry-After": "0.3"})] * 20)
    connector = ConnectorClient(settings, create_token_provider(settings), retry=policy)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectorError):
            await connector.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
    finally:
        await connector.close()
    assert time.monotonic() - started < 1.5
    # Retried, and never past the budget: at most 0, 0.3, 0.6, 0.9 s. Fewer on a slow
    # machine, where the token acquisition and each answer also spend the budget.
    assert 2 <= len(fake_connector.requests) <= 4


async def test_the_retry_policy_can_be_overridden_per_call(client, fake_connector):
    fake_connector.script("POST", "activities$", [Reply(503)] * 5)

    with pytest.raises(ConnectorError):
        await client.send_to_conversation(
            fake_connector.url, "a:1", {"type": "message"}, retry=RetryPolicy(max_attempts=2)
        )
    assert len(fake_connector.requests) == 2


def test_backoff_is_capped_and_jittered():
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0, jitter=0.5)
    assert policy.backoff(1, rand=lambda: 0.0) == 0.5
    assert policy.backoff(10, rand=lambda: 0.0) == 4.0
    assert policy.backoff(10, rand=lambda: 1.0) == 2.0


def test_retry_after_parsing():
    now = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:05 GMT", now=lambda: now) == 5.0
    assert parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now=lambda: now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# --- errors --------------------------------------------------------------------------

TEAMS_209 = (
    '{"errorCode":209,"message":"{\\r\\n  \\"subCode\\": \\"MessageWritesBlocked\\",\\r\\n  '
    '\\"details\\": \\"Thread is blocked from message writes.\\",\\r\\n  \\"errorCode\\": null,'
    '\\r\\n  \\"errorSubCode\\": null\\r\\n}"}'
)


def error(code: str, message: str = "") -> str:
    return json.dumps({"error": {"code": code, "message": message}})


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (
            403,
            error("BotNotInConversationRoster", "The bot is not part of the conversation roster."),
            ErrorKind.GONE,
            "BotNotInConversationRoster",
        ),
        (
            403,
            error("ConversationBlockedByUser", "User blocked the conversation with the bot."),
            ErrorKind.GONE,
            "ConversationBlockedByUser",
        ),
        (
            403,
            error("BotDisabledByAdmin", "The tenant admin disabled this bot"),
            ErrorKind.GONE,
            "BotDisabledByAdmin",
        ),
        (
            403,
            error("ForbiddenOperationException", "Bot is not installed in user's personal scope"),
            ErrorKind.GONE,
            "ForbiddenOperationException",
        ),
        (403, TEAMS_209, ErrorKind.GONE, "MessageWritesBlocked"),
        # Teams' 209 is gone whatever its inner document says: none, or a subCode not
        # known yet (kept as the code, so an operator sees which).
        (403, '{"errorCode": 209, "message": "{}"}', ErrorKind.GONE, "209"),
        (
            403,
            '{"errorCode": 209, "message": "{\\"subCode\\": \\"SomethingNew\\"}"}',
            ErrorKind.GONE,
            "SomethingNew",
        ),
        (
            404,
            error("ConversationNotFound", "Conversation not found."),
            ErrorKind.GONE,
            "ConversationNotFound",
        ),
        (
            413,
            error("MessageSizeTooBig", "Message size too large."),
            ErrorKind.INVALID,
            "MessageSizeTooBig",
        ),
        (400, error("BadArgument", "Unknown activity type"), ErrorKind.INVALID, "BadArgument"),
        (403, error("Forbidden", "Something else"), ErrorKind.INVALID, "Forbidden"),
        (404, "Not Found", ErrorKind.INVALID, None),
        # Nested deeper than the parser goes: RecursionError escaped the classification.
        (400, "[" * 100_000 + "]" * 100_000, ErrorKind.INVALID, None),
    ],
)
async def test_error_bodies_are_classified(client, fake_connector, status, body, kind, code):
    fake_connector.script("POST", "activities$", [Reply(status, body=body)])

    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(fake_connector.url, CONVERSATION, {"type": "message"})

    assert (caught.value.kind, caught.value.status, caught.value.code) == (kind, status, code)
    assert len(fake_connector.requests) == 1  # terminal: never retried
    assert caught.value.terminal is (kind is ErrorKind.GONE)


async def test_a_send_answered_with_json_deeper_than_the_parser_goes_is_delivered(
    client, fake_connector
):
    # The answer's body says nothing the send needs: the message was posted (2xx), so
    # it is a success, and it is not sent again; RecursionError escaped the parse.
    fake_connector.script("POST", "activities$", [Reply(201, body="[" * 100_000)])

    with collector_paused():
        sent = await client.send_to_conversation(
            fake_connector.url, CONVERSATION, {"type": "message"}
        )

    assert sent == {}
    assert len(fake_connector.requests) == 1


def test_teams_nested_error_body_is_parsed():
    code, message, teams_code = parse_error_body(TEAMS_209.encode())
    assert (code, teams_code) == ("MessageWritesBlocked", 209)
    assert message == "Thread is blocked from message writes."
    assert parse_error_body(b"<html>Bad gateway</html>") == (None, "<html>Bad gateway</html>", None)
    assert parse_error_body(b'{"code":"X","message":"y"}') == ("X", "y", None)
    deep_inner = json.dumps({"errorCode": 209, "message": '{"a":' + "[" * 100_000})
    assert parse_error_body(deep_inner.encode())[0] == "209"


# --- trusted serviceUrls -------------------------------------------------------------

UNTRUSTED = [
    "http://smba.trafficmanager.net/amer/",  # plain http to a non-loopback host
    "https://smba.trafficmanager.net.evil.example/amer/",
    "https://evilbotframework.com/",
    "https://botframework.com.evil.example/",
    "https://smba.trafficmanager.net@evil.example/",
    "https://user:pw@smba.trafficmanager.net/",
    "https://smba.trafficmanager.net:8443/amer/",
    "https://evil.example/?https://smba.trafficmanager.net/",
    "https://evil.example#@smba.trafficmanager.net/",
    "https://evil.example\\@smba.trafficmanager.net/",
    "https://trafficmanager.net/",
    "ftp://smba.trafficmanager.net/",
    "//smba.trafficmanager.net/",
    "https://smba.trafficmanager.net./",
    "",
]


@pytest.mark.parametrize("service_url", UNTRUSTED)
async def test_untrusted_service_urls_are_refused_before_anything_is_sent(
    client, fake_connector, fake_aad, aad_app, service_url
):
    assert not client.is_trusted(service_url)
    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(service_url, "a:1", {"type": "message"})

    assert caught.value.kind is ErrorKind.UNTRUSTED
    assert fake_aad.issued[aad_app.app_id] == 0 and aad_app.app_id not in fake_aad.last_request


async def test_a_listening_server_outside_the_trusted_set_receives_nothing(
    client, fake_connector, fake_aad, aad_app
):
    with FakeConnector() as other:
        with pytest.raises(ConnectorError) as caught:
            await client.send_to_conversation(other.url, "a:1", {"type": "message"})
        assert other.requests == []
    assert caught.value.kind is ErrorKind.UNTRUSTED
    assert fake_aad.issued.total() == 0


@pytest.mark.parametrize(
    "service_url",
    [
        "https://smba.trafficmanager.net/amer/",
        "https://smba.trafficmanager.net/teams/",
        "https://smba.infra.gcc.teams.microsoft.com/teams",
        "https://webchat.botframework.com/",
        "https://europe.directline.botframework.com/v3/",
        "https://SMBA.TrafficManager.net:443/emea/",
    ],
)
def test_bot_framework_and_teams_hosts_are_trusted(settings, service_url):
    assert ConnectorClient(settings, None).is_trusted(service_url)


def test_usgov_trusts_its_own_bot_framework_hosts():
    settings = Settings.from_env(
        {"MicrosoftAppId": "a", "MicrosoftAppPassword": "p", "BOT_CHANNEL_SERVICE": "usgov"}
    )
    client = ConnectorClient(settings, None)
    assert client.is_trusted("https://webchat.botframework.azure.us/")
    assert client.is_trusted("https://smba.infra.gov.teams.microsoft.us/teams")
    assert not client.is_trusted("https://webchat.botframework.com/")


@pytest.mark.parametrize(
    ("prefix", "url", "trusted"),
    [
        ("http://127.0.0.1:80", "http://127.0.0.1:80/v3/", True),
        ("http://127.0.0.1:80", "http://127.0.0.1:8080/", False),
        ("http://127.0.0.1:80", "http://127.0.0.1/", True),  # default port
        ("http://localhost:3978/bot", "http://localhost:3978/bot/x", True),
        ("http://localhost:3978/bot", "http://localhost:3978/bot", True),
        ("http://localhost:3978/bot", "http://localhost:3978/bot2/", False),
        ("http://localhost:3978/bot/", "http://localhost:3978/botx", False),
        ("https://connector.contoso.com/teams", "https://connector.contoso.com/teams/v3", True),
        ("https://connector.contoso.com/teams", "http://connector.contoso.com/teams/v3", False),
        ("https://connector.contoso.com", "https://x.connector.contoso.com/", False),
    ],
)
def test_trusted_prefixes_match_scheme_host_port_and_whole_segments(prefix, url, trusted):
    settings = Settings.from_env(
        {"MicrosoftAppId": "a", "MicrosoftAppPassword": "p", "BOT_TRUSTED_SERVICE_URLS": prefix}
    )
    assert ConnectorClient(settings, None).is_trusted(url) is trusted


async def test_unauthenticated_local_mode_sends_no_token_and_only_to_loopback(fake_connector):
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    connector = ConnectorClient(settings, create_token_provider(settings))
    try:
        await connector.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
        assert not connector.is_trusted("https://smba.trafficmanager.net/amer/")
    finally:
        await connector.close()
    assert fake_connector.requests[0].authorization is None


# --- logs ----------------------------------------------------------------------------


async def test_the_token_never_appears_in_logs(client, fake_connector, fake_aad, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, msal's and aiohttp's included
    caplog.set_level(logging.DEBUG, logger="msal")  # the app silences it otherwise
    fake_connector.script(
        "POST",
        "activities$",
        [Reply(401), Reply(429, headers={"Retry-After": "1"}), Reply(403, body=TEAMS_209)],
    )
    with pytest.raises(ConnectorError):
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
    await client.get_conversation_members(fake_connector.url, "a:1")

    tokens = [issuance.token for issuance in fake_aad.issuances]
    assert len(tokens) == 2
    for token in tokens:
        assert token not in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.name == "shared.connector"]
    assert any("sendToConversation status=429 attempt=2" in line for line in lines)
    assert any("getConversationMembers status=200" in line for line in lines)


# --- pacing against the fake Connector's enforcement ----------------------------------


def paced_client(
    aad_app, vtime: VirtualTime, pacer: Pacer, fake: FakeConnector, **options
) -> ConnectorClient:
    """The real client of paced_fake's parts: trusting the fake, on their virtual time."""
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake.url)
    return ConnectorClient(
        settings,
        create_token_provider(settings),
        pacer=pacer,
        sleep=vtime.sleep,
        clock=vtime.clock,
        **options,
    )


def paced_fake(**fake_options) -> tuple[VirtualTime, Pacer, FakeConnector]:
    """A fake Connector, a pacer and virtual time shared by both.

    Time only moves once every request the pacer let go has reached the fake, so the
    fake stamps each arrival with the virtual time at which the client sent it.
    """
    parts: dict = {}
    vtime = VirtualTime(gate=lambda: len(parts["fake"].requests) >= parts["pacer"].granted)
    parts["pacer"] = Pacer(50, clock=vtime.clock, sleep=vtime.sleep)
    parts["fake"] = FakeConnector(clock=vtime.clock, **fake_options)
    return vtime, parts["pacer"], parts["fake"]


async def test_100_sends_to_one_conversation_never_exceed_the_teams_windows(aad_app):
    vtime, pacer, fake = paced_fake(enforce_limits=True)
    with fake:
        # The pacing waits count: allow them.
        connector = paced_client(
            aad_app, vtime, pacer, fake, retry=RetryPolicy(max_total_seconds=60.0)
        )
        try:
            await asyncio.gather(
                *(
                    connector.send_to_conversation(
                        fake.url, CONVERSATION, {"channelId": "msteams", "text": str(n)}
                    )
                    for n in range(100)
                )
            )
        finally:
            await connector.close()

        assert fake.violations == []
        assert [r.status for r in fake.requests] == [200] * 100
        assert [a["text"] for a in fake.activities] == [str(n) for n in range(100)]  # in order
        assert vtime.now - 1000.0 < 45  # paced, not stalled: 100 sends take 30-40 s


async def test_a_teams_broadcast_stays_under_the_tenant_limit_and_replies_are_not_held(aad_app):
    vtime, pacer, fake = paced_fake(enforce_limits=True, tenant_limit=Window(50, 1.0))
    with fake:
        connector = paced_client(aad_app, vtime, pacer, fake)
        background = connector.background()
        workers = asyncio.Semaphore(50)

        def teams_activity(n: int, tenant: str) -> dict:
            conversation = {"id": f"a:{n}", "tenantId": tenant}
            return {"channelId": "msteams", "conversation": conversation, "text": str(n)}

        waited: list[float] = []

        async def send(n: int):
            async with workers:
                await background.send_to_conversation(
                    fake.url, f"a:{n}", teams_activity(n, f"t{n % 2}")
                )
            if n % 100 == 50:  # now and then a user's turn, answered during the broadcast
                asked = vtime.now
                await connector.reply_to_activity(fake.url, f"a:u{n}", "1", teams_activity(n, "t0"))
                # Stamped at the fake with the virtual time it was sent at: how long the
                # reply waited before it left (time moves on while its answer comes back).
                sent = next(r.time for r in fake.requests if r.conversation_id == f"a:u{n}")
                waited.append(sent - asked)

        try:
            await asyncio.gather(*(send(n) for n in range(1000)))
            finished = vtime.now
        finally:
            await connector.close()

        assert fake.violations == []
        assert len(fake.activities) == 1010
        for tenant in ("t0", "t1"):
            times = sorted(
                r.time for r in fake.requests if r.json["conversation"]["tenantId"] == tenant
            )
            assert all(times[i + 50] - times[i] >= 1.0 for i in range(len(times) - 50))
        # Two tenants at 48.5/s each: 1000 in about 10.3 s, not the 20 s of a per-process cap.
        assert finished - 1000.0 < 12
        # The replies found headroom: none waited for the broadcast.
        assert len(waited) == 10 and max(waited) < 0.05


async def test_one_tenant_named_in_two_cases_is_paced_as_one(aad_app):
    # A producer's user target may name the tenant in capitals (and the 1:1 it opens is
    # stored so), while Teams writes it in lower case: two lanes sent it ~98/s.
    vtime, pacer, fake = paced_fake()
    tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    with fake:
        connector = paced_client(
            aad_app, vtime, pacer, fake, retry=RetryPolicy(max_total_seconds=60.0)
        )
        background = connector.background()

        async def send(n: int) -> None:
            named = tenant.upper() if n % 2 else tenant
            conversation = {"id": f"a:{n}", "tenantId": named}
            activity = {"channelId": "msteams", "conversation": conversation, "text": str(n)}
            await background.send_to_conversation(fake.url, f"a:{n}", activity)

        try:
            await asyncio.gather(*(send(n) for n in range(300)))
        finally:
            await connector.close()

    times = sorted(r.time for r in fake.requests)
    assert len(times) == 300
    assert all(times[i + 50] - times[i] >= 1.0 for i in range(len(times) - 50))


async def test_a_429_from_the_tenant_limit_slows_that_tenant_down(aad_app):
    vtime, pacer, fake = paced_fake(tenant_limit=Window(10, 1.0))  # the app thinks 50/s
    with fake:
        connector = paced_client(
            aad_app, vtime, pacer, fake, retry=RetryPolicy(max_total_seconds=60.0)
        )
        background = connector.background()
        try:
            for n in range(100):
                activity = {"channelId": "msteams", "conversation": {"id": f"a:{n}"}}
                await background.send_to_conversation(fake.url, f"a:{n}", activity)
        finally:
            await connector.close()
        assert len(fake.activities) == 100  # every one delivered, after retries
        assert pacer.cuts >= 2 and pacer.throttled_count == len(fake.violations)
        assert len(fake.violations) < 15  # it learnt: not one 429 per send


async def test_a_client_without_pacing_is_caught_by_the_fake(aad_app):
    # The enforcement the pacing tests rely on is real: a burst with pacing off gets 429s.
    with FakeConnector(enforce_limits=True) as fake:
        settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake.url)
        connector = ConnectorClient(
            settings,
            create_token_provider(settings),
            pacer=Pacer(10_000, windows=(Window(10_000, 1.0),)),
            retry=RetryPolicy(max_attempts=1),
        )
        activity = {"type": "message", "channelId": "msteams"}
        try:
            results = await asyncio.gather(
                *(connector.send_to_conversation(fake.url, "a:1", activity) for _ in range(10)),
                return_exceptions=True,
            )
        finally:
            await connector.close()
        throttled = [r for r in results if isinstance(r, ConnectorError)]
        assert {e.kind for e in throttled} == {ErrorKind.THROTTLED}
        assert len(throttled) == 3 and len(fake.violations) == 3  # 7 per second pass


# --- the session ---------------------------------------------------------------------


async def test_an_injected_session_is_used_and_left_open(settings, fake_connector):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        connector = ConnectorClient(settings, create_token_provider(settings), session=session)
        await connector.get_conversation_members(fake_connector.url, "a:1")
        await connector.close()
        assert not session.closed
    assert fake_connector.requests[0].operation == "getConversationMembers"


# --- when a request left: what the tenant's window is kept by ---------------------------------


def teams_reply(n: int) -> dict:
    return {"channelId": "msteams", "conversation": {"id": f"a:{n}", "tenantId": "t1"}}


def tenant_lane(connector: ConnectorClient):
    return connector.pacer.lane(Scope(channel_id="msteams", tenant_id="t1"))


async def test_a_request_with_a_slow_answer_is_counted_from_when_it_left(settings, fake_connector):
    # The Connector took 300 ms to answer the third send, after two quick ones: the
    # request left on time, so the tenant's window counts it from then. Judged from its
    # round trip, it was taken to have left ~300 ms late and held the window for nothing.
    fake_connector.script(
        "POST", "activities$", [Reply(200), Reply(200), Reply(200, json={"id": "3"}, delay=0.3)]
    )
    connector = ConnectorClient(settings, create_token_provider(settings))
    try:
        for n in range(3):
            await connector.send_to_conversation(fake_connector.url, f"a:{n}", teams_reply(n))
        answered = time.monotonic()
    finally:
        await connector.close()
    lane = tenant_lane(connector)
    granted, arrived = lane.used_at, fake_connector.requests[-1].time
    assert answered - granted >= 0.3  # the answer really was slow
    assert len(lane.counted) == 3
    assert granted <= lane.counted[-1] <= arrived


async def test_a_request_with_a_body_is_written_once_though_stamped_per_chunk(fake_connector):
    # Its headers, then its body's chunk, stamp its departure; aiohttp wrote it once.
    from shared.connector.transport import Departure

    async with aiohttp.ClientSession(trace_configs=[departure_tracing()]) as session:
        for method, body in (("POST", b'{"type": "message"}'), ("DELETE", None)):
            departure = Departure(time.monotonic)
            path = "/v3/conversations/a%3A1/activities" + ("/1" if body is None else "")
            async with session.request(
                method, fake_connector.url + path, data=body, trace_request_ctx=departure
            ):
                pass
            assert departure.writes == 1 and departure.at is not None


async def test_a_request_that_waited_for_a_connection_is_counted_from_when_it_left(
    settings, fake_connector
):
    # One pooled connection: the second send, granted with the first, can only leave once
    # the first is answered (300 ms). The channel counts it from then, and so does the
    # tenant's window, in a session given to the client with the departure tracing.
    fake_connector.script("POST", "activities$", [Reply(200), Reply(200, delay=0.3), Reply(200)])
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), trace_configs=[departure_tracing()]
    )
    connector = ConnectorClient(settings, create_token_provider(settings), session=session)
    try:
        await connector.send_to_conversation(fake_connector.url, "a:0", teams_reply(0))  # warm
        lane = tenant_lane(connector)
        await asyncio.gather(
            *(
                connector.send_to_conversation(fake_connector.url, f"a:{n}", teams_reply(n))
                for n in (1, 2)
            )
        )
    finally:
        await session.close()
    first, second = sorted(fake_connector.requests[1:], key=lambda r: r.time)
    granted = lane.used_at  # both were granted at once, the second last
    assert second.time - granted >= 0.3
    assert lane.counted[-2] <= first.time
    assert granted + 0.25 <= lane.counted[-1] <= second.time


async def test_the_tenant_window_learns_a_departure_before_the_answer(settings, fake_connector):
    # Both sends take 300 ms to answer, over one pooled connection: the second leaves
    # when the first is answered. While its own answer is still on the way, the window
    # already counts it from then: a lane told only once answered would count it from
    # its grant until then, and with round trips near a second a request that left late
    # would reach Teams in the same second as ones granted a second after it.
    fake_connector.script(
        "POST", "activities$", [Reply(200), Reply(200, delay=0.3), Reply(200, delay=0.3)]
    )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), trace_configs=[departure_tracing()]
    )
    connector = ConnectorClient(settings, create_token_provider(settings), session=session)
    counted: list[tuple[float, ...]] = []

    async def look_while_the_second_is_answered() -> None:
        async with asyncio.timeout(10):
            while len(fake_connector.requests) < 3:  # noqa: ASYNC110 - the fake is a thread
                await asyncio.sleep(0.005)
        counted.append(tenant_lane(connector).counted)

    try:
        await connector.send_to_conversation(fake_connector.url, "a:0", teams_reply(0))  # warm
        await asyncio.gather(
            connector.send_to_conversation(fake_connector.url, "a:1", teams_reply(1)),
            connector.send_to_conversation(fake_connector.url, "a:2", teams_reply(2)),
            look_while_the_second_is_answered(),
        )
    finally:
        await session.close()
    granted = tenant_lane(connector).used_at
    second = fake_connector.requests[2]
    assert granted + 0.25 <= counted[0][-1] <= second.time


# --- redirects: only attachment views follow them, and never with the token off the set ---


async def test_only_attachment_views_follow_redirects(client, fake_connector):
    with FakeConnector() as other:
        fake_connector.script(
            "GET", "members$", [Reply(302, headers={"Location": f"{other.url}/v3/x"})]
        )
        with pytest.raises(ConnectorError) as caught:
            await client.get_conversation_members(fake_connector.url, "a:1")
        assert other.requests == []
    assert (caught.value.kind, caught.value.status) == (ErrorKind.INVALID, 302)


async def test_an_attachment_redirect_to_another_host_carries_no_token(client, fake_connector):
    with FakeConnector(redirect_attachments=False) as other:
        other.attachments["blob"] = {"originalBase64": "aGk="}
        location = f"{other.url}/v3/attachments/blob/views/original"
        fake_connector.script("GET", "views", [Reply(302, headers={"Location": location})])

        assert await client.get_attachment(fake_connector.url, "att", "original") == b"hi"

        (elsewhere,) = other.requests
    assert fake_connector.requests[0].authorization.startswith("Bearer ")
    assert elsewhere.authorization is None


async def test_a_refusal_where_an_attachment_redirect_led_is_not_the_connector_s(
    fake_connector, fake_aad, aad_app
):
    # The bot's token was not sent there: no forced refresh, no setting named.
    with FakeConnector(redirect_attachments=False) as other:
        refusal = Reply(401, json={"error": {"code": "AuthenticationFailed", "message": "SAS"}})
        other.script("GET", "", [refusal] * 3)
        location = f"{other.url}/blob/x"
        fake_connector.script("GET", "views", [Reply(302, headers={"Location": location})] * 3)
        settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url)
        client = ConnectorClient(settings, create_token_provider(settings))
        try:
            with pytest.raises(ConnectorError) as caught:
                await client.get_attachment(fake_connector.url, "att", "original")
        finally:
            await client.close()
        assert [request.authorization for request in other.requests] == [None]
    assert (caught.value.kind, caught.value.status) == (ErrorKind.INVALID, 401)
    assert caught.value.setting is None and "redirected" in caught.value.message
    assert fake_aad.issued[aad_app.app_id] == 1
    assert len(fake_connector.requests) == 1


async def test_a_redirect_out_of_the_trusted_path_prefix_carries_no_token(fake_connector, aad_app):
    # Same host and port, but outside the configured prefix: aiohttp alone keeps the header.
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=f"{fake_connector.url}/bot")
    fake_connector.attachments["x"] = {"originalBase64": "aGk="}
    fake_connector.redirect_attachments = False
    location = "/elsewhere/v3/attachments/x/views/original"
    fake_connector.script("GET", "^/bot/", [Reply(302, headers={"Location": location})])
    connector = ConnectorClient(settings, create_token_provider(settings))
    try:
        assert await connector.get_attachment(f"{fake_connector.url}/bot", "x", "original") == b"hi"
    finally:
        await connector.close()
    first, second = fake_connector.requests
    assert first.raw_path.startswith("/bot/") and first.authorization
    assert second.raw_path.startswith("/elsewhere/") and second.authorization is None


async def test_a_redirect_within_the_trusted_prefix_keeps_the_token(client, fake_connector):
    fake_connector.attachments["x"] = {"originalBase64": "aGk="}  # the fake redirects in-origin

    assert await client.get_attachment(fake_connector.url, "x", "original") == b"hi"
    (view,) = fake_connector.requests
    assert view.raw_path.startswith("/v3/attachments/")
    assert fake_connector.blob_fetches == [("/_blobs/x/original", view.authorization)]
    assert view.authorization.startswith("Bearer ")


async def test_a_redirect_is_requested_with_its_percent_encoding_as_written(client, fake_connector):
    # `%3B` and `;` are different paths to a server that reads path parameters.
    with FakeConnector(redirect_attachments=False) as other:
        other.script("GET", "", [Reply(200, body=b"hi")] * 2)
        path = "/blobs/att%3B1%3A2%40x/original%3Bv%3D2"
        fake_connector.script(
            "GET",
            "views",
            [
                Reply(302, headers={"Location": f"{other.url}{path}?sig=a%2Bb%3D"}),
                Reply(302, headers={"Location": f"{other.url}/blobs/é v"}),
            ],
        )

        assert await client.get_attachment(fake_connector.url, "a", "original") == b"hi"
        assert await client.get_attachment(fake_connector.url, "b", "original") == b"hi"

        encoded, unicode = other.requests
    assert encoded.raw_path == path
    assert unicode.raw_path == "/blobs/%C3%A9%20v"  # not ASCII: encoded before it is asked


async def test_a_redirect_to_its_own_origin_spelt_in_capitals_keeps_the_token(aad_app):
    with FakeConnector(host="localhost") as fake:
        base = fake.url.replace("127.0.0.1", "localhost")
        settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=base)
        fake.attachments["x"] = {"originalBase64": "aGk="}
        fake.redirect_attachments = False
        location = base.replace("localhost", "LOCALHOST") + "/_blobs/x/original"
        fake.script("GET", "views", [Reply(302, headers={"Location": location})])
        connector = ConnectorClient(settings, create_token_provider(settings))
        try:
            assert await connector.get_attachment(base, "x", "original") == b"hi"
        finally:
            await connector.close()
        [(path, authorization)] = fake.blob_fetches
    assert path == "/_blobs/x/original" and authorization.startswith("Bearer ")


async def test_a_redirect_loop_gives_up(client, fake_connector):
    loop = Reply(302, headers={"Location": "/v3/attachments/x/views/original"})
    fake_connector.script("GET", "views", [loop] * 50)

    with pytest.raises(ConnectorError) as caught:
        await client.get_attachment(fake_connector.url, "x", "original")

    assert caught.value.kind is ErrorKind.INVALID
    assert len(fake_connector.requests) <= 6


@pytest.mark.parametrize("location", ["ftp://127.0.0.1/x", "file:///etc/passwd"])
async def test_a_redirect_to_another_scheme_is_refused(client, fake_connector, location):
    fake_connector.script("GET", "views", [Reply(302, headers={"Location": location})])

    with pytest.raises(ConnectorError) as caught:
        await client.get_attachment(fake_connector.url, "x", "original")
    assert caught.value.kind is ErrorKind.INVALID


@pytest.mark.parametrize(
    ("location", "keeps_token"),
    [
        ("https://smba.trafficmanager.net:443/amer/v3/attachments/x/views/y", True),
        ("https://SMBA.trafficmanager.net/amer/v3/attachments/x/views/y", True),
        ("https://smba.trafficmanager.net:8443/amer/v3/attachments/x/views/y", False),
        ("http://smba.trafficmanager.net:443/amer/v3/x", None),  # refused: not https
        # From a Connector on the internet, never to this machine's own plain-http ports.
        ("http://127.0.0.1:8081/admin/x", None),
        ("http://localhost/x", None),
    ],
)
def test_a_redirect_s_origin_is_its_scheme_host_and_port_however_written(
    settings, location, keeps_token
):
    # A Teams serviceUrl on :443 cannot be served here, so the redirect step alone is run,
    # with the client's own trust check.
    is_trusted = ConnectorClient(settings, None).is_trusted
    url = yarl.URL("https://smba.trafficmanager.net/amer/v3/attachments/x/views/original")
    headers = {"Authorization": "Bearer token", "Accept": "*/*"}
    if keeps_token is None:
        with pytest.raises(ConnectorError):
            follow_redirect("get_attachment", url, location, headers, is_trusted)
        return
    target, sent = follow_redirect("get_attachment", url, location, headers, is_trusted)
    assert ("Authorization" in sent) is keeps_token
    assert target.port == yarl.URL(location).port


# --- trust: look-alike URLs and configured path prefixes ------------------------------

LOOK_ALIKES = [
    "https://evil.example%23.smba.trafficmanager.net/",  # percent-encoded host characters
    "https://evil.example%2f.smba.trafficmanager.net/",
    "https://x%40evil.smba.trafficmanager.net/",
    "https://smba.trafficmanager.net\x7f/",
    "https://smba.trafficmanager.n\u0435t/",  # Cyrillic e (IDN homograph)
    "https://smba\uff0etrafficmanager.net/",  # full-width dot
    "https://xn--smba-trafficmanager-net.evil/",
    "https://smba.trafficmanager.net /amer/",
    " https://smba.trafficmanager.net/amer/",
    "https://smba.trafficmanager.net/amer/\n",
    "https://smba.trafficmanager.net:443@evil.example/",
    "https://smba.trafficmanager.net;@evil.example/",
    "https://SMBA.TRAFFICMANAGER.NET.evil.example/",
    "https://smba.trafficmanager.net.:443/",
    # Traffic Manager's shared zone: a customer's profile can be named under Teams' host.
    "https://attacker-profile.smba.trafficmanager.net/amer/",
    "https://x.smba.onyx.prod.teams.trafficmanager.net/amer/",
    "https://x.smba.infra.gcc.teams.microsoft.com/teams/",
    "https://botframework.com.evil.example/",
    "https://evilbotframework.com/",
]


@pytest.mark.parametrize("service_url", LOOK_ALIKES)
def test_look_alike_service_urls_are_refused(settings, service_url):
    assert not ConnectorClient(settings, None).is_trusted(service_url)


@pytest.mark.parametrize(
    "url",
    [
        "https://connector.contoso.com/teams/../admin/",
        "https://connector.contoso.com/teams/./../admin/",
        "https://connector.contoso.com/teams/%2e%2e/admin/",
        "https://connector.contoso.com/teams/%2E%2E/admin/",
        "https://connector.contoso.com/teams/..%2Fadmin/",
        "https://connector.contoso.com/teams/x%2F..%2F..%2Fadmin/",
        "https://connector.contoso.com/teams/x%5C..%5C..%5Cadmin/",
        "https://connector.contoso.com/teams%2F..%2Fadmin/",
        # Servers that strip path parameters (";...") read these segments as "..", ".".
        "https://connector.contoso.com/teams/..;/admin/",
        "https://connector.contoso.com/teams/..;x=1/admin/",
        "https://connector.contoso.com/teams/.;/..;/admin/",
    ],
)
def test_a_path_prefix_cannot_be_escaped(url):
    settings = Settings.from_env(
        {
            "MicrosoftAppId": "a",
            "MicrosoftAppPassword": "p",
            "BOT_TRUSTED_SERVICE_URLS": "https://connector.contoso.com/teams",
        }
    )
    assert not ConnectorClient(settings, None).is_trusted(url)


async def test_a_dot_segment_never_reaches_the_connector(fake_connector, aad_app):
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=f"{fake_connector.url}/bot")
    connector = ConnectorClient(settings, create_token_provider(settings))
    try:
        with pytest.raises(ConnectorError) as caught:
            await connector.send_to_conversation(
                f"{fake_connector.url}/bot/../admin", "a:1", {"type": "message"}
            )
    finally:
        await connector.close()
    assert caught.value.kind is ErrorKind.UNTRUSTED
    assert fake_connector.requests == []


@pytest.mark.parametrize("conversation_id", ["a:\ud800", "\udfff", "x\udc80y"])
async def test_a_lone_surrogate_in_an_id_is_a_clear_error_and_nothing_is_sent(
    client, fake_connector, conversation_id
):
    calls = [
        client.send_to_conversation(fake_connector.url, conversation_id, {"type": "message"}),
        client.reply_to_activity(fake_connector.url, "a:1", conversation_id, {"type": "message"}),
        client.get_conversation_members(fake_connector.url, conversation_id),
        client.get_attachment_info(fake_connector.url, conversation_id),
    ]
    for call in calls:
        with pytest.raises(ConnectorError) as caught:
            await call
        assert caught.value.kind is ErrorKind.INVALID
        assert not caught.value.retryable
    assert fake_connector.requests == []


async def test_a_lone_surrogate_in_a_paging_token_is_a_clear_error_and_nothing_is_sent(
    client, fake_connector
):
    # A token handed back from an answer that carried `\ud800` raised a UnicodeEncodeError.
    calls = [
        client.get_conversations(fake_connector.url, "\ud800x"),
        client.get_conversation_paged_members(
            fake_connector.url, "a:1", continuation_token="\ud800"
        ),
    ]
    for call in calls:
        with pytest.raises(ConnectorError) as caught:
            await call
        assert caught.value.kind is ErrorKind.INVALID and caught.value.operation is not None
    assert fake_connector.requests == []


@pytest.mark.parametrize(
    "paging",
    [
        {"continuation_token": {"continuationToken": "x"}},  # the whole page, not its token
        {"continuation_token": ["a"]},
        {"continuation_token": 7},
        {"page_size": True},
        {"page_size": 1.5},
        {"page_size": 0},
        {"page_size": "100"},
    ],
)
async def test_paging_values_that_are_not_what_the_api_takes_are_refused_and_nothing_sent(
    client, fake_connector, paging
):
    # A dict given as the token went out as its Python text; `True` as a page size, "True".
    with pytest.raises(ConnectorError) as caught:
        await client.get_conversation_paged_members(fake_connector.url, "a:1", **paging)
    assert caught.value.kind is ErrorKind.INVALID
    assert fake_connector.requests == []


# Every path parameter of the Connector API, each given a dot segment in turn.
DOT_ID_CALLS = {
    "sendToConversation": lambda c, u, x: c.send_to_conversation(u, x, {"type": "message"}),
    "replyToActivity": lambda c, u, x: c.reply_to_activity(u, "a:1", x, {"type": "message"}),
    "updateActivity": lambda c, u, x: c.update_activity(u, x, "1", {"type": "message"}),
    "deleteActivity": lambda c, u, x: c.delete_activity(u, "a:1", x),
    "sendConversationHistory": lambda c, u, x: c.send_conversation_history(u, x, {}),
    "getActivityMembers": lambda c, u, x: c.get_activity_members(u, "a:1", x),
    "getConversationMembers": lambda c, u, x: c.get_conversation_members(u, x),
    "getConversationPagedMembers": lambda c, u, x: c.get_conversation_paged_members(u, x),
    "getConversationMember": lambda c, u, x: c.get_conversation_member(u, "a:1", x),
    "deleteConversationMember": lambda c, u, x: c.delete_conversation_member(u, x, "29:u"),
    "uploadAttachment": lambda c, u, x: c.upload_attachment(u, x, {}),
    "getAttachmentInfo": lambda c, u, x: c.get_attachment_info(u, x),
    "getAttachment": lambda c, u, x: c.get_attachment(u, "att-1", x),
}


@pytest.mark.parametrize("dots", ["", ".", ".."])
@pytest.mark.parametrize("operation", list(DOT_ID_CALLS))
async def test_an_id_that_is_empty_or_a_dot_segment_is_invalid_and_nothing_is_sent(
    client, fake_connector, operation, dots
):
    # `/v3/conversations/../activities` is another operation to a server that resolves
    # dot segments, so the request would not go to the URL that was checked; an empty id
    # (`/v3/conversations//activities`, `.../activities/`) names no resource at all.
    with pytest.raises(ConnectorError) as caught:
        await DOT_ID_CALLS[operation](client, fake_connector.url, dots)
    assert caught.value.kind is ErrorKind.INVALID
    assert not caught.value.retryable
    assert fake_connector.requests == []


@pytest.mark.parametrize("operation", list(DOT_ID_CALLS))
async def test_an_id_that_is_not_a_string_is_invalid_and_nothing_is_sent(
    client, fake_connector, operation
):
    with pytest.raises(ConnectorError) as caught:
        await DOT_ID_CALLS[operation](client, fake_connector.url, 12345)
    assert caught.value.kind is ErrorKind.INVALID
    assert fake_connector.requests == []


@pytest.mark.parametrize("activity_id", ["history", "History"])
async def test_a_reply_to_an_activity_named_history_is_refused(client, fake_connector, activity_id):
    # Its URL would be sendConversationHistory's: the reply taken for a transcript upload.
    with pytest.raises(ConnectorError) as caught:
        await client.reply_to_activity(
            fake_connector.url, "a:1", activity_id, {"type": "message", "text": "hi"}
        )
    assert caught.value.kind is ErrorKind.INVALID
    assert fake_connector.requests == []


async def test_a_body_nested_past_pythons_limit_is_invalid_and_nothing_is_sent(
    client, fake_connector
):
    deep: dict = {}
    for _ in range(5000):
        deep = {"x": deep}
    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(
            fake_connector.url, "a:1", {"type": "message", "channelData": deep}
        )
    assert caught.value.kind is ErrorKind.INVALID
    assert fake_connector.requests == []


@pytest.mark.parametrize(
    ("first", "call"),
    [
        (Reply(504), "delete_activity"),
        (Reply(502), "delete_conversation_member"),
        (Reply(drop=True), "delete_activity"),
    ],
)
async def test_a_delete_whose_retry_finds_it_gone_succeeded(
    client, fake_connector, vtime, first, call
):
    # The first attempt may have been carried out before its answer was lost.
    fake_connector.script("DELETE", ".", [first, Reply(404)])

    assert await getattr(client, call)(fake_connector.url, "a:1", "2") is None
    assert len(fake_connector.requests) == 2


async def test_a_delete_answered_404_at_once_is_invalid(client, fake_connector):
    fake_connector.script("DELETE", ".", [Reply(404)])

    with pytest.raises(ConnectorError) as caught:
        await client.delete_activity(fake_connector.url, "a:1", "2")
    assert caught.value.status == 404


async def test_an_attachment_view_accepts_any_content_type(client, fake_connector):
    fake_connector.attachments[ATTACHMENT] = {"name": "x", "originalBase64": "aGk="}
    fake_connector.redirect_attachments = False
    await client.get_attachment(fake_connector.url, ATTACHMENT, "original")
    assert fake_connector.requests[-1].headers["Accept"] == "*/*"
    await client.get_attachment_info(fake_connector.url, ATTACHMENT)
    assert fake_connector.requests[-1].headers["Accept"] == "application/json"


@pytest.mark.parametrize(
    ("given", "sent"), [("...", "..."), (".a", ".a"), ("%2e%2e", "%252e%252e")]
)
async def test_ids_that_only_look_like_dots_are_sent_encoded(client, fake_connector, given, sent):
    await client.send_to_conversation(fake_connector.url, given, {"type": "message"})
    assert fake_connector.requests[-1].raw_path == f"/v3/conversations/{sent}/activities"


def test_a_prefix_with_an_encoded_slash_is_refused_and_would_trust_nothing():
    env = {
        "MicrosoftAppId": "a",
        "MicrosoftAppPassword": "p",
        "BOT_TRUSTED_SERVICE_URLS": "https://connector.contoso.com/a%2Fb",
    }
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    assert raised.value.setting == "BOT_TRUSTED_SERVICE_URLS"
    # Settings built without the check (a caller's own): the client still trusts nothing.
    settings = Settings(app_id="a", trusted_service_urls=(env["BOT_TRUSTED_SERVICE_URLS"],))
    client = ConnectorClient(settings, None)
    assert not client.is_trusted("https://connector.contoso.com/a%2Fb/")
    assert not client.is_trusted("https://connector.contoso.com/a/b/")
    assert not client.is_trusted("https://connector.contoso.com/a%2Fb/../../c/")
    assert not client.is_trusted("https://connector.contoso.com/a/")


def test_each_cloud_trusts_only_its_own_teams_hosts():
    public = ConnectorClient(Settings.from_env({"MicrosoftAppId": "a"}), None)
    usgov = ConnectorClient(
        Settings.from_env({"MicrosoftAppId": "a", "BOT_CHANNEL_SERVICE": "usgov"}), None
    )
    # GCC runs on the commercial cloud; GCC High and DoD on Azure Government.
    for url in (
        "https://smba.trafficmanager.net/teams/",
        "https://smba.onyx.prod.teams.trafficmanager.net/amer/",  # not a subdomain of it
        "https://smba.infra.gcc.teams.microsoft.com/teams",
    ):
        assert public.is_trusted(url) and not usgov.is_trusted(url)
        # A request there that names no channel (a delete) is paced as Teams traffic.
        scope = pacing_scope(parse_service_url(url), "a:1", None)
        assert scope.channel_id == "msteams"
    lookalike = "https://smba.onyx.prod.teams.trafficmanager.net.example.com/amer/"
    assert not public.is_trusted(lookalike)
    for url in (
        "https://smba.infra.gov.teams.microsoft.us/teams",
        "https://smba.infra.dod.teams.microsoft.us/teams",
    ):
        assert usgov.is_trusted(url) and not public.is_trusted(url)


# --- Retry-After: every value gives a finite, bounded wait -----------------------------


def test_retry_after_values_that_are_not_a_finite_delay_are_ignored_or_capped():
    from shared.connector import MAX_RETRY_AFTER

    now = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    for garbage in ("inf", "Infinity", "nan", "-inf", "1e400", "1_0", "0x10", "1,2", "", "  "):
        assert parse_retry_after(garbage) is None, garbage
    assert parse_retry_after("99999999") == MAX_RETRY_AFTER
    assert parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT", now=lambda: now) == MAX_RETRY_AFTER
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now=lambda: now) == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:05", now=lambda: now) is None  # no zone


async def test_an_infinite_retry_after_falls_back_to_backoff(client, fake_connector, vtime):
    fake_connector.script("POST", "activities$", [Reply(429, headers={"Retry-After": "inf"})])

    await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    assert vtime.sleeps == [0.5]
    assert [r.status for r in fake_connector.requests] == [429, 200]


# --- the total time bound covers pacing, the token and each attempt --------------------


async def test_pacing_waits_count_against_the_time_budget(settings, fake_connector, vtime):
    pacer = Pacer(1, clock=vtime.clock, sleep=vtime.sleep)  # one request per second
    connector = ConnectorClient(
        settings,
        create_token_provider(settings),
        pacer=pacer,
        retry=RetryPolicy(max_total_seconds=0.5),
        sleep=vtime.sleep,
        clock=vtime.clock,
    )
    background = connector.background()  # a Teams broadcast at 1/s for the tenant
    activity = {"channelId": "msteams", "conversation": {"tenantId": "t1"}}
    try:
        await background.send_to_conversation(fake_connector.url, "a:1", activity)
        with pytest.raises(ConnectorError) as caught:
            await background.send_to_conversation(fake_connector.url, "a:2", activity)
    finally:
        await connector.close()
    assert caught.value.kind is ErrorKind.THROTTLED and caught.value.retry_after > 0.5
    assert len(fake_connector.requests) == 1
    assert vtime.now - 1000.0 <= 0.5


async def test_a_slow_token_endpoint_counts_against_the_time_budget(
    settings, fake_connector, fake_aad
):
    fake_aad.delay = 1.5
    connector = ConnectorClient(
        settings, create_token_provider(settings), retry=RetryPolicy(max_total_seconds=0.3)
    )
    started = time.monotonic()
    try:
        with pytest.raises(ConnectorError) as caught:
            await connector.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
    finally:
        await connector.close()
    assert time.monotonic() - started < 1.0
    assert caught.value.kind is ErrorKind.TRANSIENT
    assert fake_connector.requests == []


async def test_a_slow_answer_to_a_post_counts_against_the_budget_and_is_uncertain(
    settings, fake_connector
):
    # The POST was written and may have been posted: never sent again, by the client or a
    # caller that retries transient failures.
    fake_connector.script("POST", "activities$", [Reply(delay=1.5)])
    connector = ConnectorClient(
        settings, create_token_provider(settings), retry=RetryPolicy(max_total_seconds=0.3)
    )
    started = time.monotonic()
    try:
        with pytest.raises(ConnectorError) as caught:
            await connector.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})
    finally:
        await connector.close()
    assert time.monotonic() - started < 1.0
    assert caught.value.kind is ErrorKind.UNCERTAIN
    assert len(fake_connector.requests) == 1


async def test_a_slow_answer_to_a_read_is_transient(settings, fake_connector):
    fake_connector.script("GET", "members$", [Reply(delay=1.5)])
    connector = ConnectorClient(
        settings, create_token_provider(settings), retry=RetryPolicy(max_total_seconds=0.3)
    )
    try:
        with pytest.raises(ConnectorError) as caught:
            await connector.get_conversation_members(fake_connector.url, "a:1")
    finally:
        await connector.close()
    assert caught.value.kind is ErrorKind.TRANSIENT


# --- 401: one refresh for everyone who saw the same rejected token ---------------------


async def test_401s_for_the_same_rejected_token_share_one_refresh(
    client, fake_connector, fake_aad, aad_app
):
    # 50 sends carry the same (revoked) token; their 401s come back over half a second,
    # long after the first one has refreshed it: the late ones must use the new token.
    rejected = [
        Reply(401, json={"error": {"code": "Unauthorized"}}, delay=n * 0.01) for n in range(50)
    ]
    fake_connector.script("POST", "activities$", rejected)

    await asyncio.gather(
        *(
            client.send_to_conversation(fake_connector.url, f"a:{n}", {"type": "message"})
            for n in range(50)
        )
    )

    assert fake_aad.issued[aad_app.app_id] == 2
    assert len(fake_connector.activities) == 50
    assert len({r.authorization for r in fake_connector.requests if r.status == 200}) == 1


# --- error bodies: bounded, clean, never the token --------------------------------------


@pytest.fixture
def endless() -> str:
    """A server whose answers never end: 503 with an HTML body, or 200 under ``/ok/``."""
    from aiohttp import web

    from tools.botsim.server import BackgroundServer

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200 if request.path.startswith("/ok/") else 503)
        response.content_type = "text/html"
        await response.prepare(request)
        chunk = b"<p>" + b"x" * 65536 + b"</p>\n"
        try:
            for _ in range(100_000):  # about 6 GB: only a client that stops reading is done
                await response.write(chunk)
        except ConnectionError:
            pass  # the client hung up: what these tests expect
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = BackgroundServer(app).start()
    yield server.url
    server.stop()


async def test_a_huge_error_body_is_read_only_in_part(endless, aad_app):
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=endless)
    connector = ConnectorClient(settings, create_token_provider(settings), retry=NO_RETRY)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectorError) as caught:
            await connector.send_to_conversation(endless, "a:1", {"type": "message"})
    finally:
        await connector.close()
    assert time.monotonic() - started < 5
    assert (caught.value.kind, caught.value.status) == (ErrorKind.TRANSIENT, 503)
    assert len(caught.value.message) < 400


async def test_a_huge_success_body_is_refused(endless, aad_app):
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=endless)
    connector = ConnectorClient(settings, create_token_provider(settings), retry=NO_RETRY)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectorError) as caught:
            await connector.get_attachment(f"{endless}/ok", "x", "original")
    finally:
        await connector.close()
    assert time.monotonic() - started < 10
    assert caught.value.kind is ErrorKind.INVALID


async def test_an_error_body_echoing_the_token_does_not_carry_it_on(client, fake_connector):
    class Echo:
        token = ""

    def echo(token):
        Echo.token = token or ""
        return True

    fake_connector.auth_check = echo
    await client.get_conversation_members(fake_connector.url, "a:1")
    leaked = f"Bearer {Echo.token} rejected\r\nX-Injected: 1 eyJhbGciOi.eyJzdWIiOiJ4In0.c2ln"
    fake_connector.script("POST", "activities$", [Reply(400, body=leaked)])

    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(fake_connector.url, "a:1", {"type": "message"})

    text = str(caught.value)
    assert Echo.token and Echo.token not in text
    assert "eyJzdWIiOiJ4In0" not in text
    assert "\n" not in text and "\r" not in text


async def test_cookies_from_a_connector_are_not_sent_back(client, fake_connector):
    fake_connector.script(
        "GET", "members$", [Reply(json=[], headers={"Set-Cookie": "affinity=abc; Path=/"})]
    )
    await client.get_conversation_members(fake_connector.url, "a:1")
    await client.get_conversation_members(fake_connector.url, "a:1")
    assert "Cookie" not in fake_connector.requests[1].headers


async def test_a_body_that_is_not_json_is_an_invalid_request_and_nothing_is_sent(
    client, fake_connector
):
    with pytest.raises(ConnectorError) as caught:
        await client.send_to_conversation(fake_connector.url, "a:1", {"value": float("nan")})
    assert caught.value.kind is ErrorKind.INVALID
    assert fake_connector.requests == []


# --- one client across event loops ------------------------------------------------------


def test_a_process_wide_client_works_across_event_loops(fake_connector, aad_app, fake_aad):
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url)
    connector = ConnectorClient(settings, create_token_provider(settings))

    async def send(n: int) -> None:
        await connector.send_to_conversation(fake_connector.url, "a:1", {"text": str(n)})

    for n in range(3):  # a new loop each time, as pytest-asyncio and some hosts do
        asyncio.run(send(n))
    asyncio.run(connector.close())

    assert [a["text"] for a in fake_connector.activities] == ["0", "1", "2"]
    assert fake_aad.issued[aad_app.app_id] == 1


# --- background traffic: replies do not wait for a proactive burst ----------------------


async def test_a_reply_is_not_held_up_by_a_background_burst(aad_app, fake_aad):
    with FakeConnector() as fake:
        settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake.url)
        connector = ConnectorClient(
            settings,
            create_token_provider(settings),
            pacer=Pacer(10, background_share=0.5),  # a tenant at 10/s, at most 5/s background
            retry=RetryPolicy(max_total_seconds=30.0),
        )
        background = connector.background()
        teams = {"channelId": "msteams", "conversation": {"tenantId": "t1"}}
        burst = [
            asyncio.create_task(
                background.send_to_conversation(fake.url, f"a:{n}", {**teams, "text": f"news {n}"})
            )
            for n in range(40)  # 8 s of background traffic at 5/s
        ]
        try:
            await fake.wait_for(lambda requests: len(requests) >= 5)
            await asyncio.sleep(0.3)
            asked = time.monotonic()
            await connector.reply_to_activity(fake.url, "a:user", "1", {**teams, "text": "answer"})
            took = time.monotonic() - asked
        finally:
            for task in burst:
                task.cancel()
            await asyncio.gather(*burst, return_exceptions=True)
            await background.close()  # a view: the session stays open for the client
            await connector.get_conversation_members(fake.url, "a:user")
            await connector.close()

        assert took < 1.0  # without the background class: about 4 s
        texts = [r.json["text"] for r in fake.requests if r.operation == "replyToActivity"]
        assert texts == ["answer"]
        news = [r for r in fake.requests if r.operation == "sendToConversation"]
        assert 5 <= len(news) <= 12  # the burst itself kept to its share and waited
        assert len({r.authorization for r in fake.requests}) == 1  # one token for both
        assert fake_aad.issued[aad_app.app_id] == 1


def test_background_is_one_view_of_the_same_client(settings):
    client = ConnectorClient(settings, None)
    view = client.background()
    assert client.background() is view and view.background() is view
    assert view.pacer is client.pacer
    assert view.is_trusted(settings.trusted_service_urls[0])


async def test_a_send_is_never_started_with_too_little_of_its_budget_left(aad_app):
    # A request cut short by its deadline after it was written may still be posted, and a
    # proactive send that fails transiently is sent again: a duplicate. So a send whose
    # pacing wait leaves too little of the budget for the request itself is not started.
    with FakeConnector() as fake:
        settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake.url)
        fake.script("POST", r"a%3A2/activities$", [Reply(200, json={"id": "1"}, delay=0.4)])
        connector = ConnectorClient(
            settings,
            create_token_provider(settings),
            pacer=Pacer(1.2),  # one background send per ~0.87 s in a Teams tenant
            retry=RetryPolicy(max_total_seconds=1.0),
        )
        background = connector.background()
        activity = {"type": "message", "channelId": "msteams", "conversation": {"id": "x"}}
        activity["conversation"]["tenantId"] = "t"
        try:
            await background.send_to_conversation(fake.url, "a:1", activity)
            with pytest.raises(ConnectorError) as caught:
                await background.send_to_conversation(fake.url, "a:2", activity)
        finally:
            await connector.close()
    assert caught.value.code == "PacingTimeout" and "nothing was sent" in str(caught.value)
    assert [r.conversation_id for r in fake.requests_for("sendToConversation")] == ["a:1"]
