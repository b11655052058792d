"""Settings: defaults, validation, and errors that name the setting."""

from __future__ import annotations

import pytest
from croniter import croniter

from shared.auth.tokens import create_token_provider
from shared.config import AZURE_HOST_MARKERS, CLOUDS, Settings, SettingsError
from shared.connector import ConnectorClient, parse_service_url
from shared.urls import is_loopback_host

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


@pytest.mark.parametrize(
    "value", ["https://botframework.azure.us", "HTTPS://BotFramework.azure.us/"]
)
def test_the_sdks_us_gov_channel_service_setting_maps_over(value):
    # An existing US Gov bot's app settings: it ran as public, refusing every channel token.
    s = settings(ChannelService=value)
    assert s.channel_service == "usgov"
    assert s.channel_issuer == "https://api.botframework.us"
    assert settings(ChannelService=value, BOT_CHANNEL_SERVICE="usgov").channel_service == "usgov"
    assert settings(ChannelService="").channel_service == "public"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"ChannelService": "https://botframework.example"}, "ChannelService"),
        ({"ChannelService": "usgov"}, "ChannelService"),
        (
            {"ChannelService": "https://botframework.azure.us", "BOT_CHANNEL_SERVICE": "public"},
            "BOT_CHANNEL_SERVICE",
        ),
    ],
)
def test_a_channel_service_naming_no_cloud_or_another_is_refused(env, setting):
    with pytest.raises(SettingsError) as raised:
        settings(**env)
    assert raised.value.setting == setting


def test_secret_is_not_in_repr():
    assert "s3cret" not in repr(settings())
    # Nor the storage account's key (a bot author logging turn.settings, a traceback that
    # shows locals).
    key = "AccountKey=S3CRETKEY=="
    connection = f"DefaultEndpointsProtocol=https;AccountName=a;{key};EndpointSuffix=x"
    assert key not in repr(settings(AzureWebJobsStorage=connection))


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
        ({"BOT_SCHEDULE": "0 9 * * * * *"}, "BOT_SCHEDULE"),
        ({"BOT_MAX_BODY_BYTES": "lots"}, "BOT_MAX_BODY_BYTES"),
        ({"BOT_CONNECTOR_RATE_LIMIT": "0"}, "BOT_CONNECTOR_RATE_LIMIT"),
        (
            {"AzureWebJobsStorage__blobServiceUri": "https://[acct"},
            "AzureWebJobsStorage__blobServiceUri",
        ),
        ({"BOT_MAX_BODY_BYTES": "9" * 400}, None),  # an int too large for a float: accepted
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
    if setting is None:
        settings(**env)
        return
    with pytest.raises(SettingsError) as raised:
        settings(**env)
    assert raised.value.setting == setting
    assert setting in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_a_queue_name_whose_poison_queue_could_not_exist_is_refused(tmp_path):
    # The engine poisons to `<name>-poison`, and an Azure queue name has at most 63
    # characters: with a longer name every poison copy would fail.
    from shared.producer import producer_settings

    longest = "q" * 56
    assert settings(BOT_PROACTIVE_QUEUE=longest).proactive_queue == longest
    too_long = "q" * 57
    for read in (
        lambda: settings(BOT_PROACTIVE_QUEUE=too_long),
        lambda: producer_settings(
            {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "BOT_PROACTIVE_QUEUE": too_long},
            tmp_path,
        ),
    ):
        with pytest.raises(SettingsError) as raised:
            read()
        assert raised.value.setting == "BOT_PROACTIVE_QUEUE"
        assert "56" in raised.value.problem and "-poison" in raised.value.problem
    # A container name keeps Azure's own limit.
    assert settings(BOT_REFERENCES_CONTAINER="c" * 63).references_container == "c" * 63
    with pytest.raises(SettingsError) as raised:  # a bad name is told the queue's own limit
        settings(BOT_PROACTIVE_QUEUE="Bad_Q")
    assert "3-56 lower-case" in raised.value.problem


def test_a_claim_too_short_for_a_send_and_its_settling_write_is_refused():
    # A send starts only while enough of its claim is left for the Connector client's
    # whole budget (12 s, retries included), the ledger's for the write that settles it
    # (15 s) and 3 s for clocks, and a claim leaves 10 s to reach the send: 40 s at least.
    # Shorter, the claim could end before the send is settled, and another instance would
    # take the target over and send it again.
    floor = 40.0
    assert settings(BOT_PROACTIVE_CLAIM_SECONDS=str(floor)).proactive_claim_seconds == floor
    assert settings().proactive_claim_seconds == 45.0
    for short in ("4", "0.5", str(floor - 0.5)):
        with pytest.raises(SettingsError) as raised:
            settings(BOT_PROACTIVE_CLAIM_SECONDS=short)
        assert raised.value.setting == "BOT_PROACTIVE_CLAIM_SECONDS"
        assert f"at least {floor:g}" in raised.value.problem
    # Other instances honour a claim's own length up to an hour: a longer one would let an
    # instance take a claim over while its holder could still start its send.
    assert settings(BOT_PROACTIVE_CLAIM_SECONDS="3600").proactive_claim_seconds == 3600.0
    with pytest.raises(SettingsError) as raised:
        settings(BOT_PROACTIVE_CLAIM_SECONDS="14400")
    assert "at most 3600" in raised.value.problem


def test_local_unauthenticated_mode_needs_the_flag_and_no_app_id():
    local = Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true"})
    assert local.auth_disabled
    # With an app id the flag does not turn authentication off.
    assert not settings(BOT_ALLOW_UNAUTHENTICATED="true").auth_disabled


def test_trusted_service_urls_are_parsed():
    s = settings(BOT_TRUSTED_SERVICE_URLS=" http://127.0.0.1:3980 , https://bots.example/api ")
    assert s.trusted_service_urls == ("http://127.0.0.1:3980", "https://bots.example/api")


def test_trusted_service_urls_skip_blanks_and_duplicates_and_keep_trailing_slashes():
    s = settings(
        BOT_TRUSTED_SERVICE_URLS=",https://bots.example/api/ ,, https://bots.example/api/,"
        "HTTPS://Other.example , "
    )
    assert s.trusted_service_urls == ("https://bots.example/api/", "HTTPS://Other.example")
    # The Connector client reads them as the prefixes they are meant to be.
    connector = ConnectorClient(s, None)
    assert connector.is_trusted("https://bots.example/api/v3")
    assert connector.is_trusted("https://other.example/anything")
    assert not connector.is_trusted("https://bots.example/apiv3")


# Entries the Connector client would ignore (with only a log line), so the bot would refuse
# to send where the operator meant to allow it: refused here instead, by position, not value.
UNUSABLE_PREFIXES = {
    "space-separated": "http://127.0.0.1:1 http://127.0.0.1:2",
    "port out of range": "https://bots.example:99999",
    "port zero": "https://bots.example:0",
    "user and password": "https://user:pw@bots.example",
    "dot segments": "https://bots.example/a/../b",
    "dot segment with a path parameter": "https://bots.example/a/..;/b",
    "a percent sign that encodes nothing": "https://bots.example/100%",
    "non-ASCII host": "https://bøts.example",
    "trailing-dot host": "https://bots.example.",
    "underscore host": "https://bots_x.example",
    "query": "https://bots.example/api?x=1",
    "no scheme": "bots.example/api",
    "encoded slash": "https://bots.example/bots%2Fa",
    "encoded slash, lower case": "https://bots.example/bots%2fa",
    "encoded dots": "https://bots.example/a/%2E%2E/b",
    "encoded dot, lower case": "https://bots.example/a/%2e",
    "encoded backslash": "https://bots.example/a%5Cb",
    "encoded backslash, lower case": "https://bots.example/a%5cb",
    "encoded NUL": "https://bots.example/a%00",
}


@pytest.mark.parametrize("case", list(UNUSABLE_PREFIXES))
def test_trusted_service_urls_the_connector_could_not_use_are_refused(case):
    entry = UNUSABLE_PREFIXES[case]
    # Sanity: the Connector client's own parser refuses it too.
    assert parse_service_url(entry) is None

    with pytest.raises(SettingsError) as raised:
        settings(BOT_TRUSTED_SERVICE_URLS=f"https://fine.example, {entry}")

    assert raised.value.setting == "BOT_TRUSTED_SERVICE_URLS"
    assert "entry 2" in str(raised.value)
    assert "pw" not in str(raised.value) and "99999" not in str(raised.value)


@pytest.mark.parametrize(
    "entry",
    [
        "https://bots.example",
        "https://bots.example:8443/v3/",
        "http://localhost:3980",
        "http://[::1]:3980/api",
        "https://10.1.2.3/x;y=1/z",
    ],
)
def test_every_accepted_trusted_service_url_is_one_the_connector_uses(entry):
    [accepted] = settings(BOT_TRUSTED_SERVICE_URLS=entry).trusted_service_urls
    assert parse_service_url(accepted) is not None


# --- Key Vault references ---------------------------------------------------------------------

KEY_VAULT_REFERENCE = "@Microsoft.KeyVault(SecretUri=https://vault.example/secrets/bot-secret/)"


@pytest.mark.parametrize(
    "setting", ["MicrosoftAppPassword", "MicrosoftAppId", "AzureWebJobsStorage", "BOT_SCHEDULE"]
)
def test_an_unresolved_key_vault_reference_is_a_clear_error(setting):
    # App Service passes the reference text on when it cannot resolve it; a local run gets
    # whatever was copied. Used as a client secret it would only fail later, inside MSAL.
    with pytest.raises(SettingsError) as raised:
        settings(**{setting: f" {KEY_VAULT_REFERENCE.lower()} "})

    assert raised.value.setting == setting
    assert "Key Vault reference" in str(raised.value)
    assert "vault.example" not in str(raised.value)
    assert "bot-secret" not in str(raised.value)


def test_a_secret_that_merely_mentions_key_vault_is_a_secret():
    assert settings(MicrosoftAppPassword="x@Microsoft.KeyVault(").app_password.startswith("x@")


# --- whitespace and case -------------------------------------------------------------------------


def test_app_type_and_channel_service_ignore_case_and_whitespace():
    s = settings(
        MicrosoftAppType=" singletenant ",
        MicrosoftAppTenantId=" tenant-1 ",
        BOT_CHANNEL_SERVICE=" USGov ",
        BOT_ALLOW_UNAUTHENTICATED=" FALSE ",
        MicrosoftAppId=" app-1 ",
    )
    assert (s.app_type, s.tenant_id, s.channel_service, s.app_id) == (
        "SingleTenant",
        "tenant-1",
        "usgov",
        "app-1",
    )
    assert (
        settings(
            MicrosoftAppType="USERASSIGNEDMSI", MicrosoftAppTenantId="t", MicrosoftAppPassword=""
        ).app_type
        == "UserAssignedMSI"
    )


# --- BOT_LOGIN_AUTHORITY -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authority",
    [
        "https://login.microsoftonline.com/botframework.com",
        "https://login.microsoftonline.com/common/",
        "https://login.microsoftonline.com?x=1",
        "https://user@login.microsoftonline.com",
        # Nothing after them: no query, fragment or path to see, but MSAL's authority
        # became `https://login.microsoftonline.com?/botframework.com`.
        "https://login.microsoftonline.com?",
        "https://login.microsoftonline.com#",
        "https://login.microsoftonline.com\\",
        # No host a token request could reach.
        "https://login.microsoftonline.com x",
        "https://login.microsoftonline.com;tenant",
        "https://login.microsoftonline.com%2Fcommon",
        "https://login.microsoftonline.com:",
        # Not a host name or an IP address: a token request failed naming the setting later.
        "https://..",
        "https://login..microsoftonline.com",
        "https://1.2.3.4.5",
        "https://256.1.1.1",
        "https://-login.example",
        "https://login-.example",
        "https://" + "a" * 64 + ".example",
    ],
)
def test_login_authority_is_the_host_only(authority):
    # The tenant is appended to it; a path here would make MSAL ask `.../<tenant>/<tenant>`.
    with pytest.raises(SettingsError) as raised:
        settings(BOT_LOGIN_AUTHORITY=authority)
    assert raised.value.setting == "BOT_LOGIN_AUTHORITY"


