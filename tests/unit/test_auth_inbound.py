"""Inbound authentication against botsim's OpenID/JWKS services over HTTP, real RSA keys.

The only stand-in is the clock (the authenticator's documented injection point), so that
"a minute later" and "a day later" do not cost a minute or a day.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import socket
import time
import tracemalloc

import aiohttp
import jwt
import pytest
from aiohttp import web

from shared.auth.inbound import (
    ANONYMOUS,
    AuthError,
    Identity,
    InboundAuthenticator,
    KeysUnavailable,
)
from shared.auth.keys import COLD_RETRY_INTERVAL, KeySourceError, OpenIdKeyCache, parse_jwks
from shared.config import Settings
from tools.botsim.identity import IdentityService
from tools.botsim.server import BackgroundServer

APP_ID = "11111111-2222-3333-4444-555555555555"
OTHER_APP_ID = "99999999-8888-7777-6666-555555555555"
BOT_TENANT = "0a0b0c0d-1111-2222-3333-444455556666"
SERVICE_URL = "https://smba.trafficmanager.net/amer/"


class Clock:
    """A settable clock, injected into the authenticator (not a patch of its internals)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def activity(service_url: object = SERVICE_URL, channel_id: object = "msteams") -> dict:
    return {
        "type": "message",
        "id": "a1",
        "channelId": channel_id,
        "serviceUrl": service_url,
        "from": {"id": "29:user"},
        "recipient": {"id": f"28:{APP_ID}"},
        "conversation": {"id": "19:conv"},
        "text": "hi",
    }


def bearer(token: str) -> str:
    return f"Bearer {token}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings(identity_env) -> Settings:
    return Settings.from_env({"MicrosoftAppId": APP_ID, **identity_env})


@pytest.fixture
async def auth(settings, clock):
    authenticator = InboundAuthenticator(settings, clock=clock)
    yield authenticator
    await authenticator.close()


async def rejected(auth: InboundAuthenticator, header: str | None, act: dict) -> str:
    """The AuthError reason; fails the test for any other outcome."""
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(header, act)
    reason = str(caught.value)
    token = (header or "").partition(" ")[2].strip()
    if len(token) > 8:
        assert token not in reason  # never the token
    return reason


# -- accepted -----------------------------------------------------------------------------


async def test_valid_channel_token(auth, channel_identity):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    identity = await auth.authenticate(bearer(token), activity())
    assert identity == Identity(True, "channel", APP_ID, identity.claims)
    assert identity.claims["serviceurl"] == SERVICE_URL
    assert auth.caller_id(identity) == "urn:botframework:azure"


async def test_service_url_compared_normalised(auth, channel_identity):
    token = channel_identity.mint_channel_token(APP_ID, "HTTPS://SMBA.TrafficManager.net:443/amer")
    identity = await auth.authenticate(bearer(token), activity(SERVICE_URL))
    assert identity.kind == "channel"
    # The path is not case-folded, and a port other than the default counts.
    for other in (
        "https://smba.trafficmanager.net/AMER/",
        "https://smba.trafficmanager.net:8443/amer/",
    ):
        await rejected(auth, bearer(token), activity(other))


@pytest.mark.parametrize(
    ("claim", "sent"),
    [
        # urlsplit drops tabs and newlines and strips the ends; the Connector client refuses
        # such URLs, so a reference recorded with one could never be used.
        (SERVICE_URL, "https://smba.traffic\tmanager.net/amer/"),
        (SERVICE_URL, "https://smba.trafficmanager.net/am\ner/"),
        (SERVICE_URL, " https://smba.trafficmanager.net/amer/"),
        (SERVICE_URL, "https://smba.trafficmanager.net/amer/\r\n"),
        (SERVICE_URL, "https://smba.trafficmanager.net/amer/#fragment"),
        (SERVICE_URL, "https://smba.trafficmanager.net\\amer/"),
        (SERVICE_URL, "https://x@smba.trafficmanager.net/amer/"),
        (SERVICE_URL, "https://smba.trafficmanager.net@attacker.example/amer/"),
        (SERVICE_URL, "https://smba.trafficmanager.net./amer/"),
        (SERVICE_URL, "https://smba%2Etrafficmanager.net/amer/"),
        (SERVICE_URL, "http://smba.trafficmanager.net/amer/"),
        (SERVICE_URL, "https://smba.trafficmanager.net:80/amer/"),
        (SERVICE_URL, "https://smba.trafficmanager.net/amer/?x=1"),
        # str.lower() folds the Kelvin sign to "k": not the host the channel signed.
        ("https://webchat.botframework.com/", "https://webchat.botframewor\u212a.com/"),
    ],
)
async def test_service_url_normalisation_folds_nothing_else(auth, channel_identity, claim, sent):
    token = channel_identity.mint_channel_token(APP_ID, claim)
    assert (await auth.authenticate(bearer(token), activity(claim))).kind == "channel"
    await rejected(auth, bearer(token), activity(sent))


@pytest.mark.parametrize("version", ["1.0", "2.0"])
async def test_valid_emulator_tokens(auth, channel_identity, emulator_identity, version):
    token = emulator_identity.mint_emulator_token(APP_ID, version=version)
    identity = await auth.authenticate(
        bearer(token), activity("http://localhost:53000", "emulator")
    )
    assert (identity.authenticated, identity.kind, identity.app_id) == (True, "emulator", APP_ID)
    assert identity.claims["ver"] == version
    assert auth.caller_id(identity) is None  # signed by AAD, not the Bot Framework metadata
    assert channel_identity.jwks_requests == 0  # the AAD keys were used, not the channel's


@pytest.mark.parametrize("version", ["1.0", "2.0"])
async def test_emulator_token_from_the_bots_own_tenant(identity_env, emulator_identity, version):
    token = emulator_identity.mint_emulator_token(APP_ID, version=version, tenant=BOT_TENANT)
    emulator_activity = activity("http://127.0.0.1:1", "emulator")
    env = {"MicrosoftAppId": APP_ID, "MicrosoftAppTenantId": BOT_TENANT, **identity_env}
    single = InboundAuthenticator(Settings.from_env({**env, "MicrosoftAppType": "SingleTenant"}))
    try:
        assert (await single.authenticate(bearer(token), emulator_activity)).kind == "emulator"
    finally:
        await single.close()
    # Without a tenant of its own, the bot does not accept that tenant's tokens.
    del env["MicrosoftAppTenantId"]
    multi = InboundAuthenticator(Settings.from_env(env))
    try:
        assert "issuer" in await rejected(multi, bearer(token), emulator_activity)
    finally:
        await multi.close()


async def test_app_and_tenant_ids_set_in_upper_case_still_match_genuine_tokens(
    identity_env, channel_identity, emulator_identity
):
    # GUIDs in any case: an app id or tenant pasted in upper case refused every token.
    env = {
        "MicrosoftAppId": APP_ID.upper(),
        "MicrosoftAppTenantId": BOT_TENANT.upper(),
        "MicrosoftAppType": "SingleTenant",
        **identity_env,
    }
    authenticator = InboundAuthenticator(Settings.from_env(env))
    channel = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    emulator = emulator_identity.mint_emulator_token(APP_ID, version="2.0", tenant=BOT_TENANT)
    try:
        assert (await authenticator.authenticate(bearer(channel), activity())).kind == "channel"
        emulator_activity = activity("http://127.0.0.1:1", "emulator")
        identity = await authenticator.authenticate(bearer(emulator), emulator_activity)
        assert identity.kind == "emulator"
        other = channel_identity.mint_channel_token(OTHER_APP_ID, SERVICE_URL)
        assert "audience" in await rejected(authenticator, bearer(other), activity())
    finally:
        await authenticator.close()


async def test_clock_skew_of_five_minutes_is_tolerated(auth, channel_identity, clock):
    now = clock.now
    late = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, exp=now - 240)
    early = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, nbf=now + 240)
    assert (await auth.authenticate(bearer(late), activity())).kind == "channel"
    assert (await auth.authenticate(bearer(early), activity())).kind == "channel"


# -- rejected -----------------------------------------------------------------------------

# case: (mint_channel_token arguments, expected reason)
CHANNEL_REJECTIONS = {
    "expired beyond skew": (dict(exp_offset=-360), "expired"),
    "nbf in the future": (dict(nbf_offset=+360), "nbf"),
    "no exp": (dict(drop=("exp",)), "no exp"),
    "wrong aud": (dict(audience=OTHER_APP_ID), "audience"),
    "wrong iss": (dict(issuer="https://api.botframework.evil"), "issuer"),
    "missing serviceurl claim": (dict(service_url=None), "no serviceurl claim"),
    "serviceurl differs": (dict(service_url="https://attacker.example/amer/"), "does not match"),
}


@pytest.mark.parametrize("case", list(CHANNEL_REJECTIONS))
async def test_channel_token_rejections(auth, channel_identity, clock, case):
    spec, expected = CHANNEL_REJECTIONS[case]
    kwargs = {key: spec[key] for key in ("drop", "audience", "issuer") if key in spec}
    if "exp_offset" in spec:
        kwargs["exp"] = clock.now + spec["exp_offset"]
    if "nbf_offset" in spec:
        kwargs["nbf"] = clock.now + spec["nbf_offset"]
    service_url = spec.get("service_url", SERVICE_URL)
    token = channel_identity.mint_channel_token(APP_ID, service_url, **kwargs)
    assert expected in await rejected(auth, bearer(token), activity())
    # The same authenticator still accepts a good token: nothing was poisoned.
    good = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    assert (await auth.authenticate(bearer(good), activity())).kind == "channel"


# The activity's serviceUrl differs from the claim only by what urlsplit would fold away:
# an empty query or fragment, an empty port. The Connector refuses such URLs, so accepting
# them would fail the turn and overwrite the stored reference with an unusable URL.
@pytest.mark.parametrize(
    "service_url",
    [
        "https://smba.trafficmanager.net/amer/?",
        "https://smba.trafficmanager.net/amer/#",
        "https://smba.trafficmanager.net:/amer/",
        "https://smba.trafficmanager.net/amer/?#",
    ],
)
async def test_a_service_url_that_only_folds_to_the_claim_is_rejected(
    auth, channel_identity, service_url
):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    assert "serviceUrl" in await rejected(auth, bearer(token), activity(service_url))


async def test_a_claim_that_only_folds_to_the_service_url_is_rejected(auth, channel_identity):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL + "?")
    assert "serviceUrl" in await rejected(auth, bearer(token), activity())


async def test_case_default_port_and_trailing_slash_still_match(auth, channel_identity):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    for same in (
        "HTTPS://SMBA.trafficmanager.net/amer",
        "https://smba.trafficmanager.net:443/amer/",
    ):
        assert (await auth.authenticate(bearer(token), activity(same))).kind == "channel"


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer a b", "Bearer " + "a" * 20_000],
)
async def test_missing_or_malformed_header(auth, channel_identity, header):
    await rejected(auth, header, activity())
    assert channel_identity.metadata_requests == 0


async def test_several_authorization_values_are_rejected(auth, channel_identity):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    for header in (f"Bearer {token}, Bearer {token}", f"Bearer {token},Bearer {token}"):
        await rejected(auth, header, activity())
    assert channel_identity.jwks_requests == 0


def unsigned(header: object, payload: object) -> str:
    """A token with any JSON header and payload and a junk signature."""
    encoded = json.dumps(header).replace('"DEEP"', "[" * 5000 + "]" * 5000)
    parts = (encoded.encode(), json.dumps(payload).encode(), b"x" * 256)
    return ".".join(base64.urlsafe_b64encode(p).rstrip(b"=").decode() for p in parts)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "RS256", "x5t": "only-x5t"},  # no kid: never guessed from x5t
        {"alg": "RS256", "kid": {"nested": ["kid"]}},
        {"alg": "RS256", "kid": ""},
        {"alg": "RS256", "kid": "k" * 300},
        {"alg": ["RS256"], "kid": "k"},
        {"alg": "rs256", "kid": "k"},
        {"alg": "RS256", "kid": "k", "b64": False},
        [{"alg": "RS256", "kid": "k"}],
        {"alg": "RS256", "kid": "k", "deep": "DEEP"},  # past the JSON parser's limit
    ],
)
async def test_odd_jwt_headers_are_rejected_without_fetching_keys(auth, channel_identity, header):
    payload = {"iss": "https://api.botframework.com", "aud": APP_ID, "serviceurl": SERVICE_URL}
    await rejected(auth, bearer(unsigned(header, payload)), activity())
    assert channel_identity.jwks_requests == 0


@pytest.mark.parametrize("kind", ["garbage", "alg_none", "hs256_public_key"])
async def test_forged_tokens_rejected_before_any_key_is_fetched(auth, channel_identity, kind):
    token = channel_identity.mint_broken(kind, APP_ID, SERVICE_URL)
    await rejected(auth, bearer(token), activity())
    assert channel_identity.jwks_requests == 0


@pytest.mark.parametrize("kind", ["unknown_kid", "unpublished_key"])
async def test_tokens_signed_outside_the_jwks(auth, channel_identity, kind):
    token = channel_identity.mint_broken(kind, APP_ID, SERVICE_URL)
    reason = await rejected(auth, bearer(token), activity())
    assert "unknown key id" in reason


async def test_signature_must_match_the_published_key(auth, channel_identity):
    # The published kid in the header, but signed by a key that is not the published one.
    claims = {"iss": "https://api.botframework.com", "aud": APP_ID, "serviceurl": SERVICE_URL}
    claims |= {"nbf": int(time.time()), "exp": int(time.time()) + 600}
    forged = jwt.encode(
        claims,
        channel_identity.unpublished_key.private_key,
        algorithm="RS256",
        headers={"kid": channel_identity.signing_kid},
    )
    assert "signature" in await rejected(auth, bearer(forged), activity())
    # A genuine signature over another payload (the serviceUrl swapped for an attacker's).
    genuine = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    attacker = channel_identity.mint_channel_token(APP_ID, "https://attacker.example/")
    header, _, signature = genuine.split(".")
    spliced = ".".join((header, attacker.split(".")[1], signature))
    reason = await rejected(auth, bearer(spliced), activity("https://attacker.example/"))
    assert "signature" in reason


async def test_key_not_endorsed_for_the_channel(auth, channel_identity):
    kid = channel_identity.rotate_key(endorsements=["webchat"])
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, kid=kid)
    assert (
        await auth.authenticate(bearer(token), activity(channel_id="webchat"))
    ).kind == "channel"
    assert "endorsed" in await rejected(auth, bearer(token), activity(channel_id="msteams"))
    assert "endorsed" in await rejected(auth, bearer(token), activity(channel_id=None))


@pytest.mark.parametrize("endorsements", [None, []], ids=["none", "empty"])
async def test_a_channel_key_without_endorsements_speaks_for_no_channel(
    auth, channel_identity, endorsements
):
    # Unlike AAD's keys, a Bot Framework key must name the channel: naming none allows none.
    kid = channel_identity.rotate_key(endorsements=endorsements)
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, kid=kid)
    assert "endorsed" in await rejected(auth, bearer(token), activity(channel_id="msteams"))


async def test_emulator_key_endorsed_for_other_channels_only(auth, emulator_identity):
    # AAD keys carry no endorsements (any channel); a key that has them is held to them.
    kid = emulator_identity.rotate_key(endorsements=["webchat"])
    token = emulator_identity.mint_emulator_token(APP_ID, version="2.0", kid=kid)
    webchat = activity("http://localhost:53000", "webchat")
    assert (await auth.authenticate(bearer(token), webchat)).kind == "emulator"
    for channel_id in ("emulator", "WebChat", None):
        reason = await rejected(auth, bearer(token), activity("http://localhost:53000", channel_id))
        assert "endorsed" in reason


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"exp": "9999999999"}, "no exp"),
        ({"exp": True}, "no exp"),
        ({"exp": None}, "no exp"),
        ({"exp": float("inf")}, "no exp"),  # serialised as Infinity, parsed back as inf
        ({"exp": float("nan")}, "no exp"),
        ({"exp": 10**400}, ""),
        ({"nbf": "0"}, "nbf"),
        ({"nbf": False}, "nbf"),
        ({"nbf": float("-inf")}, "nbf"),
        ({"aud": [OTHER_APP_ID]}, "audience"),
        ({"aud": {"id": APP_ID}}, "audience"),
        ({"iss": "https://api.botframework.com/"}, "issuer"),
        ({"iss": "HTTPS://api.botframework.com"}, "issuer"),
        ({"serviceurl": ["https://smba.trafficmanager.net/amer/"]}, "serviceurl"),
    ],
)
async def test_claims_of_the_wrong_type_or_near_misses(auth, channel_identity, claims, expected):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, claims=claims)
    assert expected in await rejected(auth, bearer(token), activity())


async def test_audience_list_must_contain_the_app_id(auth, channel_identity):
    token = channel_identity.mint_channel_token(
        APP_ID, SERVICE_URL, claims={"aud": [OTHER_APP_ID, APP_ID]}
    )
    assert (await auth.authenticate(bearer(token), activity())).kind == "channel"


async def test_reasons_quote_untrusted_values_briefly(auth, channel_identity):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    reason = await rejected(auth, bearer(token), activity(channel_id="c" * 100_000))
    assert "endorsed" in reason
    assert len(reason) < 500


