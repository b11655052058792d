"""tools/infra_check against infra/, and against mutated copies that break each rule."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tools import infra_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def infra_copy(tmp_path: Path) -> Path:
    target = tmp_path / "infra"
    shutil.copytree(ROOT / "infra", target)
    return target


def mutate(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"the mutation's anchor is gone from {path.name}: {old!r}"
    path.write_text(text.replace(old, new, 1))


def test_the_repo_infra_has_no_problems() -> None:
    assert infra_check.check_all() == []


@pytest.mark.parametrize("path", sorted((ROOT / "infra").rglob("*.bicep")), ids=lambda p: p.name)
def test_every_bicep_file_parses(path: Path) -> None:
    tree = infra_check.parse(path)
    assert tree["resources"] or tree.get("modules")


def test_a_syntax_error_is_reported(infra_copy: Path) -> None:
    mutate(infra_copy / "modules/bot.bicep", "kind: 'azurebot'", "kind: 'azurebot' +")
    assert any("bot.bicep does not parse" in p for p in infra_check.check_all(infra_copy))


def test_settings_are_derived_from_the_code_not_a_list() -> None:
    names = infra_check.code_settings()
    for name in ("MicrosoftAppId", "BOT_PROACTIVE_QUEUE", "AzureWebJobsStorage__clientId"):
        assert name in names


def test_a_setting_the_code_reads_but_bicep_misses_is_reported(infra_copy: Path) -> None:
    mutate(infra_copy / "main.bicep", "  BOT_SCHEDULE: schedule\n", "")
    problems = infra_check.check_app_settings(infra_copy)
    assert "app setting BOT_SCHEDULE is read by shared/config.py but not set in Bicep" in problems
    assert "schedule_function uses %BOT_SCHEDULE% (not set)" in problems


def test_a_misspelt_setting_is_reported_both_ways(infra_copy: Path) -> None:
    mutate(
        infra_copy / "main.bicep",
        "  BOT_TRUSTED_SERVICE_URLS: trustedServiceUrls",
        "  BOT_TRUSTED_SERVICE_URL: trustedServiceUrls",
    )
    problems = infra_check.check_app_settings(infra_copy)
    assert "app setting BOT_TRUSTED_SERVICE_URL is set in Bicep but nothing reads it" in problems
    assert any("BOT_TRUSTED_SERVICE_URLS is read" in p for p in problems)


def test_a_setting_the_code_starts_reading_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "config.py"
    source = (ROOT / "shared" / "config.py").read_text()
    config.write_text(
        source + '\n\ndef _extra(env):\n    return _parse_bool(env, "BOT_NEW_FLAG")\n'
    )
    problems = infra_check.check_app_settings(infra_check.INFRA, config)
    assert "app setting BOT_NEW_FLAG is read by shared/config.py but not set in Bicep" in problems


def test_a_connection_string_setting_is_rejected(infra_copy: Path) -> None:
    mutate(
        infra_copy / "main.bicep",
        "  AzureWebJobsStorage__credential: 'managedidentity'\n",
        "  AzureWebJobsStorage__credential: 'managedidentity'\n  AzureWebJobsStorage: 'x'\n",
    )
    problems = infra_check.check_app_settings(infra_copy)
    assert "app setting AzureWebJobsStorage must not be set on Azure" in problems


def test_a_queue_name_that_differs_from_the_code_is_reported(infra_copy: Path) -> None:
    mutate(infra_copy / "main.bicep", "= 'proactive-messages'", "= 'proactive'")
    problems = infra_check.check_names(infra_copy)
    assert "param proactiveQueue must default to the code's 'proactive-messages'" in problems


def test_a_missing_poison_queue_is_reported(infra_copy: Path) -> None:
    mutate(infra_copy / "modules/storage.bicep", "  name: poisonQueueName\n", "  name: 'other'\n")
    problems = infra_check.check_names(infra_copy) + infra_check.check_roles(infra_copy)
    assert "storage.bicep must create the poison queue" in problems


def test_a_missing_queue_role_is_reported(infra_copy: Path) -> None:
    path = infra_copy / "modules/storage.bicep"
    text = path.read_text()
    start = text.index("resource appPoisonQueue")
    end = text.index("// A producer only adds")
    path.write_text(text[:start] + text[end:])
    problems = infra_check.check_roles(infra_copy)
    assert "the app's identity lacks queue:receive on account or poisonQueue" in problems


def test_a_storage_endpoint_pointing_at_the_other_service_is_reported(infra_copy: Path) -> None:
    mutate(
        infra_copy / "main.bicep",
        "AzureWebJobsStorage__queueServiceUri: storage.outputs.queueEndpoint",
        "AzureWebJobsStorage__queueServiceUri: storage.outputs.blobEndpoint",
    )
    problems = infra_check.check_all(infra_copy)
    assert "AzureWebJobsStorage__queueServiceUri must be storage.outputs.queueEndpoint" in problems


def test_a_weaker_blob_role_is_reported(infra_copy: Path) -> None:
    # Reader instead of Owner: the app could no longer write or delete references.
    mutate(
        infra_copy / "modules/storage.bicep",
        "roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', "
        "roles.storageBlobDataOwner)",
        "roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', "
        "roles.storageBlobDataReader)",
    )
    problems = infra_check.check_roles(infra_copy)
    assert "the app's identity lacks blob:write on account" in problems


def test_shared_key_access_enabled_is_reported(infra_copy: Path) -> None:
    mutate(
        infra_copy / "modules/storage.bicep",
        "allowSharedKeyAccess: false",
        "allowSharedKeyAccess: true",
    )
    assert "storage account: allowSharedKeyAccess must be false" in infra_check.check_security(
        infra_copy
    )


def test_listing_keys_or_a_secret_output_is_reported(infra_copy: Path) -> None:
    mutate(
        infra_copy / "modules/storage.bicep",
        "output name string = account.name",
        "output name string = account.name\n"
        "output accountKey string = account.listKeys().keys[0].value",
    )
    problems = infra_check.check_security(infra_copy)
    assert "storage.bicep reads keys or SAS (list...()): identity only" in problems
    assert "storage.bicep: output accountKey looks like a secret" in problems


def test_telemetry_local_auth_is_reported(infra_copy: Path) -> None:
    mutate(
        infra_copy / "modules/monitoring.bicep", "DisableLocalAuth: true", "DisableLocalAuth: false"
    )
    problems = infra_check.check_security(infra_copy)
    assert "Application Insights: DisableLocalAuth must be true" in problems


def test_a_messaging_endpoint_off_the_functions_route_is_reported(infra_copy: Path) -> None:
    mutate(
        infra_copy / "main.bicep",
        "hostName}/api/messages'\n    tags",
        "hostName}/messages'\n    tags",
    )
    problems = infra_check.check_hosting(infra_copy)
    assert "the bot's endpoint must be https://<app host>/api/messages" in problems


def test_another_runtime_or_plan_is_reported(infra_copy: Path) -> None:
    mutate(infra_copy / "modules/functionapp.bicep", "version: '3.11'", "version: '3.10'")
    mutate(infra_copy / "modules/functionapp.bicep", "name: 'FC1'", "name: 'Y1'")
    problems = infra_check.check_hosting(infra_copy)
    assert "functionAppConfig.runtime must be python 3.11" in problems
    assert "the plan must be Flex Consumption (FC1)" in problems


def test_a_parameter_file_with_a_bad_value_or_name_is_reported(infra_copy: Path) -> None:
    path = infra_copy / "main.parameters.json"
    values = json.loads(path.read_text())
    values["parameters"]["botAppType"] = {"value": "MultiTenant"}
    values["parameters"]["namePrefix"] = {"value": "ab"}
    values["parameters"]["botId"] = {"value": "x"}
    path.write_text(json.dumps(values))
    problems = infra_check.check_parameter_file(infra_copy)
    assert "main.parameters.json: botAppType='MultiTenant' is not an allowed value" in problems
    assert "main.parameters.json: namePrefix is shorter than 3" in problems
    assert "main.parameters.json: botId is not a parameter" in problems


def test_a_name_prefix_a_storage_account_name_cannot_start_with_is_reported(
    infra_copy: Path,
) -> None:
    # 3-11 characters, so its decorators pass: ARM refused the storage account's name
    # after the identity had been created.
    path = infra_copy / "main.parameters.json"
    values = json.loads(path.read_text())
    values["parameters"]["namePrefix"] = {"value": "Echo-Bot"}
    path.write_text(json.dumps(values))
    problems = infra_check.check_parameter_file(infra_copy)
    expected = (
        "main.parameters.json: namePrefix='Echo-Bot' must be lower-case letters and digits only"
    )
    assert problems == [expected]


def test_the_settings_bicep_sets_are_accepted_by_the_app() -> None:
    """Bicep's defaults, with what Azure fills in at deployment, make valid Settings."""
    from shared.config import Settings

    main = infra_check.load(infra_check.INFRA, "main.bicep")
    defaults = {name: p.get("default") for name, p in main["parameters"].items()}
    settings = Settings.from_env(infra_check.deployed_settings({}))
    assert settings.app_type == "UserAssignedMSI"
    assert settings.storage.credential == "managedidentity"
    assert settings.proactive_queue == "proactive-messages"
    assert settings.schedule == defaults["schedule"]