def test_login_authority_keeps_a_port_and_drops_a_trailing_slash():
    s = settings(BOT_LOGIN_AUTHORITY="https://127.0.0.1:8443/")
    assert s.login_authority == "https://127.0.0.1:8443"
    assert settings(BOT_LOGIN_AUTHORITY="HTTPS://Login.Example").login_authority
    # A container's name (docker compose) may have an underscore.
    assert settings(BOT_LOGIN_AUTHORITY="https://fake_aad:8443").login_authority
    for host in ("login.microsoftonline.us.", "[::1]", "10.0.0.4", "a" * 63 + ".example"):
        assert settings(BOT_LOGIN_AUTHORITY=f"https://{host}").login_authority


@pytest.mark.parametrize("setting", ["BOT_OPENID_METADATA_URL", "BOT_EMULATOR_OPENID_METADATA_URL"])
def test_a_metadata_url_with_credentials_is_refused(setting):
    # aiohttp sent them as Basic credentials, and the URL went into every key-refresh log.
    with pytest.raises(SettingsError) as raised:
        settings(**{setting: "https://proxy:S3CRET@keys.example/meta"})
    assert raised.value.setting == setting
    assert "S3CRET" not in str(raised.value)


def test_storage_is_read_as_the_host_reads_it(caplog):
    # The host's triggers and the app must use one account. The host honours a connection
    # string over leftover identity-based settings and skips empty `;` segments; refused
    # here, queued messages were raised back to the host and poisoned with no report.
    connection = "DefaultEndpointsProtocol=https;;AccountName=acct;AccountKey=S3CRET==;"
    with caplog.at_level("WARNING"):
        storage = settings(
            AzureWebJobsStorage=connection, AzureWebJobsStorage__accountName="other"
        ).storage
    assert storage.connection_string == (
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=S3CRET=="
    )
    assert (storage.account_name, storage.service_uri("blob")) == ("", "")
    assert "AzureWebJobsStorage__accountName are ignored" in caplog.text
    assert "S3CRET" not in caplog.text and "other" not in caplog.text


@pytest.mark.parametrize(
    "setting",
    ["BOT_LOGIN_AUTHORITY", "BOT_OPENID_METADATA_URL", "BOT_EMULATOR_OPENID_METADATA_URL"],
)
def test_a_url_with_an_impossible_port_names_the_setting(setting):
    with pytest.raises(SettingsError) as raised:
        settings(**{setting: "https://login.example:99999"})
    assert raised.value.setting == setting


# --- BOT_SCHEDULE --------------------------------------------------------------------------------

VALID_SCHEDULES = [
    "0 0 9 * * *",
    "0 */5 * * * *",
    "0 30 9 * * 1-5",
    "0 30 9 * Jan Mon",
    "0 0 9 * * MON-FRI",
    "0 0 7,18 * * *",
    "5,10-20/5 0 0 1-31/2 * *",
    "0 0 9 * * sun",
    "0 0 9 * * 0-6",
]
INVALID_SCHEDULES = {
    "hour 25": "0 0 25 * * *",
    "minute 60": "0 60 9 * * *",
    "day 0": "0 0 9 0 * *",
    "month 13": "0 0 9 * 13 *",
    "day of week 8": "0 0 9 * * 8",
    "step 0": "*/0 * * * * *",
    "empty list item": "0 0 9,,10 * * *",
    "unknown name": "0 0 9 * * Funday",
    "month name in the day field": "0 0 9 Jan * *",
    "negative": "0 -5 9 * * *",
    "L is not NCRONTAB": "0 0 9 L * *",
    "? is not NCRONTAB": "0 0 9 ? * *",
    "day of week 7": "0 0 9 * * 7",
    "a TimeSpan of zero": "00:00:00",
    "a TimeSpan hour 24": "24:00:00",
    "a TimeSpan minute 60": "00:60:00",
    "a TimeSpan with text": "00:05:00x",
    "a TimeSpan past .NET's days": "10675200.00:00:00",
    "a TimeSpan past .NET's largest": "10675199.02:48:06",
    "a TimeSpan past .NET's largest by its fraction": "10675199.02:48:05.4775808",
    "a TimeSpan in other digits": "\u0660\u0660:\u0660\u0665:\u0660\u0660",
    "five fields separated by tabs": "0\t9\t*\t*\t*",
    "five fields, hour 25": "0 25 * * *",
    "four fields": "9 * * *",
    # More digits than Python turns into an int: a ValueError, not a settings error.
    "a number of 5,000 digits": "1" * 5000 + " 0 9 * * *",
    "a step of 5,000 digits": "*/" + "1" * 5000 + " 0 9 * * *",
}


@pytest.mark.parametrize("schedule", VALID_SCHEDULES)
def test_valid_schedules_are_kept(schedule):
    assert settings(BOT_SCHEDULE=f" {schedule} ").schedule == schedule
    # The local host's parser agrees (croniter is a dev dependency only).
    assert croniter.is_valid(schedule, second_at_beginning=True)


@pytest.mark.parametrize(
    "schedule",
    ["0 0 22-6 * * *", "0 0 9 * * Monday", "0 0 9-9 * * *", "0 0 9 1 Jan-Mar *", "0 0 9 * * 1/1"],
)
def test_what_the_hosts_parser_reads_is_accepted(schedule):
    # A deployed BOT_SCHEDULE the host runs must not be refused by the bot's own settings
    # (every function would answer 500): NCrontab swaps a reversed range's ends and takes
    # any prefix of a name. Schedule documents take the same, in NCrontab's meaning, all
    # but a value stepped by 1, which the host's releases read differently
    # (tests/unit/test_schedules.py).
    from shared.timer_syntax import ncrontab_problem

    assert settings(BOT_SCHEDULE=schedule).schedule == schedule
    assert (ncrontab_problem(schedule) is None) == (schedule != "0 0 9 * * 1/1")


@pytest.mark.parametrize(
    "schedule",
    [
        "0 9 * * *",
        "*/5 * * * *",
        "00:05:00",
        "1.02:00",
        "01:00",
        "10675199.02:48:05",
        "10675199.02:48:05.4775807",  # .NET's TimeSpan.MaxValue
        "00:00:30.5",
    ],
)
def test_what_the_timer_runs_without_seconds_or_as_a_timespan_is_accepted(schedule):
    # The timer takes 5 NCRONTAB fields (firing at second 0) and, on App Service plans, a
    # TimeSpan: refused here, every function of the bot answered 500 while the timer ran.
    from tools.devhost.timer import parse_schedule

    assert settings(BOT_SCHEDULE=schedule).schedule == schedule
    parse_schedule(schedule, {}, where="test")  # the local host runs it too


def test_a_timespan_on_flex_consumption_whose_timer_does_not_run_one_is_refused():
    # There the timer is not indexed and no scheduled send is ever enqueued. Linux
    # Consumption (Dynamic: a Python app's only Consumption) runs one, its host warning.
    with pytest.raises(SettingsError) as raised:
        settings(BOT_SCHEDULE="00:05:00", WEBSITE_SKU="FlexConsumption")
    assert raised.value.setting == "BOT_SCHEDULE" and "NCRONTAB" in str(raised.value)
    flex = settings(BOT_SCHEDULE="0 */5 * * * *", WEBSITE_SKU="FlexConsumption")
    assert flex.schedule == "0 */5 * * * *"
    for sku in ("Dynamic", "Standard", "ElasticPremium"):
        assert settings(BOT_SCHEDULE="00:05:00", WEBSITE_SKU=sku).schedule == "00:05:00"