async def test_endorsements_are_matched_exactly(auth, channel_identity):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    for channel_id in ("MSTeams", "msteams ", "msteams\x00", ""):
        assert "endorsed" in await rejected(auth, bearer(token), activity(channel_id=channel_id))


# case: (mint_emulator_token arguments, expected reason)
EMULATOR_REJECTIONS = {
    "another app (appid)": (dict(version="1.0", caller=OTHER_APP_ID), "another app"),
    "another app (azp)": (dict(version="2.0", caller=OTHER_APP_ID), "another app"),
    "v1 without appid": (dict(version="1.0", drop=("appid",)), "names no calling app"),
    "v2 without azp": (dict(version="2.0", drop=("azp",)), "names no calling app"),
    "no ver": (dict(version="2.0", drop=("ver",)), "ver"),
    "unknown ver": (dict(version="2.0", claims={"ver": "3.0"}), "ver"),
    "wrong aud": (dict(version="2.0", audience=OTHER_APP_ID), "audience"),
    "untrusted tenant": (
        dict(version="2.0", tenant="72f988bf-86f1-41af-91ab-2d7cd011db47"),
        "issuer",
    ),
    "no exp": (dict(version="1.0", drop=("exp",)), "no exp"),
    "expired": (dict(version="1.0", lifetime=-1000), "expired"),
    # A user's delegated token for the bot's own app (scp): the Emulator signs in as the app.
    "user token (v2)": (dict(version="2.0", claims={"scp": "access_as_user"}), "user token"),
    "user token (v1)": (dict(version="1.0", claims={"scp": "user_impersonation"}), "user token"),
}


@pytest.mark.parametrize("case", list(EMULATOR_REJECTIONS))
async def test_emulator_token_rejections(auth, emulator_identity, case):
    spec, expected = EMULATOR_REJECTIONS[case]
    token = emulator_identity.mint_emulator_token(APP_ID, **spec)
    emulator_activity = activity("http://localhost:53000", "emulator")
    assert expected in await rejected(auth, bearer(token), emulator_activity)


async def test_tokens_verified_against_the_right_issuers_keys(
    auth, channel_identity, emulator_identity
):
    # Channel-shaped token signed with an AAD key, and an Emulator token signed with a channel key.
    forged_channel = emulator_identity.mint_channel_token(
        APP_ID, SERVICE_URL, issuer="https://api.botframework.com"
    )
    assert "unknown key id" in await rejected(auth, bearer(forged_channel), activity())
    forged_emulator = channel_identity.mint_emulator_token(APP_ID, version="2.0")
    assert "unknown key id" in await rejected(
        auth, bearer(forged_emulator), activity("http://localhost:1", "emulator")
    )


async def test_odd_activity_values_are_auth_errors(auth, channel_identity):
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    for act in (activity(123), activity("http://[::1"), activity(SERVICE_URL, {"x": 1}), {}):
        assert not (await rejected(auth, bearer(token), act)).startswith("unexpected")


# -- the key cache ------------------------------------------------------------------------


async def test_keys_are_cached(auth, channel_identity):
    for _ in range(5):
        token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
        await auth.authenticate(bearer(token), activity())
    assert (channel_identity.metadata_requests, channel_identity.jwks_requests) == (1, 1)


async def test_unknown_kid_at_cold_start_costs_one_fetch(auth, channel_identity):
    unknown = channel_identity.mint_broken("unknown_kid", APP_ID, SERVICE_URL)
    assert "unknown key id" in await rejected(auth, bearer(unknown), activity())
    assert (channel_identity.metadata_requests, channel_identity.jwks_requests) == (1, 1)


async def test_key_source_documents_are_limited_in_size_and_time():
    async def big(request: web.Request) -> web.Response:
        return web.json_response({"jwks_uri": "https://x/keys", "pad": "x" * (2 << 20)})

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(60):  # a byte every 50 ms: a slow-loris answer
            await asyncio.sleep(0.05)
            await response.write(b" ")
        return response

    app = web.Application()
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    with BackgroundServer(app) as server:
        async with aiohttp.ClientSession() as session:

            async def shared_session() -> aiohttp.ClientSession:
                return session

            for path, reason in (("/big", "too large"), ("/slow", "longer than")):
                cache = OpenIdKeyCache(server.url + path, shared_session, timeout=0.5)
                started = time.monotonic()
                with pytest.raises(KeySourceError, match=reason):
                    await cache.get("kid")
                assert time.monotonic() - started < 3


async def test_key_source_urls_are_logged_without_their_query(caplog):
    # A metadata URL may carry a function key or signature in its query: the refresh's log
    # lines and errors show scheme, host and path only.
    keys = {"keys": [jwk()]}

    async def meta(request: web.Request) -> web.Response:
        if request.path == "/broken":
            return web.json_response({"jwks_uri": f"{server.url}/gone?sig=S3CRET-SIG"})
        return web.json_response({"jwks_uri": f"{server.url}/keys?sig=S3CRET-SIG"})

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(keys)

    app = web.Application()
    app.router.add_get("/meta", meta)
    app.router.add_get("/broken", meta)
    app.router.add_get("/keys", jwks)
    with BackgroundServer(app) as server:
        async with aiohttp.ClientSession() as session:

            async def shared_session() -> aiohttp.ClientSession:
                return session

            with caplog.at_level("INFO", logger="shared.auth.keys"):
                good = OpenIdKeyCache(server.url + "/meta?code=FUNCTION-KEY", shared_session)
                assert await good.get("good") is not None
                broken = OpenIdKeyCache(server.url + "/broken?code=FUNCTION-KEY", shared_session)
                with pytest.raises(KeySourceError) as raised:
                    await broken.get("good")
    assert "/gone answered HTTP 404" in str(raised.value)
    assert "signing keys refreshed url=http://" in caplog.text
    assert "/meta kids=" in caplog.text
    for secret in ("FUNCTION-KEY", "S3CRET-SIG"):
        assert secret not in caplog.text and secret not in str(raised.value)


