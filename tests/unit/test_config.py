"""Settings: defaults, validation, and errors that name the setting."""

from __future__ import annotations

import pytest

from shared.config import CLOUDS, Settings, SettingsError, is_loopback_host

BASE = {"MicrosoftAppId": "app-1", "MicrosoftAppPassword": "s3cret"}


def settings(**overrides: str) -> Settings:
    return Settings.from_env({**BASE, **overrides})


def test_defaults_match_the_design():
    s = settings()
    assert s.app_type == "MultiTenant"
    assert s.channel_service == "public"
    assert s.openid_metadata_url == CLOUDS["public"].openid_metadata_url
    assert s.emulator_openid_metadata_url == CLOUDS["public"].emulator_openid_metadata_url
    assert s.login_authority == "https://login.microsoftonline.com"
    assert s.oauth_scope == "https://api.botframework.com/.default"
    assert s.channel_issuer == "https://api.botframework.com"
    assert s.references_container == "conversation-references"
    assert s.proactive_queue == "proactive-messages"
    assert len(s.schedule.split()) == 6
    assert s.max_body_bytes == 1024 * 1024
    assert s.trusted_service_urls == ()
    assert not s.auth_disabled


def test_usgov_selects_every_cloud_url():
    s = settings(BOT_CHANNEL_SERVICE="usgov")
    assert s.channel_issuer == "https://api.botframework.us"
    assert s.oauth_scope == "https://api.botframework.us/.default"
    assert s.openid_metadata_url.startswith("https://login.botframework.azure.us/")
    assert s.login_authority == "https://login.microsoftonline.us"


def test_secret_is_not_in_repr():
    assert "s3cret" not in repr(settings())


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"MicrosoftAppId": ""}, "MicrosoftAppId"),
        ({"MicrosoftAppType": "Sometimes"}, "MicrosoftAppType"),
        ({"MicrosoftAppType": "SingleTenant"}, "MicrosoftAppTenantId"),
        ({"BOT_CHANNEL_SERVICE": "mars"}, "BOT_CHANNEL_SERVICE"),
        ({"MicrosoftAppCertificatePath": "bot.pem"}, "MicrosoftAppCertificatePath"),
        ({"BOT_OPENID_METADATA_URL": "http://login.example/meta"}, "BOT_OPENID_METADATA_URL"),
        ({"BOT_LOGIN_AUTHORITY": "ftp://login.example"}, "BOT_LOGIN_AUTHORITY"),
        ({"BOT_TRUSTED_SERVICE_URLS": "http://bots.example"}, "BOT_TRUSTED_SERVICE_URLS"),
        ({"BOT_ALLOW_UNAUTHENTICATED": "maybe"}, "BOT_ALLOW_UNAUTHENTICATED"),
        ({"BOT_PROACTIVE_QUEUE": "Bad_Name"}, "BOT_PROACTIVE_QUEUE"),
        ({"BOT_REFERENCES_CONTAINER": "a"}, "BOT_REFERENCES_CONTAINER"),
        ({"BOT_SCHEDULE": "0 9 * * *"}, "BOT_SCHEDULE"),
        ({"BOT_MAX_BODY_BYTES": "lots"}, "BOT_MAX_BODY_BYTES"),
        ({"BOT_CONNECTOR_RATE_LIMIT": "0"}, "BOT_CONNECTOR_RATE_LIMIT"),
        (
            {
                "AzureWebJobsStorage": "UseDevelopmentStorage=true",
                "AzureWebJobsStorage__accountName": "x",
            },
            "AzureWebJobsStorage",
        ),
        (
            {
                "AzureWebJobsStorage__accountName": "x",
                "AzureWebJobsStorage__credential": "password",
            },
            "AzureWebJobsStorage__credential",
        ),
    ],
)
def test_bad_settings_name_the_setting(env, setting):
    with pytest.raises(SettingsError) as raised:
        settings(**env)
    assert raised.value.setting == setting
    assert setting in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_local_unauthenticated_mode_needs_the_flag_and_no_app_id():
    local = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    assert local.auth_disabled
    # With an app id the flag does not turn authentication off.
    assert not settings(BOT_ALLOW_UNAUTHENTICATED="true").auth_disabled


def test_trusted_service_urls_are_parsed():
    s = settings(BOT_TRUSTED_SERVICE_URLS=" http://127.0.0.1:3980 , https://bots.example/api ")
    assert s.trusted_service_urls == ("http://127.0.0.1:3980", "https://bots.example/api")


def test_identity_based_storage():
    s = settings(
        AzureWebJobsStorage__accountName="acct",
        AzureWebJobsStorage__credential="managedidentity",
        AzureWebJobsStorage__clientId="cid",
    )
    assert s.storage.service_uri("blob") == "https://acct.blob.core.windows.net"
    assert s.storage.service_uri("queue") == "https://acct.queue.core.windows.net"
    assert s.storage.client_id == "cid"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("127.0.0.1.evil.example", False),
        ("127.a.b.c", False),
        ("10.0.0.1", False),
        ("", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback
