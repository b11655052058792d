"""botsim's identity service, checked from the outside with PyJWT and plain HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.error
import urllib.request

import jwt
import pytest

from tools.botsim.identity import DEFAULT_ENDORSEMENTS, IdentityService

APP_ID = "11111111-2222-3333-4444-555555555555"
SERVICE_URL = "https://smba.trafficmanager.net/amer/"


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def verify(service: IdentityService, token: str, *, audience: str = APP_ID, issuer=None) -> dict:
    """Verify as any OpenID client would: metadata → jwks_uri → key by kid → RS256."""
    _, metadata = get_json(service.metadata_url)
    key = jwt.PyJWKClient(metadata["jwks_uri"], cache_keys=False).get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=audience,
        issuer=issuer or metadata["issuer"],
        options={"require": ["exp", "nbf", "iss", "aud"]},
    )


def test_channel_metadata_and_keys(channel_identity):
    status, metadata = get_json(channel_identity.metadata_url)
    assert status == 200
    assert metadata["issuer"] == "https://api.botframework.com"
    assert metadata["jwks_uri"] == channel_identity.jwks_url
    assert metadata["id_token_signing_alg_values_supported"] == ["RS256"]
    assert channel_identity.metadata_url.endswith("/v1/.well-known/openidconfiguration")

    status, jwks = get_json(metadata["jwks_uri"])
    assert status == 200
    [key] = jwks["keys"]
    assert {"kid", "x5t", "n", "e", "kty", "use", "endorsements"} <= key.keys()
    assert key["kty"] == "RSA" and key["use"] == "sig" and key["e"] == "AQAB"
    assert key["endorsements"] == list(DEFAULT_ENDORSEMENTS)
    assert jwt.PyJWK(key).key.key_size == 2048
    assert (channel_identity.metadata_requests, channel_identity.jwks_requests) == (1, 1)


def test_channel_token_verifies_against_the_served_jwks(channel_identity):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    claims = verify(channel_identity, token)
    assert claims["serviceurl"] == SERVICE_URL
    assert claims["aud"] == APP_ID
    assert claims["exp"] - claims["nbf"] == 3600
    assert jwt.get_unverified_header(token)["kid"] == channel_identity.signing_kid


def test_channel_token_overrides_and_drops(channel_identity):
    token = channel_identity.mint_channel_token(
        APP_ID, None, exp=2_000_000_000, claims={"extra": 1}, drop=("nbf",)
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {
        "iss": "https://api.botframework.com",
        "aud": APP_ID,
        "exp": 2_000_000_000,
        "extra": 1,
    }


@pytest.mark.parametrize(
    ("version", "issuer", "caller_claim"),
    [
        ("1.0", "https://sts.windows.net/d6d49420-f39b-4df7-a1dc-d59a935871db/", "appid"),
        (
            "2.0",
            "https://login.microsoftonline.com/d6d49420-f39b-4df7-a1dc-d59a935871db/v2.0",
            "azp",
        ),
    ],
)
def test_emulator_tokens_have_the_aad_shape(emulator_identity, version, issuer, caller_claim):
    _, metadata = get_json(emulator_identity.metadata_url)
    assert metadata["issuer"] == "https://login.microsoftonline.com/{tenantid}/v2.0"
    token = emulator_identity.mint_emulator_token(APP_ID, version=version)
    claims = verify(emulator_identity, token, issuer=issuer)
    assert claims["ver"] == version
    assert claims[caller_claim] == APP_ID
    assert claims["tid"] == "d6d49420-f39b-4df7-a1dc-d59a935871db"
    # AAD's keys carry no endorsements.
    assert "endorsements" not in get_json(emulator_identity.jwks_url)[1]["keys"][0]


def test_rotation_publishes_the_new_key_and_signs_with_it(channel_identity):
    first = channel_identity.signing_kid
    second = channel_identity.rotate_key(endorsements=["msteams"])
    assert channel_identity.published_kids == [first, second]
    keys = {k["kid"]: k for k in get_json(channel_identity.jwks_url)[1]["keys"]}
    assert keys[second]["endorsements"] == ["msteams"]
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    assert jwt.get_unverified_header(token)["kid"] == second
    verify(channel_identity, token)
    # The old key still verifies tokens minted with it until it is retired.
    verify(channel_identity, channel_identity.mint_channel_token(APP_ID, SERVICE_URL, kid=first))

    third = channel_identity.rotate_key(retire_old=True)
    assert channel_identity.published_kids == [third]
    old = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, kid=first)
    with pytest.raises(jwt.PyJWKClientError):
        verify(channel_identity, old)


def test_outage_answers_503_and_counts(channel_identity):
    channel_identity.set_outage(True)
    assert get_json(channel_identity.metadata_url)[0] == 503
    assert get_json(channel_identity.jwks_url)[0] == 503
    channel_identity.set_outage(False)
    assert get_json(channel_identity.jwks_url)[0] == 200
    assert (channel_identity.metadata_requests, channel_identity.jwks_requests) == (1, 2)


def test_reset_restores_the_initial_key(channel_identity):
    first = channel_identity.signing_kid
    channel_identity.rotate_key(retire_old=True)
    channel_identity.set_outage(True)
    channel_identity.reset()
    assert channel_identity.published_kids == [first]
    assert get_json(channel_identity.jwks_url)[0] == 200


@pytest.mark.parametrize(
    "kind", ["alg_none", "hs256_public_key", "garbage", "unpublished_key", "unknown_kid"]
)
def test_broken_tokens_fail_verification(channel_identity, kind):
    token = channel_identity.mint_broken(kind, APP_ID, SERVICE_URL)
    with pytest.raises((jwt.PyJWTError, jwt.PyJWKClientError)):
        verify(channel_identity, token)


def test_broken_tokens_are_broken_in_the_named_way(channel_identity):
    def header(kind: str) -> dict:
        return jwt.get_unverified_header(channel_identity.mint_broken(kind, APP_ID, SERVICE_URL))

    assert header("alg_none")["alg"] == "none"
    assert header("hs256_public_key")["alg"] == "HS256"
    unpublished = header("unpublished_key")
    assert unpublished["alg"] == "RS256"
    assert unpublished["kid"] == channel_identity.unpublished_key.kid
    assert unpublished["kid"] not in channel_identity.published_kids
    assert header("unknown_kid")["kid"] not in channel_identity.published_kids
    # The HS256 token really is keyed with the public key PEM (the classic confusion attack).
    token = channel_identity.mint_broken("hs256_public_key", APP_ID, SERVICE_URL)
    signing_input, _, signature = token.rpartition(".")
    public_pem = channel_identity.signing_key.public_pem
    expected = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(expected).rstrip(b"=").decode() == signature
    with pytest.raises(jwt.DecodeError):
        jwt.get_unverified_header(channel_identity.mint_broken("garbage", APP_ID, SERVICE_URL))