async def test_after_a_cold_fetch_timed_out_requests_wait_before_fetching_again():
    # A key endpoint that accepts and never answers (packets dropped): the attempt ends at
    # the fetch timeout, as long as the pause between cold attempts (5 s), and the pause
    # counted from the attempt's start. Every request then fetched again and waited the
    # whole timeout for its 503.
    now = [1000.0]
    hits = []

    async def hang(request: web.Request) -> web.Response:
        hits.append(request.path)
        now[0] += 6  # the attempt takes longer than the pause between cold attempts
        await asyncio.sleep(1)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/meta", hang)
    with BackgroundServer(app) as server:
        async with aiohttp.ClientSession() as session:

            async def shared_session() -> aiohttp.ClientSession:
                return session

            cache = OpenIdKeyCache(
                server.url + "/meta", shared_session, timeout=0.3, clock=lambda: now[0]
            )
            with pytest.raises(KeySourceError, match="longer than"):
                await cache.get("kid")
            started = time.monotonic()
            with pytest.raises(KeySourceError):
                await cache.get("kid")
            assert time.monotonic() - started < 0.2  # answered at once, no second wait
            assert len(hits) == 1
            now[0] += 5  # the pause is over: tried again
            with pytest.raises(KeySourceError):
                await cache.get("kid")
            assert len(hits) == 2


def jwk(bits: int = 2048, **fields) -> dict:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    numbers = key.public_numbers()

    def b64(value: int) -> str:
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    fixed = {"kty": "RSA", "use": "sig", "kid": "good", "n": b64(numbers.n), "e": b64(numbers.e)}
    return fixed | fields


def test_jwks_entries_that_are_not_rsa_signing_keys_of_2048_bits_are_skipped():
    good = jwk(endorsements=["msteams", 7])
    keys = parse_jwks(
        {
            "keys": [
                good,
                jwk(kid="weak", bits=1024),
                jwk(kid="enc", use="enc"),
                dict(good, kid="ec", kty="EC"),
                dict(good, kid="no-n", n=""),
                dict(good, kid="e-one", e="AQ"),  # e = 1 would make every signature valid
                dict(good, kid=None),
                "not an object",
            ]
        }
    )
    assert list(keys) == ["good"]
    assert keys["good"].endorsements == frozenset({"msteams"})
    with pytest.raises(KeySourceError):
        parse_jwks({"keys": [jwk(kid="weak", bits=1024)]})
    with pytest.raises(KeySourceError):
        parse_jwks({"keys": {"good": good}})


async def test_rotated_key_accepted_and_refresh_rate_limited(auth, channel_identity, clock):
    await auth.authenticate(
        bearer(channel_identity.mint_channel_token(APP_ID, SERVICE_URL)), activity()
    )
    assert channel_identity.jwks_requests == 1

    # A key rolled out after caching: the unknown kid triggers one refetch, then it is accepted.
    channel_identity.rotate_key()
    rotated = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    assert (await auth.authenticate(bearer(rotated), activity())).kind == "channel"
    assert channel_identity.jwks_requests == 2

    # Within the minute, further unknown kids do not refetch (and are 401s, not crashes).
    channel_identity.rotate_key()
    newer = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    clock.advance(30)
    await rejected(auth, bearer(newer), activity())
    await rejected(
        auth, bearer(channel_identity.mint_broken("unknown_kid", APP_ID, SERVICE_URL)), activity()
    )
    assert channel_identity.jwks_requests == 2

    # A minute after the last refetch, the next unknown kid refetches again.
    clock.advance(31)
    assert (await auth.authenticate(bearer(newer), activity())).kind == "channel"
    assert channel_identity.jwks_requests == 3


async def test_concurrent_unknown_kids_share_one_fetch(auth, channel_identity):
    await auth.authenticate(
        bearer(channel_identity.mint_channel_token(APP_ID, SERVICE_URL)), activity()
    )
    channel_identity.rotate_key()
    tokens = [channel_identity.mint_channel_token(APP_ID, SERVICE_URL) for _ in range(20)]
    results = await asyncio.gather(*(auth.authenticate(bearer(t), activity()) for t in tokens))
    assert all(r.kind == "channel" for r in results)
    assert (channel_identity.metadata_requests, channel_identity.jwks_requests) == (2, 2)


async def test_concurrent_cold_start_shares_one_fetch(auth, channel_identity):
    tokens = [channel_identity.mint_channel_token(APP_ID, SERVICE_URL) for _ in range(20)]
    results = await asyncio.gather(*(auth.authenticate(bearer(t), activity()) for t in tokens))
    assert {r.kind for r in results} == {"channel"}
    assert (channel_identity.metadata_requests, channel_identity.jwks_requests) == (1, 1)


async def test_outage_with_cached_keys_does_not_stop_valid_traffic(auth, channel_identity, clock):
    await auth.authenticate(
        bearer(channel_identity.mint_channel_token(APP_ID, SERVICE_URL)), activity()
    )
    channel_identity.set_outage(True)
    clock.advance(2 * 24 * 3600)  # long past the daily refresh
    for _ in range(3):
        token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, now=clock.now)
        assert (await auth.authenticate(bearer(token), activity())).kind == "channel"
        clock.advance(61)
    # A kid it has not cached may be a key rolled out during the outage: not judged, so
    # not the 401 of a bad token (the answer is a 503 the channel may retry).
    unknown = channel_identity.mint_broken("unknown_kid", APP_ID, SERVICE_URL, now=clock.now)
    assert "unknown key id" in await keys_unavailable(auth, unknown)
    assert channel_identity.metadata_requests >= 2  # it did try, and kept the cached keys
    channel_identity.set_outage(False)  # back: once the pause has passed, it is refetched
    clock.advance(5)
    unknown = channel_identity.mint_broken("unknown_kid", APP_ID, SERVICE_URL, now=clock.now)
    assert "unknown key id" in await rejected(auth, bearer(unknown), activity())