@pytest.mark.parametrize("case", list(INVALID_SCHEDULES))
def test_obviously_invalid_schedules_name_the_setting(case):
    with pytest.raises(SettingsError) as raised:
        settings(BOT_SCHEDULE=INVALID_SCHEDULES[case])
    assert raised.value.setting == "BOT_SCHEDULE"


# --- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_rate_limit_must_be_a_finite_number(value):
    with pytest.raises(SettingsError) as raised:
        settings(BOT_CONNECTOR_RATE_LIMIT=value)
    assert raised.value.setting == "BOT_CONNECTOR_RATE_LIMIT"


# --- unauthenticated mode is local only ----------------------------------------------------------


# What each hosting plan sets (and does not: only App Service sets WEBSITE_INSTANCE_ID, so
# Linux and Flex Consumption and Container Apps must be recognised by their own markers).
AZURE_HOSTS = {
    "app service (Windows, Linux dedicated, Premium)": {
        "WEBSITE_INSTANCE_ID": "a1b2c3",
        "WEBSITE_SITE_NAME": "contoso-bot",
        "WEBSITE_SKU": "ElasticPremium",
    },
    "flex consumption (Legion)": {
        "WEBSITE_SKU": "FlexConsumption",
        "WEBSITE_SITE_NAME": "contoso-bot",
        "CONTAINER_NAME": "contoso-bot_abc",
        "LEGION_SERVICE_HOST": "10.0.0.1",
    },
    "flex consumption in placeholder mode": {
        "WEBSITE_POD_NAME": "pod-1",
        "LEGION_SERVICE_HOST": "10.0.0.1",
    },
    "linux consumption (Atlas)": {
        "WEBSITE_SKU": "Dynamic",
        "WEBSITE_SITE_NAME": "contoso-bot",
        "CONTAINER_NAME": "contoso-bot_abc",
    },
    "functions on container apps": {"MANAGED_ENVIRONMENT": "true"},
}


@pytest.mark.parametrize("host", list(AZURE_HOSTS))
def test_unauthenticated_mode_is_refused_on_azure(host):
    env = {"BOT_ALLOW_UNAUTHENTICATED": "true", **AZURE_HOSTS[host]}
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    assert raised.value.setting == "BOT_ALLOW_UNAUTHENTICATED"
    # With an app id the flag changes nothing, so it is not an error there.
    assert not settings(**env).auth_disabled


@pytest.mark.parametrize("marker", sorted(AZURE_HOST_MARKERS))
def test_each_host_marker_alone_means_azure(marker):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true", marker: "x"})
    # Both ways out are named: an app id, or (not on Azure) starting without the marker.
    assert "set MicrosoftAppId" in raised.value.problem
    assert f"env -u {marker}" in raised.value.problem
    # A marker that is present but empty marks nothing.
    assert Settings.from_env({"BOT_ALLOW_UNAUTHENTICATED": "true", marker: " "}).auth_disabled


# --- US Gov: the cloud's URLs agree with the token and Connector modules ------------------------


def test_usgov_defaults_agree_with_outbound_tokens_and_trusted_hosts():
    s = settings(BOT_CHANNEL_SERVICE="usgov")
    provider = create_token_provider(s)
    assert provider.authority == (
        "https://login.microsoftonline.us/MicrosoftServices.onmicrosoft.us"
    )
    assert s.oauth_scope == "https://api.botframework.us/.default"
    assert s.emulator_openid_metadata_url.startswith("https://login.microsoftonline.us/")
    assert s.cloud.caller_id == "urn:botframework:azureusgov"
    connector = ConnectorClient(s, None)
    assert connector.is_trusted("https://smba.infra.gov.teams.microsoft.us/teams/")
    assert not connector.is_trusted("https://smba.trafficmanager.net/amer/")
    public = ConnectorClient(settings(), None)
    assert public.is_trusted("https://smba.trafficmanager.net/amer/")
    assert not public.is_trusted("https://smba.infra.gov.teams.microsoft.us/teams/")


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