def write_parameters(infra: Path, **given: Any) -> None:
    path = infra / "main.parameters.json"
    values = json.loads(path.read_text())
    values["parameters"].update({name: {"value": value} for name, value in given.items()})
    path.write_text(json.dumps(values))


@pytest.mark.parametrize(
    ("name", "value", "setting"),
    [
        ("proactiveClaimSeconds", "39", "BOT_PROACTIVE_CLAIM_SECONDS"),  # accepted before
        ("proactiveClaimSeconds", "7200", "BOT_PROACTIVE_CLAIM_SECONDS"),
        ("schedule", "00:05:00", "BOT_SCHEDULE"),  # Flex Consumption runs no TimeSpan
        ("connectorRateLimit", "fifty", "BOT_CONNECTOR_RATE_LIMIT"),
        ("proactiveMaxAgeSeconds", "-1", "BOT_PROACTIVE_MAX_AGE_SECONDS"),
        ("trustedServiceUrls", "http://bot.example.com/", "BOT_TRUSTED_SERVICE_URLS"),
        ("loginAuthority", "https://login.example.com/tenant/path", "BOT_LOGIN_AUTHORITY"),
    ],
)
def test_a_parameter_value_the_app_would_refuse_is_reported(
    infra_copy: Path, name: str, value: str, setting: str
) -> None:
    # Of its type and within Bicep's decorators: CI was green, the tag deployed, and every
    # invocation then failed on the setting.
    write_parameters(infra_copy, **{name: value})
    [problem] = infra_check.check_parameter_file(infra_copy)
    assert problem.startswith(
        f"main.parameters.json: the app would refuse its settings: setting {setting}: "
    ), problem