async def test_a_key_rolled_out_while_its_fetch_failed_is_fetched_after_the_retry_after(
    auth, channel_identity, clock
):
    # The channel signs with a new key; the one refetch for it fails. The 503 says
    # Retry-After 5: the channel's retry after it must find the key, not the failure
    # again for the rest of the minute that unknown kids wait between fetches.
    await auth.authenticate(
        bearer(channel_identity.mint_channel_token(APP_ID, SERVICE_URL)), activity()
    )
    channel_identity.rotate_key()
    channel_identity.set_outage(True)
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, now=clock.now)
    assert "unknown key id" in await keys_unavailable(auth, token)
    channel_identity.set_outage(False)
    fetches = channel_identity.metadata_requests
    assert "unknown key id" in await keys_unavailable(auth, token)  # no fetch before the pause
    assert channel_identity.metadata_requests == fetches
    clock.advance(COLD_RETRY_INTERVAL)
    assert (await auth.authenticate(bearer(token), activity())).kind == "channel"
    # Unknown kids made up meanwhile still cost a fetch a minute at most.
    made_up = channel_identity.mint_broken("unknown_kid", APP_ID, SERVICE_URL, now=clock.now)
    fetches = channel_identity.metadata_requests
    for _ in range(3):
        clock.advance(COLD_RETRY_INTERVAL)
        assert "unknown key id" in await rejected(auth, bearer(made_up), activity())
    assert channel_identity.metadata_requests <= fetches + 1


async def test_keys_refreshed_daily(auth, channel_identity, clock):
    await auth.authenticate(
        bearer(channel_identity.mint_channel_token(APP_ID, SERVICE_URL)), activity()
    )
    clock.advance(3600)
    await auth.authenticate(
        bearer(channel_identity.mint_channel_token(APP_ID, SERVICE_URL)), activity()
    )
    assert channel_identity.jwks_requests == 1
    clock.advance(24 * 3600)
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, now=clock.now)
    assert (await auth.authenticate(bearer(token), activity())).kind == "channel"
    for _ in range(100):  # the refresh runs beside the request, not in front of it
        if channel_identity.jwks_requests == 2:
            break
        await asyncio.sleep(0.02)
    assert channel_identity.jwks_requests == 2


async def keys_unavailable(auth: InboundAuthenticator, token: str) -> str:
    with pytest.raises(KeysUnavailable) as caught:
        await auth.authenticate(bearer(token), activity())
    assert token not in str(caught.value)
    return str(caught.value)


async def test_outage_without_cached_keys_is_keys_unavailable(auth, channel_identity, clock):
    # Not the token's fault: the answer must not tell the channel its valid token is bad.
    channel_identity.set_outage(True)
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    assert "unavailable" in await keys_unavailable(auth, token)
    # Retried after a short pause, not on every request.
    channel_identity.set_outage(False)
    assert "unavailable" in await keys_unavailable(auth, token)
    assert channel_identity.metadata_requests == 1
    clock.advance(5)
    assert (await auth.authenticate(bearer(token), activity())).kind == "channel"


async def test_a_key_endpoint_that_refuses_connections_is_keys_unavailable(
    channel_identity, emulator_identity, clock
):
    with socket.socket() as closed:  # a port nothing listens on once this socket is closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = Settings.from_env(
        {
            "MicrosoftAppId": APP_ID,
            "BOT_OPENID_METADATA_URL": f"http://127.0.0.1:{port}/v1/.well-known/openid",
        }
    )
    authenticator = InboundAuthenticator(settings, clock=clock)
    try:
        token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
        await keys_unavailable(authenticator, token)
    finally:
        await authenticator.close()


