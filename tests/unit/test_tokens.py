"""Outbound tokens: real MSAL against botsim's fake AAD over HTTPS (and its managed identity)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.auth.tokens import REFRESH_RETRY_SECONDS, TokenError, create_token_provider
from shared.config import Settings
from tests.fixtures.connector import VirtualTime
from tools.botsim.aad import AadError, FakeAAD, FakeManagedIdentity


def test_no_app_id_means_no_token_provider():
    settings = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    assert create_token_provider(settings) is None


def test_importing_the_outbound_modules_does_not_import_msal():
    code = "import sys, shared.auth.tokens, shared.connector; print('msal' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],  # the repo root
    )
    assert result.stdout.strip() == "False"


async def test_client_secret_obtains_a_token_from_the_login_authority(fake_aad, aad_app):
    provider = create_token_provider(aad_app.settings())

    token = await provider.get_token()

    assert fake_aad.is_valid_token(token)
    issuance = fake_aad.issuances[-1]
    assert (issuance.client_id, issuance.grant) == (aad_app.app_id, "secret")
    assert issuance.tenant == "botframework.com"  # MultiTenant authority
    assert issuance.scope == "https://api.botframework.com/.default"
    assert "client_secret" not in fake_aad.last_request[aad_app.app_id]


async def test_single_tenant_uses_the_tenant_authority(fake_aad, aad_app):
    tenant = str(uuid.uuid4())
    settings = aad_app.settings(MicrosoftAppType="SingleTenant", MicrosoftAppTenantId=tenant)

    await create_token_provider(settings).get_token()

    assert fake_aad.issuances[-1].tenant == tenant


async def test_us_gov_multi_tenant_uses_the_government_channel_tenant_and_scope(fake_aad, aad_app):
    # Azure Government has no botframework.com tenant: the SDKs ask its own channel tenant.
    await create_token_provider(aad_app.settings(BOT_CHANNEL_SERVICE="usgov")).get_token()

    issuance = fake_aad.issuances[-1]
    assert issuance.tenant == "MicrosoftServices.onmicrosoft.us"
    assert issuance.scope == "https://api.botframework.us/.default"


async def test_one_token_is_reused_for_many_calls(fake_aad, aad_app):
    provider = create_token_provider(aad_app.settings())

    tokens = {await provider.get_token() for _ in range(20)}
    tokens |= set(await asyncio.gather(*(provider.get_token() for _ in range(20))))

    assert len(tokens) == 1
    assert fake_aad.issued[aad_app.app_id] == 1


async def test_concurrent_first_callers_share_one_acquisition(fake_aad, aad_app):
    fake_aad.delay = 0.2
    provider = create_token_provider(aad_app.settings())

    tokens = await asyncio.gather(*(provider.get_token() for _ in range(50)))

    assert len(set(tokens)) == 1
    assert fake_aad.issued[aad_app.app_id] == 1


async def _replaced(provider, old: str, seconds: float = 10.0) -> str:
    """The token once the refresh started in the background has replaced `old`."""
    async with asyncio.timeout(seconds):
        while (token := await provider.get_token()) == old:  # noqa: ASYNC110 - a thread refreshes
            await asyncio.sleep(0.01)
    return token


async def test_a_token_in_its_last_minutes_is_used_at_once_while_one_refresh_runs(
    fake_aad, aad_app
):
    time = VirtualTime(start=1_000_000.0)
    provider = create_token_provider(aad_app.settings(), clock=time.clock)
    first = await provider.get_token()

    time.now += 3600 - 299  # inside the last 5 minutes of the token's life
    fake_aad.delay = 0.5  # Entra ID slow: no caller waits for it
    tokens = await asyncio.gather(*(provider.get_token() for _ in range(50)))

    assert set(tokens) == {first}
    assert fake_aad.issued[aad_app.app_id] == 1  # the refresh is still on its way
    second = await _replaced(provider, first)
    assert fake_aad.issued[aad_app.app_id] == 2  # one refresh for all of them
    assert fake_aad.is_valid_token(second)


async def test_a_token_about_to_expire_is_waited_for(fake_aad, aad_app):
    time = VirtualTime(start=1_000_000.0)
    provider = create_token_provider(aad_app.settings(), clock=time.clock)
    first = await provider.get_token()

    time.now += 3600 - 20  # 20 s left: too little to send with
    second = await provider.get_token()

    assert second != first
    assert fake_aad.issued[aad_app.app_id] == 2


async def test_a_token_is_reused_until_shortly_before_expiry(fake_aad, aad_app):
    time = VirtualTime(start=1_000_000.0)
    provider = create_token_provider(aad_app.settings(), clock=time.clock)
    first = await provider.get_token()

    time.now += 3600 - 301
    assert await provider.get_token() == first
    await asyncio.sleep(0.2)
    assert fake_aad.issued[aad_app.app_id] == 1


async def test_short_lived_tokens_are_refreshed_at_half_life(fake_aad, aad_app):
    fake_aad.expires_in = 120
    time = VirtualTime(start=1_000_000.0)
    provider = create_token_provider(aad_app.settings(), clock=time.clock)
    first = await provider.get_token()

    time.now += 59
    assert await provider.get_token() == first
    await asyncio.sleep(0.2)
    assert fake_aad.issued[aad_app.app_id] == 1
    time.now += 2
    assert await _replaced(provider, first) != first


async def test_force_refresh_gets_a_new_token_past_msal_cache(fake_aad, aad_app):
    provider = create_token_provider(aad_app.settings())
    first = await provider.get_token()

    second = await provider.get_token(force_refresh=True)

    assert second != first
    assert fake_aad.issued[aad_app.app_id] == 2


async def test_acquisition_does_not_block_the_event_loop(fake_aad, aad_app):
    fake_aad.delay = 0.5
    provider = create_token_provider(aad_app.settings())
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await provider.get_token()
    task.cancel()
    assert ticks >= 20  # the loop kept running while MSAL waited on the network


async def test_certificate_with_x5c_obtains_a_token(fake_aad, bot_certificate):
    path, certificate = bot_certificate
    app_id = str(uuid.uuid4())
    fake_aad.register_certificate(app_id, certificate, require_x5c=True)  # subject name/issuer
    settings = Settings.from_env(
        {
            "MicrosoftAppId": app_id,
            "MicrosoftAppCertificatePath": path,
            "BOT_LOGIN_AUTHORITY": fake_aad.url,
        }
    )

    token = await create_token_provider(settings).get_token()

    assert fake_aad.is_valid_token(token)
    issuance = fake_aad.issuances[-1]
    assert issuance.grant == "certificate"
    assert "x5c" in issuance.assertion_header and "x5t#S256" in issuance.assertion_header


async def test_a_certificate_the_app_does_not_have_is_refused(fake_aad, bot_certificate, tmp_path):
    from tools.botsim.aad import generate_certificate

    path, _ = bot_certificate
    _, other_certificate = generate_certificate("someone-else")
    app_id = str(uuid.uuid4())
    fake_aad.register_certificate(app_id, other_certificate)
    settings = Settings.from_env(
        {
            "MicrosoftAppId": app_id,
            "MicrosoftAppCertificatePath": path,
            "BOT_LOGIN_AUTHORITY": fake_aad.url,
        }
    )

    with pytest.raises(TokenError) as caught:
        await create_token_provider(settings).get_token()

    assert caught.value.code == "AADSTS700027"
    assert caught.value.setting == "MicrosoftAppCertificatePath"


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read"), (b"not a pem", "no PEM private key")],
)
async def test_an_unusable_certificate_file_names_the_setting(fake_aad, tmp_path, content, problem):
    path = tmp_path / "bot.pem"
    if content is not None:
        path.write_bytes(content)
    settings = Settings.from_env(
        {
            "MicrosoftAppId": "app",
            "MicrosoftAppCertificatePath": str(path),
            "BOT_LOGIN_AUTHORITY": fake_aad.url,
        }
    )

    with pytest.raises(TokenError, match="MicrosoftAppCertificatePath") as caught:
        await create_token_provider(settings).get_token()
    assert problem in str(caught.value)
    assert fake_aad.issued.total() == 0


def _unusable_key(kind: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if kind == "damaged":
        return b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    if kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    # The older PEM form (`Proc-Type: 4,ENCRYPTED`), as OpenSSL 1.x's genrsa -aes256 wrote.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"secret"),
    )


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("encrypted", "encrypted private keys are not supported"),
        ("damaged", "the private key cannot be read"),
        ("ec", "the private key is not an RSA key"),
    ],
)
async def test_a_private_key_msal_cannot_sign_with_names_the_setting(
    fake_aad, tmp_path, kind, problem
):
    # Not a transient BOT_LOGIN_AUTHORITY failure, retried as if Entra ID were down.
    from tools.botsim.aad import generate_certificate

    _, certificate = generate_certificate("bot")
    path = tmp_path / "bot.pem"
    path.write_bytes(_unusable_key(kind) + certificate)
    app_id = str(uuid.uuid4())
    fake_aad.register_certificate(app_id, certificate)
    settings = Settings.from_env(
        {
            "MicrosoftAppId": app_id,
            "MicrosoftAppCertificatePath": str(path),
            "BOT_LOGIN_AUTHORITY": fake_aad.url,
        }
    )

    with pytest.raises(TokenError) as caught:
        await create_token_provider(settings).get_token()

    assert str(caught.value) == f"MicrosoftAppCertificatePath: {problem}"
    assert (caught.value.setting, caught.value.transient) == ("MicrosoftAppCertificatePath", False)
    assert fake_aad.issued.total() == 0


async def test_federated_assertion_is_read_fresh_from_the_token_file(fake_aad, tmp_path):
    app_id = str(uuid.uuid4())
    fake_aad.register_federated(app_id, subject="system:serviceaccount:bots:bot")
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(fake_aad.federated_assertion("system:serviceaccount:other:pod"))
    settings = Settings.from_env(
        {
            "MicrosoftAppId": app_id,
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
            "BOT_LOGIN_AUTHORITY": fake_aad.url,
        }
    )
    now = [1_000_000.0]
    provider = create_token_provider(settings, clock=lambda: now[0])

    with pytest.raises(TokenError, match="AZURE_FEDERATED_TOKEN_FILE"):
        await provider.get_token()

    # The platform rotates the file; the same provider picks the new assertion up, once
    # the refusal's retry interval is over (until then the refusal is raised again, and
    # Entra ID not asked: a broadcast would ask for each of its messages).
    token_file.write_text(fake_aad.federated_assertion("system:serviceaccount:bots:bot"))
    asked = len(fake_aad.rejections)
    with pytest.raises(TokenError, match="AZURE_FEDERATED_TOKEN_FILE"):
        await provider.get_token()
    assert len(fake_aad.rejections) == asked == 1
    now[0] += REFRESH_RETRY_SECONDS
    token = await provider.get_token()

    assert fake_aad.is_valid_token(token)
    assert fake_aad.issuances[-1].grant == "federated"


async def test_a_missing_federated_token_file_names_the_setting(fake_aad, tmp_path):
    settings = Settings.from_env(
        {
            "MicrosoftAppId": "app",
            "AZURE_FEDERATED_TOKEN_FILE": str(tmp_path / "missing"),
            "BOT_LOGIN_AUTHORITY": fake_aad.url,
        }
    )
    with pytest.raises(TokenError) as caught:
        await create_token_provider(settings).get_token()
    assert caught.value.setting == "AZURE_FEDERATED_TOKEN_FILE"


async def test_user_assigned_managed_identity_uses_the_identity_endpoint(
    fake_managed_identity: FakeManagedIdentity,
):
    app_id = str(uuid.uuid4())
    settings = Settings.from_env(
        {
            "MicrosoftAppId": app_id,
            "MicrosoftAppType": "UserAssignedMSI",
            "MicrosoftAppTenantId": str(uuid.uuid4()),
        }
    )
    provider = create_token_provider(settings)

    tokens = {await provider.get_token() for _ in range(5)}

    assert len(tokens) == 1 and tokens <= fake_managed_identity.tokens
    assert fake_managed_identity.issued[app_id] == 1
    request = fake_managed_identity.requests[-1]
    assert request["client_id"] == app_id
    assert request["resource"] == "https://api.botframework.com"

    await provider.get_token(force_refresh=True)
    assert fake_managed_identity.issued[app_id] == 2


async def test_a_forced_refresh_answered_with_the_same_token_returns_it(
    fake_managed_identity: FakeManagedIdentity,
):
    # An earlier failed refresh is not this one's: App Service's endpoint answers a refresh
    # with the token it issued last, which is then what there is.
    settings = Settings.from_env(
        {
            "MicrosoftAppId": str(uuid.uuid4()),
            "MicrosoftAppType": "UserAssignedMSI",
            "MicrosoftAppTenantId": str(uuid.uuid4()),
        }
    )
    now = [time.time()]
    provider = create_token_provider(settings, clock=lambda: now[0])
    await provider.get_token()
    fake_managed_identity.fail_next(400)
    with pytest.raises(TokenError):
        await provider.get_token(force_refresh=True)
    # Refused, it is asked again once the retry interval is over, not by every caller.
    asked = len(fake_managed_identity.requests)
    with pytest.raises(TokenError):
        await provider.get_token(force_refresh=True)
    assert len(fake_managed_identity.requests) == asked
    now[0] += REFRESH_RETRY_SECONDS
    second = await provider.get_token(force_refresh=True)

    fake_managed_identity.reuse = True
    assert await provider.get_token(force_refresh=True) == second


async def test_a_wrong_secret_names_the_aad_code_and_never_the_secret(fake_aad, aad_app):
    settings = aad_app.settings(MicrosoftAppPassword="wrong-secret-value")

    with pytest.raises(TokenError) as caught:
        await create_token_provider(settings).get_token()

    error = caught.value
    assert error.code == "AADSTS7000215"
    assert error.setting == "MicrosoftAppPassword"
    assert "MicrosoftAppPassword" in str(error) and "AADSTS7000215" in str(error)
    assert "wrong-secret-value" not in str(error)
    assert not error.transient


async def test_no_credential_names_the_setting(fake_aad):
    settings = Settings.from_env({"MicrosoftAppId": "app", "BOT_LOGIN_AUTHORITY": fake_aad.url})

    with pytest.raises(TokenError, match="MicrosoftAppPassword"):
        await create_token_provider(settings).get_token()
    assert fake_aad.discovery_requests == 0


async def test_an_unreachable_authority_is_a_transient_error_naming_the_setting(fake_aad):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings.from_env(
        {
            "MicrosoftAppId": "app",
            "MicrosoftAppPassword": "s3cret",
            "BOT_LOGIN_AUTHORITY": f"https://127.0.0.1:{port}",
        }
    )

    with pytest.raises(TokenError) as caught:
        await create_token_provider(settings).get_token()

    assert caught.value.transient
    assert caught.value.setting == "BOT_LOGIN_AUTHORITY"
    assert "s3cret" not in str(caught.value)


async def test_an_authority_gone_after_the_first_token_is_a_transient_error(monkeypatch):
    # MSAL's client is built (the authority found) and then Entra ID cannot be reached:
    # it is down, no setting is wrong, and the call is tried again later.
    with FakeAAD() as aad:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", aad.ca_path)
        monkeypatch.setenv("SSL_CERT_FILE", aad.ca_path)
        aad.register_secret("app", "s3cret")
        settings = Settings.from_env(
            {
                "MicrosoftAppId": "app",
                "MicrosoftAppPassword": "s3cret",
                "BOT_LOGIN_AUTHORITY": aad.url,
            }
        )
        provider = create_token_provider(settings)
        await provider.get_token()
        aad.server.stop()  # its port closed, its CA still trusted

        with pytest.raises(TokenError) as caught:
            await provider.get_token(force_refresh=True)

    assert caught.value.transient
    assert caught.value.setting == "BOT_LOGIN_AUTHORITY"
    assert "cannot reach the login authority 127.0.0.1" in str(caught.value)


async def test_a_failed_refresh_keeps_the_current_token_while_it_is_valid(
    fake_aad, aad_app, caplog
):
    time = VirtualTime(start=1_000_000.0)
    provider = create_token_provider(aad_app.settings(), clock=time.clock)
    first = await provider.get_token()
    time.now += 3600 - 200
    fake_aad.fail_next(AadError())  # e.g. the secret was just rotated elsewhere

    assert await provider.get_token() == first  # still 200 s left: better than failing
    async with asyncio.timeout(10):
        while "still using the current token" not in caplog.text:  # noqa: ASYNC110 - a thread
            await asyncio.sleep(0.01)
    assert fake_aad.rejections == [(aad_app.app_id, "AADSTS7000215")]

    time.now += 5  # within the pause after a failure: Entra ID is not asked again
    assert await provider.get_token() == first
    await asyncio.sleep(0.2)
    assert len(fake_aad.rejections) == 1 and fake_aad.issued[aad_app.app_id] == 1

    time.now += 6  # the next attempt succeeds
    assert await _replaced(provider, first) != first
    assert fake_aad.issued[aad_app.app_id] == 2


@pytest.mark.parametrize(
    ("error", "transient", "setting"),
    [
        (
            AadError("temporarily_unavailable", 50196, "Try again.", 503),
            True,
            "BOT_LOGIN_AUTHORITY",
        ),
        (AadError(), False, "MicrosoftAppPassword"),  # the secret was rotated
    ],
)
async def test_a_refused_token_is_not_returned_when_its_refresh_fails(
    fake_aad, aad_app, error, transient, setting
):
    provider = create_token_provider(aad_app.settings())
    await provider.get_token()
    fake_aad.fail_next(error)

    # The Connector answered 401 to the token: sent again, it would be refused again, and
    # the call reported as a credentials problem whatever Entra ID said.
    with pytest.raises(TokenError) as caught:
        await provider.get_token(force_refresh=True)

    assert (caught.value.transient, caught.value.setting) == (transient, setting)


async def test_a_scripted_aad_outage_surfaces_once_the_token_has_expired(fake_aad, aad_app):
    provider = create_token_provider(aad_app.settings())
    fake_aad.fail_next(AadError("temporarily_unavailable", 50196, "Try again.", 503))

    with pytest.raises(TokenError) as caught:
        await provider.get_token()
    assert caught.value.transient
    assert caught.value.code == "HTTP503"


@pytest.mark.parametrize("error", ["server_error", "temporarily_unavailable"])
async def test_entra_answering_that_it_failed_is_a_transient_error(fake_aad, aad_app, error):
    # An OAuth error answer (not a 5xx MSAL raises for) saying Entra ID itself failed:
    # nothing to fix in the settings, the call is tried again later.
    provider = create_token_provider(aad_app.settings())
    fake_aad.fail_next(AadError(error, 50000, "There was an error issuing a token.", 400))

    with pytest.raises(TokenError) as caught:
        await provider.get_token()

    assert caught.value.transient
    assert caught.value.code == "AADSTS50000"


def test_fake_aad_is_not_trusted_without_its_ca(fake_aad_service: FakeAAD, monkeypatch):
    # The fake's certificate is only valid for clients told to trust its CA: MSAL verifies TLS.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    fake_aad_service.register_secret("untrusting-app", "pw")
    settings = Settings.from_env(
        {
            "MicrosoftAppId": "untrusting-app",
            "MicrosoftAppPassword": "pw",
            "BOT_LOGIN_AUTHORITY": fake_aad_service.url,
        }
    )

    with pytest.raises(TokenError, match="BOT_LOGIN_AUTHORITY"):
        asyncio.run(create_token_provider(settings).get_token())


async def test_no_log_line_holds_the_secret_the_assertion_or_the_token(
    fake_aad, aad_app, tmp_path, caplog
):
    import logging

    caplog.set_level(logging.DEBUG)  # every logger: msal's, urllib3's and ours
    caplog.set_level(logging.DEBUG, logger="msal")  # the app silences it otherwise
    secret_token = await create_token_provider(aad_app.settings()).get_token()

    app_id = str(uuid.uuid4())
    fake_aad.register_federated(app_id, subject="system:serviceaccount:bots:bot")
    assertion = fake_aad.federated_assertion("system:serviceaccount:bots:bot")
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(assertion)
    settings = Settings.from_env(
        {
            "MicrosoftAppId": app_id,
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
            "BOT_LOGIN_AUTHORITY": fake_aad.url,
        }
    )
    federated_token = await create_token_provider(settings).get_token()
    refused = fake_aad.federated_assertion("system:serviceaccount:other:pod")
    token_file.write_text(refused)
    with pytest.raises(TokenError) as caught:
        await create_token_provider(settings).get_token()

    assert caplog.records  # the check below looked at something
    for value in (aad_app.secret, assertion, refused, secret_token, federated_token):
        assert value not in caplog.text
    assert refused not in str(caught.value) and caught.value.code


async def test_a_token_endpoint_answer_quoting_the_secret_reaches_no_log(fake_aad, aad_app, caplog):
    # A proxy or an error page at the login authority answers a 4xx that is not JSON and
    # quotes the request's form, client secret included: MSAL logged it, as it came, at
    # ERROR (the worker forwards ERROR to the host). Nor may Entra's `error` field, which
    # the app quotes, carry anything but a short code.
    import logging

    import shared  # noqa: F401  (the app's logging policy)

    secret = aad_app.settings().app_password
    caplog.set_level(logging.INFO)
    provider = create_token_provider(aad_app.settings())
    fake_aad.fail_next(AadError(status=400, echo_form=True))
    with pytest.raises(TokenError):
        await provider.get_token()
    # A new provider for each answer: one that failed answers from its failure for a while.
    fake_aad.fail_next(AadError(error=f"invalid_client secret={secret}"))
    with pytest.raises(TokenError) as caught:
        await create_token_provider(aad_app.settings()).get_token()
    assert secret not in str(caught.value) and caught.value.code == "AADSTS7000215"
    # Nor `error_codes`, where Entra puts numbers: a page echoing the form puts text.
    fake_aad.fail_next(AadError(code=f"client_secret={secret}", description="Bad request"))
    with pytest.raises(TokenError) as caught:
        await create_token_provider(aad_app.settings()).get_token()
    assert secret not in str(caught.value) and caught.value.code == "invalid_client"

    assert secret not in caplog.text


async def test_a_failed_token_request_is_logged_by_the_app_with_what_to_check(
    fake_aad, aad_app, caplog
):
    # MSAL is silent: without this line a turn's failure said only "TokenError".
    import logging

    caplog.set_level(logging.INFO)
    provider = create_token_provider(aad_app.settings())
    fake_aad.fail_next(AadError())
    with pytest.raises(TokenError):
        await provider.get_token()

    [line] = [r.getMessage() for r in caplog.records if "token request for app" in r.getMessage()]
    assert "AADSTS7000215" in line and "MicrosoftAppPassword" in line


async def test_a_transient_failure_or_a_refusal_no_caller_saw_is_asked_again_at_once():
    # What the provider asks for, seen where it asks (MSAL's own HTTP cache would answer a
    # failed request again for seconds, so Entra ID's side cannot show it): a transient
    # failure is asked again by the next call; so is a refusal only a background refresh
    # met, when the Connector then refuses the token (force_refresh).
    from shared.auth import tokens

    now = [1_000_000.0]
    settings = Settings.from_env({"MicrosoftAppId": str(uuid.uuid4()), "MicrosoftAppPassword": "s"})
    provider = create_token_provider(settings, clock=lambda: now[0])
    asked: list[str] = []

    def answers(*outcomes):
        queue = list(outcomes)

        def acquire():
            asked.append("asked")
            outcome = queue.pop(0)
            if isinstance(outcome, TokenError):
                raise outcome
            return tokens._Token(outcome, now[0] + 3600, now[0] + 100)

        provider._acquire_blocking = acquire

    answers(TokenError("busy", transient=True), "t1")
    with pytest.raises(TokenError):
        await provider.get_token()
    assert await provider.get_token() == "t1" and len(asked) == 2

    # The token in its last minutes: refreshed in the background, which Entra ID refuses.
    now[0] += 200
    answers(TokenError("refused", setting="MicrosoftAppPassword"), "t2")
    assert await provider.get_token() == "t1"
    with contextlib.suppress(TokenError):  # the background refresh ends, seen by nobody
        await provider._inflight
    assert len(asked) == 3
    assert await provider.get_token(force_refresh=True) == "t2" and len(asked) == 4


async def test_entra_id_failing_for_every_call_logs_one_warning_a_minute(caplog):
    # A transient failure is asked again by every call: its line is not (each message of
    # a broadcast would log one).
    settings = Settings.from_env({"MicrosoftAppId": str(uuid.uuid4()), "MicrosoftAppPassword": "s"})
    provider = create_token_provider(settings)

    def acquire():
        raise TokenError("Entra ID unreachable", setting="BOT_LOGIN_AUTHORITY", transient=True)

    provider._acquire_blocking = acquire
    with caplog.at_level(logging.INFO, logger="shared.auth.tokens"):
        for _ in range(20):
            with pytest.raises(TokenError):
                await provider.get_token()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "token request for app" in warnings[0]
