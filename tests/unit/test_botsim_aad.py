"""botsim's fake AAD: MSAL obtains tokens from it over HTTPS; it checks grants like Entra."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid

import jwt
import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tools.botsim.aad import AadError, FakeAAD, FakeManagedIdentity, generate_certificate

SCOPE = ["https://api.botframework.com/.default"]


def msal_app(fake_aad: FakeAAD, client_id: str, credential, tenant: str = "botframework.com"):
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=fake_aad.authority(tenant),
        validate_authority=False,
        instance_discovery=False,
    )


def test_msal_obtains_a_token_over_https(fake_aad, aad_app):
    result = msal_app(fake_aad, aad_app.app_id, aad_app.secret).acquire_token_for_client(SCOPE)

    assert fake_aad.url.startswith("https://")
    assert result["token_type"] == "Bearer" and result["expires_in"] > 3500
    assert fake_aad.is_valid_token(result["access_token"])
    assert fake_aad.issued[aad_app.app_id] == 1
    assert fake_aad.discovery_requests == 1
    assert "client_secret" not in fake_aad.last_request[aad_app.app_id]
    assert fake_aad.last_request[aad_app.app_id]["scope"] == SCOPE[0]


def test_the_connector_check_refuses_a_token_for_another_audience(fake_aad, aad_app):
    # Entra ID issues a Graph token to the same app; the Connector would refuse it, and so
    # must the fake Connector's check, or a bot asking for the wrong scope passes locally.
    app = msal_app(fake_aad, aad_app.app_id, aad_app.secret)
    graph = app.acquire_token_for_client(["https://graph.microsoft.com/.default"])
    assert "access_token" in graph
    assert not fake_aad.is_valid_token(graph["access_token"])
    assert fake_aad.is_valid_token(app.acquire_token_for_client(SCOPE)["access_token"])


def test_tls_needs_the_generated_ca(fake_aad):
    discovery = f"{fake_aad.url}/botframework.com/v2.0/.well-known/openid-configuration"
    assert requests.get(discovery, verify=fake_aad.ca_path, timeout=10).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(discovery, verify=requests.certs.where(), timeout=10)


def test_a_wrong_secret_is_invalid_client_7000215(fake_aad, aad_app):
    result = msal_app(fake_aad, aad_app.app_id, "nope").acquire_token_for_client(SCOPE)

    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert fake_aad.issued[aad_app.app_id] == 0
    assert fake_aad.rejections == [(aad_app.app_id, "AADSTS7000215")]


def test_scripted_errors_come_first_then_tokens_again(fake_aad, aad_app):
    fake_aad.fail_next(AadError("invalid_client", 7000222, "The secret has expired.", 401))
    app = msal_app(fake_aad, aad_app.app_id, aad_app.secret)

    assert app.acquire_token_for_client(SCOPE)["error_codes"] == [7000222]
    assert "access_token" in app.acquire_token_for_client(SCOPE)


def test_the_token_lifetime_is_configurable(fake_aad, aad_app):
    fake_aad.expires_in = 600
    result = msal_app(fake_aad, aad_app.app_id, aad_app.secret).acquire_token_for_client(SCOPE)
    assert 590 <= result["expires_in"] <= 600


def test_certificate_assertions_are_verified(fake_aad, bot_certificate):
    path, certificate = bot_certificate
    with open(path) as file:
        pem = file.read()
    key = pem[: pem.index("-----BEGIN CERTIFICATE-----")]
    app_id = str(uuid.uuid4())
    fake_aad.register_certificate(app_id, certificate, require_x5c=True)

    good = msal_app(
        fake_aad, app_id, {"private_key": key, "public_certificate": certificate.decode()}
    ).acquire_token_for_client(SCOPE)
    other_bundle, _ = generate_certificate("impostor")
    other_key = other_bundle[: other_bundle.index(b"-----BEGIN CERTIFICATE-----")].decode()
    forged = msal_app(  # right certificate in x5c/x5t, wrong signing key
        fake_aad, app_id, {"private_key": other_key, "public_certificate": certificate.decode()}
    ).acquire_token_for_client(SCOPE)

    assert "access_token" in good
    assert fake_aad.issuances[-1].grant == "certificate"
    assert forged["error_codes"] == [700027]


def test_subject_name_issuer_apps_need_x5c(fake_aad, bot_certificate):
    path, certificate = bot_certificate
    app_id = str(uuid.uuid4())
    fake_aad.register_certificate(app_id, certificate, require_x5c=True)
    with open(path, "rb") as file:
        key = serialization.load_pem_private_key(file.read(), None)
    der = x509.load_pem_x509_certificate(certificate).public_bytes(serialization.Encoding.DER)
    header = {"x5t#S256": base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode()}
    now = int(time.time())
    claims = {
        "aud": fake_aad.token_endpoint("botframework.com"),
        "iss": app_id,
        "sub": app_id,
        "exp": now + 600,
        "iat": now,
        "jti": "1",
    }
    assertion = jwt.encode(claims, key, algorithm="PS256", headers=header)

    result = msal_app(
        fake_aad, app_id, {"client_assertion": lambda: assertion}
    ).acquire_token_for_client(SCOPE)
    assert result["error_codes"] == [700027]


def test_federated_assertions_must_match_the_registered_subject(fake_aad):
    app_id = str(uuid.uuid4())
    fake_aad.register_federated(app_id, subject="system:serviceaccount:bots:bot")

    def token_for(assertion: str):
        return msal_app(fake_aad, app_id, {"client_assertion": lambda: assertion})

    good = token_for(fake_aad.federated_assertion("system:serviceaccount:bots:bot"))
    wrong = token_for(fake_aad.federated_assertion("system:serviceaccount:other:pod"))
    expired = token_for(
        fake_aad.federated_assertion("system:serviceaccount:bots:bot", lifetime=-60)
    )

    assert "access_token" in good.acquire_token_for_client(SCOPE)
    assert fake_aad.issuances[-1].grant == "federated"
    assert wrong.acquire_token_for_client(SCOPE)["error_codes"] == [700213]
    assert expired.acquire_token_for_client(SCOPE)["error_codes"] == [700024]


def test_managed_identity_endpoint_speaks_the_app_service_protocol(fake_managed_identity):
    identity: FakeManagedIdentity = fake_managed_identity
    params = {
        "api-version": "2019-08-01",
        "resource": "https://api.botframework.com",
        "client_id": "app-1",
    }

    refused = requests.get(
        identity.endpoint, params=params, headers={"X-IDENTITY-HEADER": "x"}, timeout=10
    )
    answer = requests.get(
        identity.endpoint, params=params, headers={"X-IDENTITY-HEADER": identity.secret}, timeout=10
    ).json()

    assert refused.status_code == 401
    assert answer["access_token"] in identity.tokens
    assert int(answer["expires_on"]) > time.time() + 3000
    assert identity.issued["app-1"] == 1


def test_msal_managed_identity_client_gets_tokens_from_the_stand_in(fake_managed_identity):
    client = msal.ManagedIdentityClient(
        msal.UserAssignedManagedIdentity(client_id="app-2"), http_client=requests.Session()
    )
    result = client.acquire_token_for_client(resource="https://api.botframework.com")
    again = client.acquire_token_for_client(resource="https://api.botframework.com")

    assert result["access_token"] in fake_managed_identity.tokens
    assert again["access_token"] == result["access_token"]
    assert fake_managed_identity.issued["app-2"] == 1