def non_loopback_address() -> str | None:
    """This machine's address on its outbound interface (no packet is sent), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed, never reached
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("way", ["ending there", "passing through"])
async def test_keys_behind_a_redirect_to_plain_http_off_loopback_are_never_used(
    channel_identity, clock, way
):
    # The metadata (loopback, plain http allowed) names a key URL that redirects to plain
    # http on another address: the keys fetched there, or where that address sends on to
    # (back to loopback, say), could have been changed on the way.
    elsewhere = non_loopback_address()
    if elsewhere is None:
        pytest.skip("this machine has no address but loopback to redirect to")
    jwks = channel_identity.jwks_document()
    off = web.Application()

    async def keys(request: web.Request) -> web.Response:
        return web.json_response(jwks)

    async def bounce(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{local_port}/keys")

    off.router.add_get("/jwks", keys)
    off.router.add_get("/bounce", bounce)
    local = web.Application()
    local.router.add_get("/keys", keys)
    local_port = 0

    async def metadata(request: web.Request) -> web.Response:
        jwks_uri = f"http://127.0.0.1:{local_port}/jwks"
        return web.json_response({"issuer": "https://api.botframework.com", "jwks_uri": jwks_uri})

    async def redirect(request: web.Request) -> web.Response:
        path = "/jwks" if way == "ending there" else "/bounce"
        raise web.HTTPFound(f"http://{elsewhere}:{off_port}{path}")

    local.router.add_get("/metadata", metadata)
    local.router.add_get("/jwks", redirect)
    runners = [web.AppRunner(off), web.AppRunner(local)]
    for runner in runners:
        await runner.setup()
    off_site = web.TCPSite(runners[0], elsewhere, 0)
    local_site = web.TCPSite(runners[1], "127.0.0.1", 0)
    await off_site.start()
    await local_site.start()
    off_port = off_site._server.sockets[0].getsockname()[1]
    local_port = local_site._server.sockets[0].getsockname()[1]
    settings = Settings.from_env(
        {
            "MicrosoftAppId": APP_ID,
            "BOT_OPENID_METADATA_URL": f"http://127.0.0.1:{local_port}/metadata",
        }
    )
    authenticator = InboundAuthenticator(settings, clock=clock)
    try:
        token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
        assert "must be https" in await keys_unavailable(authenticator, token)
    finally:
        await authenticator.close()
        for runner in runners:
            await runner.cleanup()


async def test_emulator_keys_outage_is_keys_unavailable(auth, emulator_identity):
    emulator_identity.set_outage(True)
    await keys_unavailable(auth, emulator_identity.mint_emulator_token(APP_ID))


@pytest.mark.parametrize(
    "fault",
    ["other audience", "expired", "not valid yet", "no exp"],
)
async def test_during_an_outage_a_token_wrong_whatever_its_signature_is_still_a_401(
    auth, channel_identity, clock, fault
):
    mint = {
        "other audience": lambda: channel_identity.mint_channel_token(OTHER_APP_ID, SERVICE_URL),
        "expired": lambda: channel_identity.mint_channel_token(
            APP_ID, SERVICE_URL, now=clock.now - 7200
        ),
        "not valid yet": lambda: channel_identity.mint_channel_token(
            APP_ID, SERVICE_URL, nbf=clock.now + 3600
        ),
        "no exp": lambda: channel_identity.mint_channel_token(APP_ID, SERVICE_URL, drop=("exp",)),
    }
    channel_identity.set_outage(True)
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(bearer(mint[fault]()), activity())
    assert not isinstance(caught.value, KeysUnavailable)


@pytest.mark.parametrize(
    "fault", ["serviceurl of another host", "no serviceurl", "no serviceUrl in the activity"]
)
async def test_during_an_outage_a_channel_token_for_another_service_url_is_still_a_401(
    auth, channel_identity, fault
):
    # It could never be accepted, whatever its signature: answered 503 it said "retry".
    service_url = {"serviceurl of another host": "https://elsewhere.example/"}.get(
        fault, SERVICE_URL
    )
    drop = ("serviceurl",) if fault == "no serviceurl" else ()
    token = channel_identity.mint_channel_token(APP_ID, service_url, drop=drop)
    incoming = activity()
    if fault == "no serviceUrl in the activity":
        del incoming["serviceUrl"]
    channel_identity.set_outage(True)
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(bearer(token), incoming)
    assert not isinstance(caught.value, KeysUnavailable)


@pytest.mark.parametrize("fault", ["another app", "a user token", "no known ver"])
async def test_during_an_outage_an_emulator_token_wrong_whatever_its_signature_is_a_401(
    auth, emulator_identity, fault
):
    mint = {
        "another app": lambda: emulator_identity.mint_emulator_token(APP_ID, caller=OTHER_APP_ID),
        "a user token": lambda: emulator_identity.mint_emulator_token(
            APP_ID, claims={"scp": "user_impersonation"}
        ),
        "no known ver": lambda: emulator_identity.mint_emulator_token(
            APP_ID, claims={"ver": "3.0"}
        ),
    }
    emulator_identity.set_outage(True)
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(bearer(mint[fault]()), activity())
    assert not isinstance(caught.value, KeysUnavailable)


async def test_an_unknown_kid_after_a_successful_refetch_is_a_token_fault(auth, channel_identity):
    unknown = channel_identity.mint_broken("unknown_kid", APP_ID, SERVICE_URL)
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(bearer(unknown), activity())
    assert not isinstance(caught.value, KeysUnavailable)
    assert "unknown key id" in str(caught.value)


async def test_plain_http_metadata_refused_unless_loopback(channel_identity):
    settings = Settings(
        app_id=APP_ID,
        openid_metadata_url="http://login.botframework.example/v1/.well-known/openidconfiguration",
    )
    auth = InboundAuthenticator(settings)
    try:
        token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
        assert "https" in await rejected(auth, bearer(token), activity())
    finally:
        await auth.close()


async def test_plain_http_jwks_uri_refused(auth, channel_identity):
    channel_identity.metadata_overrides["jwks_uri"] = "http://login.botframework.example/keys"
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    assert "jwks_uri" in await rejected(auth, bearer(token), activity())
    assert channel_identity.jwks_requests == 0


async def test_validation_with_cached_keys_is_fast(auth, channel_identity):
    tokens = [channel_identity.mint_channel_token(APP_ID, SERVICE_URL) for _ in range(50)]
    await auth.authenticate(bearer(tokens[0]), activity())
    start = time.perf_counter()
    for token in tokens * 4:
        await auth.authenticate(bearer(token), activity())
    per_token = (time.perf_counter() - start) / 200
    assert per_token < 0.003, f"{per_token * 1000:.2f} ms per token"
    assert channel_identity.jwks_requests == 1


# -- anonymous mode and callerId ----------------------------------------------------------


async def test_anonymous_mode_only_for_loopback_service_urls(channel_identity):
    auth = InboundAuthenticator(Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"}))
    try:
        for url in ("http://127.0.0.1:3978/", "http://localhost:53000", "http://[::1]:8080/x"):
            identity = await auth.authenticate(None, activity(url, "emulator"))
            assert identity == ANONYMOUS
            assert (identity.authenticated, identity.kind, identity.app_id) == (
                False,
                "anonymous",
                "",
            )
            assert auth.caller_id(identity) is None
        token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
        for url in (SERVICE_URL, "http://10.0.0.1/", "http://localhost.evil.example/", None):
            await rejected(auth, bearer(token), activity(url))
            await rejected(auth, None, activity(url))
    finally:
        await auth.close()
    assert channel_identity.metadata_requests == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example\\@127.0.0.1:3978/",  # urlsplit: 127.0.0.1; WHATWG: evil.example
        "http://127.0.0.1:3978\\@evil.example/",
        "http://user@127.0.0.1:3978/",  # userinfo: the Connector client refuses it
        "http://localhost@evil.example/",
        "http://127.0.0.1.evil.example/",
        "http://127.0.0.1:3978/\tx",
        " http://127.0.0.1:3978/",
        "http://localhost:3978/\u212a",
        "http://0x7f.0.0.1/",
        "http://localhost./",
    ],
)
async def test_anonymous_mode_refuses_urls_that_only_look_loopback(url):
    auth = InboundAuthenticator(Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"}))
    try:
        reason = await rejected(auth, None, activity(url, "emulator"))
        assert not reason.startswith("unexpected")  # refused, not crashed
    finally:
        await auth.close()


async def test_an_app_id_turns_anonymous_mode_off():
    settings = Settings.from_env({"MicrosoftAppId": APP_ID, "BOT_ALLOW_UNAUTHENTICATED": "true"})
    strict = InboundAuthenticator(settings)
    assert "Authorization" in await rejected(strict, None, activity("http://127.0.0.1:3978/"))
    await strict.close()


async def test_caller_id_per_cloud(channel_identity):
    with IdentityService.channel("usgov") as usgov:
        env = {"MicrosoftAppId": APP_ID, "BOT_CHANNEL_SERVICE": "usgov"}
        settings = Settings.from_env({**env, "BOT_OPENID_METADATA_URL": usgov.metadata_url})
        auth = InboundAuthenticator(settings)
        try:
            token = usgov.mint_channel_token(APP_ID, SERVICE_URL)
            identity = await auth.authenticate(bearer(token), activity())
            assert auth.caller_id(identity) == "urn:botframework:azureusgov"
            # A public-cloud channel token is not a US Gov one.
            public = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
            assert "issuer" in await rejected(auth, bearer(public), activity())
            assert auth.caller_id(ANONYMOUS) is None
        finally:
            await auth.close()


# -- a token the channel sends again -------------------------------------------------------


async def test_a_repeated_token_is_verified_once_and_still_fully_checked(
    auth, channel_identity, clock, monkeypatch
):
    # The channel reuses one token for an hour: its RSA signature is checked once. Counted
    # by wrapping PyJWT's decode (a library call, not the authenticator's internals).
    verified = []
    original = jwt.decode

    def counting(token, key=None, *args, **kwargs):
        if key is not None:
            verified.append(token)
        return original(token, key, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL, lifetime=600)
    for _ in range(3):
        assert (await auth.authenticate(bearer(token), activity())).kind == "channel"
    assert len(verified) == 1
    # Every claim check still runs on each use.
    other = "https://smba.trafficmanager.net/emea/"
    assert "serviceurl" in await rejected(auth, bearer(token), activity(service_url=other))
    assert "not endorsed" in await rejected(auth, bearer(token), activity(channel_id="slack"))
    clock.advance(600 + 301)
    assert "expired" in await rejected(auth, bearer(token), activity())


async def test_a_repeated_token_signed_by_a_key_no_longer_published_is_rejected(
    auth, channel_identity
):
    old = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    assert (await auth.authenticate(bearer(old), activity())).kind == "channel"
    channel_identity.rotate_key(retire_old=True)  # the old key leaves the JWKS
    new = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    assert (await auth.authenticate(bearer(new), activity())).kind == "channel"  # refetched
    assert "unknown key id" in await rejected(auth, bearer(old), activity())


async def test_a_repeated_token_is_verified_again_when_its_kid_names_another_key(
    auth, channel_identity, clock
):
    # A rotation that reuses the kid: the JWKS now publishes another key under it. A token
    # the old key verified no longer verifies, whatever was remembered of it.
    token = channel_identity.mint_channel_token(APP_ID, SERVICE_URL)
    assert (await auth.authenticate(bearer(token), activity())).kind == "channel"
    other = channel_identity.unpublished_key.jwk
    reused = {**channel_identity.signing_key.jwk, "n": other["n"], "e": other["e"]}

    async def keys(request: web.Request) -> web.Response:
        return web.json_response({"keys": [reused]})

    app = web.Application()
    app.router.add_get("/keys", keys)
    with BackgroundServer(app) as server:
        channel_identity.metadata_overrides["jwks_uri"] = server.url + "/keys"
        clock.advance(61)  # an unknown kid refetches the keys again
        unknown = channel_identity.mint_broken("unknown_kid", APP_ID, SERVICE_URL)
        assert "unknown key id" in await rejected(auth, bearer(unknown), activity())
        assert "signature" in await rejected(auth, bearer(token), activity())


async def test_a_flood_of_distinct_tokens_leaves_memory_bounded(auth):
    # Each token string is remembered once parsed (the channel reuses one for an hour); a
    # sender of ever new tokens must not grow the process. 1,200 tokens of about 13 KB
    # would hold about 16 MB; the most recent 256 about 3.5 MB.
    pad = "x" * 9_800
    header = {"alg": "RS256", "kid": "k", "typ": "JWT"}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1_200):
            token = unsigned(header, {"iss": "https://issuer.example", "n": i, "pad": pad})
            assert "issuer" in await rejected(auth, bearer(token), activity())
        del token
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 6 * 2**20


# -- the serviceUrl shape on Emulator tokens ----------------------------------------------


# Emulator tokens carry no serviceurl claim, so nothing compared the activity's serviceUrl
# with anything: a URL the Connector client refuses passed authentication, failed the turn
# (500) and overwrote the stored reference with an address no proactive send can use.
@pytest.mark.parametrize(
    "service_url",
    [
        "http://localhost:53000/?",
        "http://localhost:53000/#",
        "http://localhost:/x",
        "http://localhost:53000/a/..;/x",
        "http://localhost:53000/a/%2e%2e/x",
        "http://10.0.0.1:53000/",  # plain http to a host that is not loopback
        "https://smba.trafficmanager.net\\amer/",
        "https://user@smba.trafficmanager.net/amer/",
        " https://smba.trafficmanager.net/amer/",
        None,
    ],
)
async def test_emulator_token_with_a_malformed_service_url_is_rejected(
    auth, emulator_identity, service_url
):
    token = emulator_identity.mint_emulator_token(APP_ID, version="2.0")
    assert "serviceUrl" in await rejected(auth, bearer(token), activity(service_url, "emulator"))