def test_the_shortest_claim_the_app_accepts_passes_the_check(infra_copy: Path) -> None:
    write_parameters(infra_copy, proactiveClaimSeconds="40")
    assert infra_check.check_parameter_file(infra_copy) == []


def test_settings_of_the_operators_own_are_deployed_with_the_templates(infra_copy: Path) -> None:
    # Every provisioning sets the app's settings to exactly the template's: one set by
    # hand (the upgrade's Disabled flag, debug logging) was removed by the next.
    extra = {
        "AzureWebJobs.proactive_function.Disabled": "true",
        "PYTHON_ENABLE_DEBUG_LOGGING": "1",
    }
    write_parameters(infra_copy, extraAppSettings=extra)
    assert infra_check.check_parameter_file(infra_copy) == []
    settings = infra_check.deployed_settings({"extraAppSettings": extra}, infra_copy)
    assert settings["AzureWebJobs.proactive_function.Disabled"] == "true"
    assert settings["BOT_PROACTIVE_QUEUE"] == "proactive-messages"


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        # The host and the app read settings case-blind: a shared key, a runtime setting.
        ({"azurewebjobsstorage": "AccountKey=x"}, "must not be set on Azure"),
        ({"functions_worker_runtime": "python"}, "must not be set on Flex Consumption"),
        ({"bot_schedule": "0 0 * * * *"}, "is set by the template"),
        # A queue option the Functions host would refuse at its start.
        (
            {"AzureFunctionsJobHost__extensions__queues__maxDequeueCount": "0"},
            "the host would refuse",
        ),
        (  # a digit Python reads and the host does not (it crashed the check)
            {"AzureFunctionsJobHost__extensions__queues__maxDequeueCount": "\u00b2"},
            "expected a whole number",
        ),
    ],
)
def test_settings_of_the_operators_own_are_read_as_the_host_reads_them(
    infra_copy: Path, extra: dict[str, str], problem: str
) -> None:
    write_parameters(infra_copy, extraAppSettings=extra)
    [reported] = infra_check.check_parameter_file(infra_copy)
    assert problem in reported, reported


