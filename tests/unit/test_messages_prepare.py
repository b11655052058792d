"""The first request of a process starts its turn's work early (Runtime.prepare).

A production runtime (Runtime.create: the real authenticator, MSAL against botsim's
HTTPS fake AAD, botsim's Connector) with an in-memory reference store. What a user or
an operator would notice: the first echo carries a token obtained once; unauthenticated
or malformed requests never get the token sent anywhere, and cannot make the bot ask
Entra ID more than once.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from shared.bot import router
from shared.messages import UNAUTHORIZED, handle_messages
from shared.references import MemoryReferenceStore
from shared.runtime import Runtime
from tests.unit.test_messages import activity_for, post


@pytest.fixture
def settings(aad_app, identity_env, fake_connector):
    # A storage connection string only so that Runtime.create accepts the settings: the
    # store is replaced by a memory one before any call.
    return aad_app.settings(
        **identity_env,
        BOT_TRUSTED_SERVICE_URLS=fake_connector.url,
        AzureWebJobsStorage="UseDevelopmentStorage=true",
    )


@pytest.fixture
async def runtime(settings):
    # The production parts, but references in memory (no Azurite here).
    production = Runtime.create(settings, router)
    await production.references.close()
    runtime = dataclasses.replace(production, references=MemoryReferenceStore())
    yield runtime
    await runtime.close()


def token_requests(fake_aad) -> int:
    return len(fake_aad.issuances) + len(fake_aad.rejections)


async def settled(fake_aad, expected: int) -> None:
    """Wait until the fake AAD saw ``expected`` token requests (a prefetch runs beside the
    request that started it), then a moment more in case another one were coming."""
    async with asyncio.timeout(10):
        while token_requests(fake_aad) < expected:  # noqa: ASYNC110 (counted in its thread)
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)


async def echoed_with_the_one_token(
    runtime, settings, channel_identity, fake_connector, fake_aad
) -> None:
    """An authenticated turn is answered 200, and everything the bot has sent carried the
    one token the fake AAD issued."""
    token = channel_identity.mint_channel_token(settings.app_id, fake_connector.url)
    assert (
        await handle_messages(post(activity_for(fake_connector.url), token), runtime)
    ).status == 200
    [issued] = fake_aad.issuances
    assert [r.authorization for r in fake_connector.requests] == [f"Bearer {issued.token}"]


async def test_the_first_echo_carries_the_one_token_obtained(
    runtime, settings, channel_identity, fake_connector, fake_aad
):
    token = channel_identity.mint_channel_token(settings.app_id, fake_connector.url)
    for n in range(3):
        incoming = activity_for(fake_connector.url, id=f"a-{n}")
        assert (await handle_messages(post(incoming, token), runtime)).status == 200

    [issued] = fake_aad.issuances
    assert [r.authorization for r in fake_connector.requests] == [f"Bearer {issued.token}"] * 3


async def test_unauthenticated_requests_ask_for_the_token_at_most_once_and_send_it_nowhere(
    runtime, settings, channel_identity, fake_connector, fake_aad
):
    forged = channel_identity.mint_broken("unpublished_key", settings.app_id, fake_connector.url)
    for n in range(10):
        incoming = activity_for(fake_connector.url, id=f"x-{n}")
        response = await handle_messages(post(incoming, forged if n % 2 else None), runtime)
        assert (response.status, response.body) == (401, UNAUTHORIZED.encode())

    await settled(fake_aad, 1)
    assert token_requests(fake_aad) == 1  # the first well-formed request's prefetch only
    assert fake_connector.requests == []  # and the token went nowhere
    assert (await runtime.references.list()).items == []  # and nothing was recorded

    # The first authenticated turn uses the token already obtained.
    await echoed_with_the_one_token(runtime, settings, channel_identity, fake_connector, fake_aad)


async def test_malformed_requests_start_nothing(runtime, fake_connector, fake_aad):
    for body in (b"{not json", b"[]", b'{"type": "message"}'):
        response = await handle_messages(post(body=body), runtime)
        assert response.status == 400
    await asyncio.sleep(0.2)
    assert token_requests(fake_aad) == 0


async def test_a_failed_prefetch_is_asked_again_by_the_first_authenticated_turn(
    runtime, settings, channel_identity, fake_connector, fake_aad, caplog
):
    fake_aad.fail_next(count=1)
    incoming = activity_for(fake_connector.url, id="anonymous")
    assert (await handle_messages(post(incoming), runtime)).status == 401
    await settled(fake_aad, 1)
    # Ended, not only answered: a turn while the prefetch still runs shares its failure.
    # Its warning is its last step.
    async with asyncio.timeout(10):
        while "token request for app" not in caplog.text:  # noqa: ASYNC110 - a thread
            await asyncio.sleep(0.01)
    assert fake_aad.issuances == []

    await echoed_with_the_one_token(runtime, settings, channel_identity, fake_connector, fake_aad)
    assert token_requests(fake_aad) == 2
