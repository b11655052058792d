"""shared.serviceurl: the one parse the settings check, inbound auth and the Connector share."""

from __future__ import annotations

import pytest

from shared.config import Settings, SettingsError
from shared.connector import ConnectorClient
from shared.serviceurl import TrustPolicy, parse_service_url, prefix_problem

# What none of the three may accept: each is a URL some parser reads differently.
MALFORMED = [
    "https://bots.example/amer/?",
    "https://bots.example/amer/#",
    "https://bots.example:/amer/",
    "https://bots.example/teams/..;/x",
    "https://bots.example\\amer/",
    "https://user@bots.example/amer/",
    "https://bots.example./amer/",
    "http://bots.example/amer/",
    "https://bots.ex ample/amer/",
    "https://bots.example/amer%2Fx/",
    "https://bots.example/amer/%2e%2e/",
]


def settings(**env: str) -> Settings:
    return Settings.from_env({"MicrosoftAppId": "a", "MicrosoftAppPassword": "p", **env})


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_service_url_is_refused_by_the_settings_check_and_the_connector(url):
    assert parse_service_url(url) is None
    assert prefix_problem(url) != ""
    with pytest.raises(SettingsError):
        settings(BOT_TRUSTED_SERVICE_URLS=url)
    # On a trusted host or under a trusted prefix, the URL itself still gets no token.
    trusted = parse_service_url("https://bots.example")
    assert trusted is not None
    assert TrustPolicy(hosts=("bots.example",), prefixes=(trusted,)).target(url) is None
    teams_url = url.replace("bots.example", "smba.trafficmanager.net")
    assert not ConnectorClient(settings(), None).is_trusted(teams_url)


def test_the_policy_follows_the_settings():
    configured = settings(BOT_TRUSTED_SERVICE_URLS="https://bots.example/teams")
    policy = TrustPolicy.configured(
        configured.channel_service, configured.trusted_service_urls, loopback_only=False
    )
    assert policy.target("https://bots.example/teams/x") is not None
    assert policy.target("https://bots.example/teamsx") is None
    assert policy.target("https://smba.trafficmanager.net/amer/") is not None
    local = TrustPolicy.configured("public", (), loopback_only=True)
    assert local.target("http://127.0.0.1:3978/") is not None
    assert local.target("https://smba.trafficmanager.net/amer/") is None


class Text(str):
    """A str subclass: parsed every time, never from what an equal plain str left."""


def test_a_service_url_reads_the_same_when_met_again():
    # A process keeps its recent parses (URLs up to 256 characters); a longer URL, a str
    # subclass and a refused URL read the same on every meeting.
    long_path = "/amer/" + "a" * 300
    for url in (
        "https://SMBA.trafficmanager.net:443/amer/",
        f"https://smba.trafficmanager.net{long_path}/",
        Text("https://smba.trafficmanager.net/amer/"),
    ):
        for _ in range(2):
            target = parse_service_url(url)
            assert target is not None
            assert target.base == "https://smba.trafficmanager.net" + (
                long_path if len(url) > 256 else "/amer"
            )
    for url in MALFORMED:
        assert parse_service_url(url) is None
        assert parse_service_url(url) is None