def test_a_key_vault_reference_of_the_operators_own_is_taken_as_resolved(
    infra_copy: Path,
) -> None:
    reference = "@Microsoft.KeyVault(VaultName=kv-bot;SecretName=openai)"
    extra = {
        "BOT_OPENAI_KEY": reference,
        "AzureFunctionsJobHost__extensions__queues__maxDequeueCount": reference,
        "AzureFunctionsJobHost__extensions__queues__batchSize": "+16",  # .NET reads it
    }
    write_parameters(infra_copy, extraAppSettings=extra)
    assert infra_check.check_parameter_file(infra_copy) == []


def test_a_password_set_whatever_the_bots_type_is_reported(infra_copy: Path) -> None:
    # deployed_settings leaves the password out unless SingleTenant (ONLY_WITH): a
    # template that set it always would pass, and the app refuse it at every invocation.
    path = infra_copy / "main.bicep"
    mutate(path, "var secretSettings = singleTenant ? {", "var secretSettings = true ? {")
    assert infra_check.check_parameter_file(infra_copy) == [
        "main.bicep: var secretSettings must be `singleTenant ? ...` (ONLY_WITH)"
    ]


def test_settings_of_the_operators_own_that_the_template_or_azure_forbid_are_reported(
    infra_copy: Path,
) -> None:
    write_parameters(
        infra_copy,
        extraAppSettings={
            "BOT_SCHEDULE": "0 0 * * * *",  # the template's own: its parameter is the way
            "BOT_ALLOW_UNAUTHENTICATED": "true",
            "WEBSITE_RUN_FROM_PACKAGE": "1",
            "PYTHON_ENABLE_DEBUG_LOGGING": 1,
        },
    )
    where = "main.parameters.json: extraAppSettings."
    assert infra_check.check_parameter_file(infra_copy) == [
        f"{where}BOT_SCHEDULE is set by the template: change its parameter instead",
        f"{where}BOT_ALLOW_UNAUTHENTICATED must not be set on Azure: "
        + infra_check.NOT_DEPLOYED["BOT_ALLOW_UNAUTHENTICATED"],
        f"{where}WEBSITE_RUN_FROM_PACKAGE must not be set on Flex Consumption",
        f"{where}PYTHON_ENABLE_DEBUG_LOGGING must be a string (app settings are strings)",
    ]
    # The template's settings win over the operator's in the union, as ARM merges it.
    assert (
        infra_check.deployed_settings(
            {"extraAppSettings": {"BOT_SCHEDULE": "0 0 * * * *"}}, infra_copy
        )["BOT_SCHEDULE"]
        == "0 * * * * *"
    )


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        # Flex Consumption does not apply it (timers run in UTC): schedules an hour off.
        ("WEBSITE_TIME_ZONE", "W. Europe Standard Time", "must not be set on Flex Consumption"),
        ("SCM_DO_BUILD_DURING_DEPLOYMENT", "true", "must not be set on Flex Consumption"),
        # The Bot's endpoint stays /api/messages: every Teams message would get a 404.
        ("AzureFunctionsJobHost__extensions__http__routePrefix", "bot", "must not be overridden"),
        # Base64 on the wire either way: every proactive request would be poisoned.
        (
            "AzureFunctionsJobHost__extensions__queues__messageEncoding",
            "none",
            "must not be overridden",
        ),
        ("AzureFunctionsJobHost__functionTimeout", "00:00:10", "must not be overridden"),
        # Only the messages function loaded: proactive delivery stops without a word.
        ("AzureFunctionsJobHost__functions__0", "messages_function", "must not be overridden"),
        ("AzureFunctionsJobHost__extensionBundle__version", "[3.*, 4.0.0)", "must not be"),
        ("WEBSITE_VNET_ROUTE_ALL", "1", "must not be set on Flex Consumption"),
        (
            "EVENTS",
            "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=R;SharedAccessKey=k",
            "holds a key, a SAS or a password",
        ),
        # A key committed to git, in the deployment history and a plain app setting.
        (
            "DATA_LAKE",
            "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=b",
            "holds a key, a SAS or a password",
        ),
        (
            "REPORTS_URL",
            "https://a.blob.core.windows.net/r?sv=2024&sig=abc",
            "holds a key, a SAS or a password",
        ),
        (
            "CACHE",
            "cache.redis.cache.windows.net:6380,password=s3cr3t,ssl=True",
            "holds a key, a SAS or a password",
        ),
        ("SQL", "Server=tcp:s;User ID=u; Password = s3cr3t;", "holds a key, a SAS or a password"),
        ("BROKER", "amqps://user:s3cr3t@broker.example.com", "holds a key, a SAS or a password"),
        (
            "HOOK",
            "https://f.azurewebsites.net/api/hook?code=abc==",
            "holds a key, a SAS or a password",
        ),
        ("REDIS", "rediss://:s3cr3t@cache.redis.cache.windows.net:6380/0", "a password"),
        ("PG", "host=db.example.com user=bot password=s3cr3t dbname=bot", "a password"),
        ("MAPS", "https://maps.azure.com/x?subscription-key=abc123", "a password"),
    ],
)
def test_settings_of_the_operators_own_that_would_break_the_deployment_are_reported(
    infra_copy: Path, name: str, value: str, problem: str
) -> None:
    # Each passed the check: the deployment then ran with it.
    write_parameters(infra_copy, extraAppSettings={name: value})
    [reported] = infra_check.check_parameter_file(infra_copy)
    assert reported.startswith(f"main.parameters.json: extraAppSettings.{name} ")
    assert problem in reported


def test_a_bot_name_that_ignores_the_bots_identity_is_reported(infra_copy: Path) -> None:
    # An Azure Bot's app id cannot change: switching identity must create a new registration.
    path = infra_copy / "main.bicep"
    text = path.read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("bot: 'bot-"))
    mutate(path, line, "  bot: 'bot-${namePrefix}-${suffix}'")
    problems = infra_check.check_identity(infra_copy)
    assert (
        "the bot's name must change with its identity (botAppType and botAppId): "
        "an Azure Bot's app id cannot be changed" in problems
    )


@pytest.mark.parametrize(
    ("file", "old", "new", "problem"),
    [
        (
            "main.bicep",
            "AzureWebJobsStorage__clientId: identity.properties.clientId",
            "AzureWebJobsStorage__clientId: identity.properties.principalId",
            "AzureWebJobsStorage__clientId must be identity.properties.clientId",
        ),
        (
            "main.bicep",
            "'ClientId=${identity.properties.clientId};Authorization=AAD'",
            "'ClientId=${identity.properties.principalId};Authorization=AAD'",
            "APPLICATIONINSIGHTS_AUTHENTICATION_STRING must be "
            "ClientId=${identity.properties.clientId};Authorization=AAD",
        ),
        (
            "main.bicep",
            "  MicrosoftAppType: botAppType\n",
            "  MicrosoftAppType: 'SingleTenant'\n",
            "MicrosoftAppType must be botAppType",
        ),
        (
            "main.bicep",
            "    appId: appId\n",
            "    appId: botAppId\n",
            "module bot: appId must be appId",
        ),
        (
            "modules/bot.bicep",
            "msaAppId: appId",
            "msaAppId: '00000000-0000-0000-0000-000000000000'",
            "bot.bicep: msaAppId must be appId",
        ),
        (
            "modules/bot.bicep",
            "msaAppType: appType",
            "msaAppType: 'MultiTenant'",
            "bot.bicep: msaAppType must be appType",
        ),
        (
            "modules/functionapp.bicep",
            "keyVaultReferenceIdentity: identityResourceId",
            "keyVaultReferenceIdentity: 'SystemAssigned'",
            "functionapp.bicep: keyVaultReferenceIdentity must be identityResourceId",
        ),
        (
            "main.bicep",
            "'@Microsoft.KeyVault(VaultName=${names.vault};SecretName=${botSecretName})'",
            "botSecretName",
            "MicrosoftAppPassword must be a Key Vault reference, never a value",
        ),
    ],
    ids=[
        "storage-principal-id",
        "telemetry-principal-id",
        "app-type-constant",
        "bot-app-id",
        "bot-msa-app-id",
        "bot-msa-app-type",
        "key-vault-identity",
        "password-value",
    ],
)
def test_identity_wiring_mistakes_are_reported(
    infra_copy: Path, file: str, old: str, new: str, problem: str
) -> None:
    mutate(infra_copy / file, old, new)
    problems = infra_check.check_identity(infra_copy)
    assert problem in problems


def test_a_secret_parameter_with_a_default_is_reported(infra_copy: Path) -> None:
    mutate(
        infra_copy / "main.bicep",
        "param botSecretName string = 'bot-app-password'",
        "param botSecretName string = 'bot-app-password'\n\nparam botPassword string = 'hunter2'",
    )
    problems = infra_check.check_security(infra_copy)
    assert "main.bicep: param botPassword looks like a secret: @secure() and no default" in problems


def test_the_deployers_role_condition_allows_exactly_the_roles_bicep_assigns(
    infra_copy: Path,
) -> None:
    condition = infra_check.role_condition()
    assigned: set[str] = set()
    for path in (ROOT / "infra" / "modules").glob("*.bicep"):
        assigned |= set(re.findall(r"'([0-9a-f]{8}-[0-9a-f-]{27})'", path.read_text()))
    allowed = set(re.findall(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}", condition))
    assert allowed == assigned
    assert condition.count("ForAnyOfAnyValues:GuidEquals") == 2  # assign and delete
    # A role the template starts assigning is allowed at once (derived, not a list).
    mutate(
        infra_copy / "modules/storage.bicep",
        "roleDefinitions', roles.storageBlobDataReader)",
        "roleDefinitions', '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3')",
    )
    changed = infra_check.role_condition(infra_copy)
    assert "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3" in changed
    assert "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1" not in changed


def test_the_role_condition_command_prints_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.infra_check", "--role-condition"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == infra_check.role_condition()


def test_the_role_condition_reads_a_module_without_resources_and_refuses_an_unread_role(
    infra_copy: Path,
) -> None:
    # A module with no resources was a traceback (KeyError); a role taken from a parameter
    # was printed among the GUIDs (exit 0), a condition Azure refuses.
    (infra_copy / "modules/monitoring.bicep").write_text("param x string\noutput y string = x\n")
    result = run_check(str(infra_copy), "--role-condition")
    assert result.returncode == 0, result.stderr
    assert "ForAnyOfAnyValues:GuidEquals" in result.stdout
    mutate(
        infra_copy / "modules/keyvault.bicep",
        "roleDefinitions', keyVaultSecretsUser)",
        "roleDefinitions', extraRoleId)",
    )
    result = run_check(str(infra_copy), "--role-condition")
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"infra_check: {infra_copy / 'modules' / 'keyvault.bicep'}: ")
    assert "names no role GUID" in line


def test_the_role_condition_of_a_template_that_does_not_parse_is_refused(
    infra_copy: Path,
) -> None:
    # It was a traceback; with no modules/ folder, a condition allowing no role at all.
    (infra_copy / "modules/storage.bicep").write_text("resource {{{\n")
    result = run_check(str(infra_copy), "--role-condition")
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("infra_check: modules/storage.bicep does not parse: ")
    shutil.rmtree(infra_copy / "modules")
    (infra_copy / "main.bicep").write_text("param location string = 'x'\n")
    result = run_check(str(infra_copy), "--role-condition")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"infra_check: {infra_copy / 'modules'}: no role assignment found in its .bicep files"
    ]


@pytest.mark.parametrize(
    ("resource", "problem"),
    [
        ("appProactiveQueue", "storage.bicep: queue roles must be scoped to a queue, not account"),
        ("producerSender", "storage.bicep: queue roles must be scoped to a queue, not account"),
        (
            "producerReportReader",
            "storage.bicep: a producer's blob role must be scoped to the references "
            "container, not account",
        ),
    ],
)
def test_a_role_scoped_wider_than_needed_is_reported(
    infra_copy: Path, resource: str, problem: str
) -> None:
    path = infra_copy / "modules/storage.bicep"
    text = path.read_text()
    start = text.index(f"resource {resource} ")
    body = text[start:]
    scope = re.search(r"\n  scope: (\w+)\n", body)
    assert scope
    new_body = body.replace(scope.group(0), "\n  scope: account\n", 1)
    path.write_text(text[:start] + new_body)
    assert problem in infra_check.check_roles(infra_copy)


def test_single_tenant_without_an_app_id_is_reported(infra_copy: Path) -> None:
    path = infra_copy / "main.parameters.json"
    values = json.loads(path.read_text())
    values["parameters"]["botAppType"] = {"value": "SingleTenant"}
    path.write_text(json.dumps(values))
    problems = infra_check.check_parameter_file(infra_copy)
    assert "main.parameters.json: botAppType=SingleTenant needs botAppId" in problems
    values["parameters"]["botAppId"] = {"value": "6f1c2a7e-3b0d-4c55-9a1e-2d8f0b7c4e11"}
    path.write_text(json.dumps(values))
    assert infra_check.check_parameter_file(infra_copy) == []


PRODUCER_READ_PROBLEM = (
    "storage.bicep: producerReportReader must carry the producer's read condition "
    "(version 2.0): reads under refs/, proactive/, schedules/ only"
)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # The bot's state readable too.
        ("StringStartsWith \\'schedules/\\'))'", "StringStartsWith \\'state/\\'))'"),
        # No condition at all: the whole container, state and user index included.
        ("    condition: producerReadCondition\n", ""),
        ("    conditionVersion: '2.0'\n", ""),
    ],
)
def test_a_producer_reading_more_than_it_needs_is_reported(
    infra_copy: Path, old: str, new: str
) -> None:
    mutate(infra_copy / "modules/storage.bicep", old, new)
    assert PRODUCER_READ_PROBLEM in infra_check.check_all(infra_copy)


def test_the_producers_prefixes_are_the_stores_own() -> None:
    from shared import reports, schedules, state_blob
    from shared.references import keys

    assert infra_check.PRODUCER_READS == (
        keys._DOC_PREFIX,
        reports.PREFIX,
        schedules.SCHEDULES_PREFIX,
    )
    for private in (state_blob.STATE_PREFIX, keys._USER_PREFIX, schedules.STATE_PREFIX):
        assert not private.startswith(infra_check.PRODUCER_READS)


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.infra_check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_parameter_file_that_is_not_json_is_one_line_naming_it(infra_copy: Path) -> None:
    path = infra_copy / "main.parameters.json"
    path.write_text('{\n  "parameters": {\n    "schedule": {"value": "0 * * * * *",}\n  }\n}\n')
    result = run_check(str(infra_copy))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"infra_check: {path}: not valid JSON at line 3, column 41: "
        "Expecting property name enclosed in double quotes"
    ]
    # The check alone says so too, as a problem (no traceback for a caller either).
    assert infra_check.check_parameter_file(infra_copy) == [result.stderr[13:].strip()]


@pytest.mark.parametrize("role_condition", [False, True], ids=["check", "role-condition"])
def test_a_folder_that_is_not_there_is_one_line_naming_it(tmp_path: Path, role_condition) -> None:
    missing = tmp_path / "nowhere"
    result = run_check(str(missing), *(["--role-condition"] if role_condition else []))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"infra_check: {missing}: not a folder" + NOT_A_FOLDER]


NOT_A_FOLDER = " (give the infra folder, or none for ./infra)"


def test_a_folder_without_the_template_is_one_line_naming_the_file(tmp_path: Path) -> None:
    result = run_check(str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"infra_check: {tmp_path / 'main.bicep'}: no such file"]
