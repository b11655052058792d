"""Offline checks of infra/ that no general tool makes: the Bicep against the code.

- every `.bicep` file parses (pycep-parser) and every module path exists;
- the app settings are exactly what `shared/config.py` reads, plus the host's own, and no
  setting Flex Consumption rejects; `%SETTING%` references in function.json are all set;
- the queue and container names are the code's defaults and the ones the settings name;
- the role assignments grant what the host and the code do (blob read/write/delete and
  container creation on the account, queue send/receive/delete on the proactive queue
  and its poison queue, telemetry, the Key Vault secret), and no wider: queue roles on the
  queues, a producer's blob role on the references container, held by its condition to
  the prefixes the producer reads (PRODUCER_READS);
- Flex Consumption with Python 3.11 and the identity; the bot's endpoint is the route the
  messages function serves, and the Teams channel is on;
- the identity is wired right: client ids where client ids go (not object ids), the bot and
  the app agree on the app id and type, Key Vault references resolved with the identity, and
  the bot's registration renamed when its identity changes (an app id is immutable);
- main.parameters.json gives only declared parameters, with values they accept;
- storage and telemetry are identity-only (no shared keys, TLS 1.2, no public blobs, local
  auth off) and no output, parameter default or expression hands out a key.

Each check returns a list of problems (empty when the rule holds), so the tests can run
them against mutated copies and see them fail.

    python -m tools.infra_check [INFRA_DIR]   # exit 1: problems; 2: a file it cannot read
    python -m tools.infra_check --role-condition   # the deployer's role assignment condition
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"

# App settings the Functions host (not shared/config.py) reads.
HOST_SETTINGS = {
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "where the host sends telemetry",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "telemetry with the managed identity",
}
# Settings shared/config.py reads that a deployment must not set, and why.
NOT_DEPLOYED = {
    "BOT_ALLOW_UNAUTHENTICATED": "local use only; the app refuses it on Azure",
    "MicrosoftAppCertificatePath": "a PEM file path; Flex Consumption loads no certificate files",
    "AZURE_FEDERATED_TOKEN_FILE": "set by Kubernetes workload identity, not by Functions",
    "AzureWebJobsStorage": "a connection string holds the account key: identity-based only",
    "AzureWebJobsStorage__accountName": "the service URIs are set instead (right in every cloud)",
    "ChannelService": "an existing SDK bot's setting, mapped over; the template sets "
    "BOT_CHANNEL_SERVICE",
    "WEBSITE_SKU": "App Service sets it to the plan's SKU (FlexConsumption here)",
}
# Settings Flex Consumption rejects or deprecates (its documented list), the time zone,
# which it is said not to apply (timers run in UTC), and what would bring shared keys back.
FORBIDDEN = (
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_WORKER_RUNTIME_VERSION",
    "FUNCTIONS_EXTENSION_VERSION",
    "FUNCTIONS_MAX_HTTP_CONCURRENCY",
    "FUNCTIONS_WORKER_PROCESS_COUNT",
    "FUNCTIONS_WORKER_DYNAMIC_CONCURRENCY_ENABLED",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "ENABLE_ORYX_BUILD",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_CONTENTOVERVNET",
    "WEBSITE_SKIP_CONTENTSHARE_VALIDATION",
    "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT",
    "WEBSITE_DNS_SERVER",
    "WEBSITE_NODE_DEFAULT_VERSION",
    "WEBSITE_VNET_ROUTE_ALL",
    "WEBSITE_TIME_ZONE",
    "TZ",
    "DEPLOYMENT_STORAGE_CONNECTION_STRING",
    "AzureWebJobsStorage",
    "APPINSIGHTS_INSTRUMENTATIONKEY",
)
# host.json options an app setting could override that the rest of the deployment relies
# on: the Bot's messaging endpoint is <host>/api/messages, the producer and the engine
# write base64 queue messages, and the claim and Connector budgets assume the 5 minutes.
PINNED_HOST_OPTIONS = {
    "azurefunctionsjobhost__extensions__http__routeprefix": "the Bot's endpoint is /api/messages",
    "azurefunctionsjobhost__extensions__queues__messageencoding": (
        "the producer and the engine write base64 messages"
    ),
    "azurefunctionsjobhost__functiontimeout": "the proactive budgets assume host.json's 5 minutes",
    "azurefunctionsjobhost__functions": "every function folder is loaded",
    "azurefunctionsjobhost__extensionbundle": "host.json's bundle is the one tested",
    "azurefunctionsjobhost__version": "host.json's schema is 2.0",
}
# What an account key, a SAS or a connection string holding either looks like: a secret
# of the operator's own goes in as a Key Vault reference, never as a plain app setting
# committed to the parameter file.
_SECRET_NAMES = r"(?:sig|password|pwd|api[-_]?key|client[-_]?secret|access_token|subscription-key)"
_KEY_BEARING = re.compile(
    r"AccountKey\s*=|SharedAccessKey\s*=|SharedAccessSignature\s*="
    # A name of those at the start or after a separator (a lookbehind: `[?&;,\s]\s*`
    # would scan a run of spaces again from each of them).
    rf"|(?<![^?&;,\s]){_SECRET_NAMES}\s*="
    r"|[?&]code="  # a function key in a URL
    r"|://[^/?#\s:@]*:[^/?#\s@]+@",  # a URL's user:password@ (an empty user too)
    re.IGNORECASE,
)

# Outputs whose names look secret but are not, and why.
NOT_SECRET_OUTPUTS = {
    ("monitoring.bicep", "connectionString"): (
        "names the ingestion endpoint; with local auth off, sending needs an Entra ID token"
    ),
}

# Built-in roles (ids are the same in every tenant) and the data actions that matter here.
ROLE_GRANTS = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": {  # Storage Blob Data Owner
        "blob:read",
        "blob:write",
        "blob:delete",
        "blob:create-container",
    },
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": {  # Storage Blob Data Contributor
        "blob:read",
        "blob:write",
        "blob:delete",
        "blob:create-container",
    },
    "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": {"blob:read"},  # Storage Blob Data Reader
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": {  # Storage Queue Data Contributor
        "queue:send",
        "queue:receive",
        "queue:delete",
        "queue:create",
    },
    "8a0f0c08-91a1-4084-bc3d-661d67233fed": {"queue:receive", "queue:delete"},  # Processor
    "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a": {"queue:send"},  # Message Sender
    "3913510d-42f4-4e42-8a64-420c390055eb": {"telemetry:publish"},  # Monitoring Metrics Pub.
    "4633458b-17de-408a-b874-0445c86b69e6": {"secret:read"},  # Key Vault Secrets User
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": {"secret:read", "secret:write"},  # Secrets Officer
}


def parse(path: Path) -> dict[str, Any]:
    from pycep import BicepParser

    return BicepParser().parse(file_path=path)


@cache
def _parsed(text: str) -> dict[str, Any]:
    from pycep import BicepParser

    return BicepParser().parse(text=text)


def load(infra: Path, name: str) -> dict[str, Any]:
    """The parsed file (cached by content: the checks read each file several times)."""
    return _parsed((infra / name).read_text())


# ---- shared/config.py: the settings the code reads ----


def code_settings(config_path: Path = ROOT / "shared" / "config.py") -> set[str]:
    """Every environment name shared/config.py reads, found in its source (not a list).

    Reads are calls `get(NAME)`, `env.get(NAME)`, `_parse_bool(env, NAME)` and
    `_parse_number(env, NAME, ...)`; in a function with a `prefix` parameter (the
    `AzureWebJobsStorage__*` forms) `get(SUFFIX)` reads `<prefix>__SUFFIX`.
    """
    tree = ast.parse(config_path.read_text())
    names: set[str] = set()
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        prefix = _prefix_default(function)
        for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
            callee = call.func
            name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", "")
            position = {"get": 0, "_parse_bool": 1, "_parse_number": 1}.get(name)
            if position is None or len(call.args) <= position:
                continue
            argument = call.args[position]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                text = argument.value
                is_suffix = prefix and isinstance(callee, ast.Name) and _reads_prefixed(function)
                names.add(f"{prefix}__{text}" if is_suffix else text)
            elif isinstance(argument, ast.Name) and argument.id == "prefix" and prefix:
                names.add(prefix)
    return names


def _prefix_default(function: ast.FunctionDef) -> str:
    arguments = function.args
    positional = arguments.args[len(arguments.args) - len(arguments.defaults) :]
    for argument, default in zip(positional, arguments.defaults, strict=True):
        if argument.arg == "prefix" and isinstance(default, ast.Constant):
            return str(default.value)
    return ""


def _reads_prefixed(function: ast.FunctionDef) -> bool:
    # The local `get` of StorageSettings.from_env builds f"{prefix}__{suffix}".
    return any(
        isinstance(node, ast.JoinedStr) and "__" in ast.unparse(node) for node in ast.walk(function)
    )


# ---- Bicep helpers ----


def _identifiers(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for inner in value.values():
            yield from _identifiers(inner)
    elif isinstance(value, list):
        for item in value:
            yield from _identifiers(item)


def app_settings(infra: Path = INFRA) -> dict[str, Any]:
    """The app settings main.bicep composes: `var appSettings`, its union's parts followed."""
    variables = load(infra, "main.bicep")["variables"]
    found: dict[str, Any] = {}
    seen: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, str) and value in variables and value not in seen:
            seen.add(value)
            collect(variables[value]["value"])
        elif isinstance(value, dict) and "function" in value:  # union(a, b, ...)
            for argument in (value["function"].get("parameters") or {}).values():
                collect(argument)
        elif isinstance(value, dict) and "operator" in value:  # cond ? {...} : {...}
            operands = value["operator"].get("operands", {})
            if value["operator"].get("type") == "conditional":
                collect(operands.get("true_value"))
                collect(operands.get("false_value"))
        elif isinstance(value, dict):
            found.update(value)

    if "appSettings" not in variables:
        return {}
    collect(variables["appSettings"]["value"])
    return found


def check_parses(infra: Path = INFRA) -> list[str]:
    problems = []
    for path in sorted(infra.rglob("*.bicep")):
        try:
            tree = parse(path)
        except Exception as error:  # pycep raises lark's many error types
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            problems.append(f"{path.relative_to(infra)} does not parse: {first}")
            continue
        for name, module in tree.get("modules", {}).items():
            target = path.parent / module["detail"]["path"]
            if not target.is_file():
                problems.append(f"{path.name}: module {name} points to a missing {target.name}")
    return problems


def check_app_settings(infra: Path = INFRA, config_path: Path | None = None) -> list[str]:
    code = code_settings(config_path) if config_path else code_settings()
    bicep = set(app_settings(infra))
    problems = []
    for name in sorted(code - bicep - set(NOT_DEPLOYED)):
        problems.append(f"app setting {name} is read by shared/config.py but not set in Bicep")
    for name in sorted(bicep - code - set(HOST_SETTINGS)):
        problems.append(f"app setting {name} is set in Bicep but nothing reads it")
    for name in sorted(set(NOT_DEPLOYED) - code):
        problems.append(f"NOT_DEPLOYED names {name}, which shared/config.py no longer reads")
    for name in sorted(bicep & (set(NOT_DEPLOYED) | set(FORBIDDEN))):
        problems.append(f"app setting {name} must not be set on Azure")
    for function_json in sorted(ROOT.glob("*/function.json")):
        for reference in re.findall(r"%([A-Za-z0-9_]+)%", function_json.read_text()):
            if reference not in bicep:
                problems.append(f"{function_json.parent.name} uses %{reference}% (not set)")
    # The function app module must get exactly these settings and add none.
    modules = load(infra, "main.bicep").get("modules", {})
    function_app = modules.get("functionApp", {}).get("config", {}).get("params", {})
    if function_app.get("appSettings") != "appSettings":
        problems.append("module functionApp does not receive appSettings")
    config = [
        resource
        for resource in load(infra, "modules/functionapp.bicep")["resources"].values()
        if resource["type"] == "Microsoft.Web/sites/config"
    ]
    if [_config(r).get("properties") for r in config] != ["appSettings"]:
        problems.append("functionapp.bicep must set exactly the appSettings it is given")
    return problems


def check_names(infra: Path = INFRA) -> list[str]:
    """Queue and container names: the code's defaults, created, and the ones the settings name."""
    from shared.config import Settings

    defaults = Settings()
    main = load(infra, "main.bicep")
    parameters = main["parameters"]
    problems = []
    for parameter, expected in (
        ("referencesContainer", defaults.references_container),
        ("proactiveQueue", defaults.proactive_queue),
    ):
        if parameters.get(parameter, {}).get("default") != expected:
            problems.append(f"param {parameter} must default to the code's {expected!r}")
    settings = app_settings(infra)
    for setting, output in (
        ("BOT_REFERENCES_CONTAINER", "referencesContainerName"),
        ("BOT_PROACTIVE_QUEUE", "proactiveQueueName"),
    ):
        if output not in set(_identifiers(settings.get(setting))):
            problems.append(f"{setting} must be the storage module's {output} output")
    storage_params = main["modules"]["storage"]["config"]["params"]
    if storage_params.get("proactiveQueueName") != "proactiveQueue":
        problems.append("the storage module must create the queue named by param proactiveQueue")
    if storage_params.get("referencesContainerName") != "referencesContainer":
        problems.append("the storage module must create the container param referencesContainer")
    storage = load(infra, "modules/storage.bicep")
    names = {
        _config(resource)["name"]: resource["type"].rsplit("/", 1)[-1]
        for resource in storage["resources"].values()
        if isinstance(_config(resource)["name"], str)
    }
    queue_names = {names_key for names_key, kind in names.items() if kind == "queues"}
    poison = storage["variables"].get("poisonQueueName", {}).get("value")
    if "proactiveQueueName" not in queue_names or poison != "${proactiveQueueName}-poison":
        problems.append("storage.bicep must create the proactive queue and <queue>-poison")
    if "poisonQueueName" not in queue_names:
        problems.append("storage.bicep must create the poison queue")
    outputs = storage["outputs"]
    for output, resource in (
        ("proactiveQueueName", "proactiveQueue"),
        ("referencesContainerName", "referencesContainer"),
    ):
        if resource not in set(_identifiers(outputs.get(output, {}).get("value"))):
            problems.append(f"storage output {output} must be the name of resource {resource}")
    return problems


@dataclass(frozen=True, slots=True)
class Assignment:
    file: str
    scope: str  # the symbolic name of the resource it is scoped to
    grants: frozenset[str]
    principal: str
    role: str = ""  # the role definition's GUID
    name: str = ""  # the resource's symbolic name
    condition: str | None = None  # its ABAC condition's text (Bicep's escapes undone)
    condition_version: str | None = None


_GUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def role_assignments(infra: Path = INFRA) -> list[Assignment]:
    found = []
    for path in sorted((infra / "modules").glob("*.bicep")):
        tree = load(infra, f"modules/{path.name}")
        variables = {name: v["value"] for name, v in tree.get("variables", {}).items()}
        for name, resource in tree.get("resources", {}).items():
            if resource["type"] != "Microsoft.Authorization/roleAssignments":
                continue
            config = _config(resource)
            properties = config["properties"]
            role = _resolve_role(properties["roleDefinitionId"], variables)
            condition = properties.get("condition")
            condition = variables.get(condition, condition) if isinstance(condition, str) else None
            found.append(
                Assignment(
                    path.name,
                    str(config.get("scope")),
                    frozenset(ROLE_GRANTS.get(role, set())),
                    str(properties["principalId"]),
                    role,
                    name,
                    condition.replace("\\'", "'") if isinstance(condition, str) else None,
                    properties.get("conditionVersion"),
                )
            )
    return found


def _resolve_role(value: Any, variables: dict[str, Any]) -> str:
    """The role GUID of `subscriptionResourceId('...roleDefinitions', X)`: X a GUID, a
    variable, or `table.key` of an object variable."""
    try:
        name = value["function"]["parameters"]["resource_name_1"]
    except (KeyError, TypeError):
        return ""
    if isinstance(name, str):
        resolved = variables.get(name, name)
        return resolved if isinstance(resolved, str) else ""
    operands = name.get("operator", {}).get("operands", {})
    table = variables.get(operands.get("operand_1"), {})
    resolved = table.get(operands.get("operand_2")) if isinstance(table, dict) else None
    return resolved if isinstance(resolved, str) else ""


def _config(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource's body; a conditional resource (`= if (...) {...}`) nests it once more."""
    config = resource["config"]
    return config["config"] if "condition" in config and "config" in config else config


# What the app's identity must be able to do, and on which resource (scope names in the
# modules): the host's blobs and the references container live in the account.
APP_NEEDS = (
    ("storage.bicep", {"account"}, "blob:read"),
    ("storage.bicep", {"account"}, "blob:write"),
    ("storage.bicep", {"account"}, "blob:delete"),
    ("storage.bicep", {"account"}, "blob:create-container"),
    ("storage.bicep", {"account", "proactiveQueue"}, "queue:send"),
    ("storage.bicep", {"account", "proactiveQueue"}, "queue:receive"),
    ("storage.bicep", {"account", "proactiveQueue"}, "queue:delete"),
    ("storage.bicep", {"account", "poisonQueue"}, "queue:send"),
    ("storage.bicep", {"account", "poisonQueue"}, "queue:receive"),
    ("storage.bicep", {"account", "poisonQueue"}, "queue:delete"),
    ("monitoring.bicep", {"appInsights"}, "telemetry:publish"),
    ("keyvault.bicep", {"vault"}, "secret:read"),
)


QUEUE_SCOPES = ("proactiveQueue", "poisonQueue")


def check_roles(infra: Path = INFRA) -> list[str]:
    assignments = [a for a in role_assignments(infra) if a.principal == "appPrincipalId"]
    problems = []
    for file, scopes, grant in APP_NEEDS:
        if not any(a.file == file and a.scope in scopes and grant in a.grants for a in assignments):
            problems.append(f"the app's identity lacks {grant} on {' or '.join(sorted(scopes))}")
    for assignment in role_assignments(infra):
        if not assignment.grants:
            problems.append(f"{assignment.file}: a role assignment with an unknown role")
        # As narrow as each need allows: the app and producers use two queues only, and a
        # producer reads one container; only the host's own blobs need the whole account.
        queue_role = any(grant.startswith("queue:") for grant in assignment.grants)
        if queue_role and assignment.scope not in QUEUE_SCOPES:
            problems.append(
                f"{assignment.file}: queue roles must be scoped to a queue, not {assignment.scope}"
            )
        if (
            assignment.principal == "producerPrincipalId"
            and any(g.startswith("blob:") for g in assignment.grants)
            and assignment.scope != "referencesContainer"
        ):
            problems.append(
                f"{assignment.file}: a producer's blob role must be scoped to the references "
                f"container, not {assignment.scope}"
            )
    return problems


# What a producer reads in the references container (shared/producer.py: `conversations`
# lists the stored conversations, `report` reads a request's report, `schedule list` the
# schedules; tests/integration/test_producer_command.py runs them held to these): its
# blob role carries a condition allowing these prefixes only, not the bot's state
# (state/) or its user index (users/).
PRODUCER_READS = ("refs/", "proactive/", "schedules/")
_BLOB_READ = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read"
_BLOB = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"


def producer_read_condition(prefixes: tuple[str, ...] = PRODUCER_READS) -> str:
    """The ABAC condition on a producer's Storage Blob Data Reader assignment: a blob is
    read only under `prefixes`, a listing only with a prefix under one of them."""

    def under(attribute: str) -> str:
        return " OR ".join(f"{attribute} StringStartsWith '{prefix}'" for prefix in prefixes)

    read = f"ActionMatches{{'{_BLOB_READ}'}}"
    return (
        f"((!({read} AND NOT SubOperationMatches{{'Blob.List'}})) "
        f"OR ({under(f'@Resource[{_BLOB}:path]')})) "
        f"AND ((!({read} AND SubOperationMatches{{'Blob.List'}})) "
        f"OR ({under(f'@Request[{_BLOB}:prefix]')}))"
    )


def check_producer_reads(infra: Path = INFRA) -> list[str]:
    """A producer's blob role is held to PRODUCER_READS by its condition."""
    problems = []
    for assignment in role_assignments(infra):
        if assignment.principal != "producerPrincipalId" or not any(
            g.startswith("blob:") for g in assignment.grants
        ):
            continue
        if (assignment.condition, assignment.condition_version) != (
            producer_read_condition(),
            "2.0",
        ):
            problems.append(
                f"{assignment.file}: {assignment.name} must carry the producer's read "
                "condition (version 2.0): reads under " + ", ".join(PRODUCER_READS) + " only"
            )
    return problems


def role_condition(infra: Path = INFRA) -> str:
    """An Azure ABAC condition for the deployer's Role Based Access Control Administrator
    assignment: it may create and delete assignments of the roles this template assigns,
    and of no other role (no Owner, no User Access Administrator)."""
    assignments = role_assignments(infra)
    unknown = [a for a in assignments if not _GUID.fullmatch(a.role)]
    if unknown:  # Azure refuses a condition naming anything but role GUIDs
        raise InputError(
            f"{infra / 'modules' / unknown[0].file}: role assignment {unknown[0].name} names "
            "no role GUID this check can read (a parameter?)"
        )
    guids = ", ".join(sorted({a.role for a in assignments}))
    if not guids:  # a condition allowing no role would only make the deployment fail later
        raise InputError(f"{infra / 'modules'}: no role assignment found in its .bicep files")
    allowed = {
        "write": f"@Request[Microsoft.Authorization/roleAssignments:RoleDefinitionId] "
        f"ForAnyOfAnyValues:GuidEquals {{{guids}}}",
        "delete": f"@Resource[Microsoft.Authorization/roleAssignments:RoleDefinitionId] "
        f"ForAnyOfAnyValues:GuidEquals {{{guids}}}",
    }
    return " AND ".join(
        f"((!(ActionMatches{{'Microsoft.Authorization/roleAssignments/{action}'}})) "
        f"OR ({condition}))"
        for action, condition in allowed.items()
    )


def check_security(infra: Path = INFRA) -> list[str]:
    problems = []
    storage = load(infra, "modules/storage.bicep")["resources"]["account"]["config"]["properties"]
    expected = {
        "allowSharedKeyAccess": False,
        "allowBlobPublicAccess": False,
        "minimumTlsVersion": "TLS1_2",
        "supportsHttpsTrafficOnly": True,
    }
    for key, value in expected.items():
        if storage.get(key) != value:
            problems.append(f"storage account: {key} must be {json.dumps(value)}")
    insights = load(infra, "modules/monitoring.bicep")["resources"]["appInsights"]["config"]
    if insights["properties"].get("DisableLocalAuth") is not True:
        problems.append("Application Insights: DisableLocalAuth must be true")
    app = load(infra, "modules/functionapp.bicep")["resources"]["app"]["config"]["properties"]
    if app.get("httpsOnly") is not True:
        problems.append("function app: httpsOnly must be true")
    secret_words = re.compile(r"(?i)secret|password|key(?!vault)|connectionstring|token")
    for path in sorted(infra.rglob("*.bicep")):
        text = path.read_text()
        if re.search(r"\blist(Keys|Secrets|AccountSas|ServiceSas)\s*\(", text):
            problems.append(f"{path.name} reads keys or SAS (list...()): identity only")
        tree = load(infra, str(path.relative_to(infra)))
        # A secret never has a default (it would sit in the template) and is always @secure()
        # (kept out of deployment history); names, ids and types of secrets are not secrets.
        for name, parameter in tree["parameters"].items():
            if re.search(r"(Name|Id|Type|Uri|Url)$", name) or not secret_words.search(name):
                continue
            secure = any(d["type"] == "secure" for d in parameter["decorators"])
            if not secure or parameter.get("default") is not None:
                problems.append(
                    f"{path.name}: param {name} looks like a secret: @secure() and no default"
                )
        outputs = tree["outputs"]
        problems.extend(
            f"{path.name}: output {name} looks like a secret"
            for name in outputs
            if secret_words.search(name)
            and not name.endswith("Name")
            and (path.name, name) not in NOT_SECRET_OUTPUTS
        )
    return problems


def check_hosting(infra: Path = INFRA) -> list[str]:
    """Flex Consumption, Python 3.11, identity-based deployment storage, and the bot's
    endpoint on the route the messages function serves, with the Teams channel."""
    problems = []
    resources = load(infra, "modules/functionapp.bicep")["resources"]
    if _config(resources["plan"]).get("sku") != {"name": "FC1", "tier": "FlexConsumption"}:
        problems.append("the plan must be Flex Consumption (FC1)")
    app = _config(resources["app"])
    config = app["properties"].get("functionAppConfig", {})
    if config.get("runtime") != {"name": "python", "version": "3.11"}:
        problems.append("functionAppConfig.runtime must be python 3.11")
    storage = config.get("deployment", {}).get("storage", {})
    if storage.get("authentication", {}).get("type") != "UserAssignedIdentity":
        problems.append("the deployment container must be reached with the user-assigned identity")
    if app.get("identity", {}).get("type") != "UserAssigned":
        problems.append("the function app must run as the user-assigned identity")
    from tools.devhost.app import read_host_config  # host.json read as the host does

    prefix = read_host_config(ROOT).route_prefix
    binding = json.loads((ROOT / "messages_function" / "function.json").read_text())
    route = next(b["route"] for b in binding["bindings"] if b["type"] == "httpTrigger")
    endpoint = load(infra, "main.bicep")["modules"]["bot"]["config"]["params"].get("endpoint")
    if endpoint != f"https://${{functionApp.outputs.hostName}}/{prefix}/{route}":
        problems.append(f"the bot's endpoint must be https://<app host>/{prefix}/{route}")
    parameters = load(infra, "main.bicep")["parameters"]
    if parameters["botAppType"].get("default") != "UserAssignedMSI":
        problems.append("botAppType must default to UserAssignedMSI (no secret)")
    bot = load(infra, "modules/bot.bicep")["resources"]
    channels = [
        _config(r)["properties"]
        for r in bot.values()
        if r["type"] == "Microsoft.BotService/botServices/channels"
    ]
    if {"channelName": "MsTeamsChannel", "properties": {"isEnabled": True}} not in channels:
        problems.append("the bot must have the Microsoft Teams channel, enabled")
    return problems


def render(value: Any) -> str:
    """A pycep expression as Bicep-like text: `identity.properties.clientId`, `a ? b : c`.

    pycep gives identifiers and string literals alike as plain strings, so `render` does too.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(render(item) for item in value) + "]"
    if "operator" in value:
        kind, operands = value["operator"]["type"], value["operator"].get("operands", {})
        if kind == "property_accessor":
            return f"{render(operands['operand_1'])}.{render(operands['operand_2'])}"
        if kind == "conditional":
            parts = (operands["condition"], operands["true_value"], operands["false_value"])
            return "{} ? {} : {}".format(*map(render, parts))
        return f"{kind}({', '.join(render(operand) for operand in operands.values())})"
    if "function" in value:
        arguments = (value["function"].get("parameters") or {}).values()
        shown = ", ".join(render(argument) for argument in arguments if argument is not None)
        return f"{value['function']['type']}({shown})"
    return "{" + ", ".join(f"{key}: {render(item)}" for key, item in value.items()) + "}"


def _reachable_names(value: Any, variables: dict[str, Any], seen: set[str]) -> set[str]:
    """Every identifier `value` depends on, following variables and `${...}` interpolations."""
    found: set[str] = set()
    for text in _identifiers(value):
        names = set(re.findall(r"\$\{(\w+)", text)) | ({text} if text.isidentifier() else set())
        for name in names - seen:
            found.add(name)
            if name in variables:
                seen.add(name)
                found |= _reachable_names(variables[name]["value"], variables, seen)
    return found


# What each end of the identity wiring must be (rendered), and where.
IDENTITY_SETTINGS = {
    "AzureWebJobsStorage__clientId": "identity.properties.clientId",
    # Each service at its own endpoint (swapped, no proactive message would ever be read).
    "AzureWebJobsStorage__blobServiceUri": "storage.outputs.blobEndpoint",
    "AzureWebJobsStorage__queueServiceUri": "storage.outputs.queueEndpoint",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": (
        "ClientId=${identity.properties.clientId};Authorization=AAD"
    ),
    "MicrosoftAppType": "botAppType",
    "MicrosoftAppId": "appId",
    "MicrosoftAppTenantId": "tenant().tenantId",
}
IDENTITY_MODULE_PARAMS = {
    ("bot", "appType"): "botAppType",
    ("bot", "appId"): "appId",
    ("bot", "identityResourceId"): "identity.id",
    ("functionApp", "identityResourceId"): "identity.id",
    ("storage", "appPrincipalId"): "identity.properties.principalId",
    ("monitoring", "appPrincipalId"): "identity.properties.principalId",
    ("keyVault", "appPrincipalId"): "identity.properties.principalId",
}
BOT_PROPERTIES = {
    "msaAppType": "appType",
    "msaAppId": "appId",
    "msaAppTenantId": "tenant().tenantId",
}


def check_identity(infra: Path = INFRA) -> list[str]:
    """The one identity, wired the same way everywhere it is named."""
    main = load(infra, "main.bicep")
    variables = main["variables"]
    settings = app_settings(infra)
    problems = [
        f"{name} must be {expected}"
        for name, expected in IDENTITY_SETTINGS.items()
        if render(settings.get(name)) != expected
    ]
    expected_app_id = "singleTenant ? botAppId : identity.properties.clientId"
    if render(variables.get("appId", {}).get("value")) != expected_app_id:
        problems.append(f"var appId must be {expected_app_id}")
    password = settings.get("MicrosoftAppPassword")
    if password is not None and not render(password).startswith("@Microsoft.KeyVault("):
        problems.append("MicrosoftAppPassword must be a Key Vault reference, never a value")
    for (module, param), expected in IDENTITY_MODULE_PARAMS.items():
        config = _config(main["modules"].get(module, {"config": {}}))
        if render(config.get("params", {}).get(param)) != expected:
            problems.append(f"module {module}: {param} must be {expected}")
    # An Azure Bot's app id cannot be changed: a new identity needs a new registration.
    bot_name = variables.get("names", {}).get("value", {}).get("bot")
    if not {"botAppType", "botAppId"} <= _reachable_names(bot_name, variables, set()):
        problems.append(
            "the bot's name must change with its identity (botAppType and botAppId): "
            "an Azure Bot's app id cannot be changed"
        )
    bot = _config(load(infra, "modules/bot.bicep")["resources"]["bot"])["properties"]
    for name, expected in BOT_PROPERTIES.items():
        if render(bot.get(name)) != expected:
            problems.append(f"bot.bicep: {name} must be {expected}")
    if "identityResourceId" not in render(bot.get("msaAppMSIResourceId")):
        problems.append("bot.bicep: msaAppMSIResourceId must be identityResourceId")
    app = _config(load(infra, "modules/functionapp.bicep")["resources"]["app"])
    if render(app["properties"].get("keyVaultReferenceIdentity")) != "identityResourceId":
        problems.append("functionapp.bicep: keyVaultReferenceIdentity must be identityResourceId")
    identities = [
        key.strip("'") for key in app.get("identity", {}).get("userAssignedIdentities", {})
    ]
    if identities != ["${identityResourceId}"]:
        problems.append("functionapp.bicep: the app must run as identityResourceId only")
    storage = app["properties"].get("functionAppConfig", {}).get("deployment", {}).get("storage")
    reached = (storage or {}).get("authentication", {}).get("userAssignedIdentityResourceId")
    if render(reached) != "identityResourceId":
        problems.append("functionapp.bicep: the deployment container must use identityResourceId")
    return problems


# A parameter value that is only meaningful with others given too.
NEEDS = {("botAppType", "SingleTenant"): ("botAppId",)}
# What Bicep's decorators cannot say: the prefix starts a storage account's name, which
# takes only lower-case letters and digits (ARM refuses it after other resources exist).
PATTERNS = {"namePrefix": (re.compile(r"[a-z0-9]+"), "lower-case letters and digits only")}

_TYPES = {"string": str, "int": int, "bool": bool, "object": dict, "array": list}

# What the template's expressions that name no parameter resolve to on Azure (ids and
# endpoints of what it creates), to read the settings as the app will.
DEPLOYED = {
    "AzureWebJobsStorage__blobServiceUri": "https://stbot.blob.core.windows.net/",
    "AzureWebJobsStorage__queueServiceUri": "https://stbot.queue.core.windows.net/",
    "AzureWebJobsStorage__clientId": "00000000-0000-0000-0000-00000000000a",
    "MicrosoftAppId": "00000000-0000-0000-0000-00000000000a",
    "MicrosoftAppTenantId": "00000000-0000-0000-0000-00000000000b",
    "MicrosoftAppPassword": "the secret Key Vault holds",
}
# Settings set from a module's output that repeats a parameter (or a parameter as a string).
FROM_PARAMETER = {
    "BOT_REFERENCES_CONTAINER": "referencesContainer",
    "BOT_PROACTIVE_QUEUE": "proactiveQueue",
    "BOT_MAX_BODY_BYTES": "maxBodyBytes",
}
# Settings the template sets only with a parameter's value (`cond ? {...} : {}`), and the
# variable whose condition says so (check_parameter_file holds the template to it).
ONLY_WITH = {"MicrosoftAppPassword": ("botAppType", "SingleTenant")}
ONLY_WITH_VARIABLES = {
    "secretSettings": "singleTenant ? ",
    "singleTenant": "equals(botAppType, SingleTenant)",
}
_KEY_VAULT_REFERENCE = "@Microsoft.KeyVault("
EXTRA_SETTINGS = "extraAppSettings"


def deployed_settings(values: dict[str, Any], infra: Path = INFRA) -> dict[str, str]:
    """The app settings a deployment with parameter `values` gives the app, as it reads
    them (the parameters' defaults where `values` gives none; Azure's ids made up)."""
    declared = load(infra, "main.bicep")["parameters"]
    parameters = {name: p.get("default") for name, p in declared.items()} | values
    settings = {}
    for name, value in app_settings(infra).items():
        if name in ONLY_WITH and parameters.get(ONLY_WITH[name][0]) != ONLY_WITH[name][1]:
            continue
        if name in DEPLOYED:
            settings[name] = DEPLOYED[name]
        elif name in FROM_PARAMETER:
            settings[name] = str(parameters[FROM_PARAMETER[name]])
        elif isinstance(value, str) and value in parameters:
            settings[name] = str(parameters[value])
        elif isinstance(value, str) and "${" not in value:
            settings[name] = value
    extra = {  # App Service resolves a Key Vault reference before the app reads it
        name: "a Key Vault secret" if str(value).startswith(_KEY_VAULT_REFERENCE) else value
        for name, value in (parameters.get(EXTRA_SETTINGS) or {}).items()
    }
    platform = {"WEBSITE_INSTANCE_ID": "an instance on Azure", "WEBSITE_SKU": "FlexConsumption"}
    return {**extra, **settings, **platform}


def _pinned(folded: str) -> str | None:
    """Why a host.json option the setting `folded` (case-folded) overrides must stay as it
    is, for it or a part of it (`..__functions__0`, `..__extensionBundle__version`)."""
    for option, reason in PINNED_HOST_OPTIONS.items():
        if folded == option or folded.startswith(f"{option}__"):
            return reason
    return None


def _check_extra_settings(extra: dict[str, Any], infra: Path) -> list[str]:
    """Settings of the operator's own: strings, none the template sets, none that must
    not be set on Azure (the template's would win; the others break the app or bring
    shared keys back)."""
    # Names in any case: the host and the app read their configuration case-blind.
    template = {name.casefold() for name in app_settings(infra)}
    not_deployed = {name.casefold(): reason for name, reason in NOT_DEPLOYED.items()}
    forbidden = {name.casefold() for name in FORBIDDEN}
    problems = []
    for name, value in extra.items():
        where = f"main.parameters.json: {EXTRA_SETTINGS}.{name}"
        folded = name.casefold()
        if not isinstance(value, str):
            problems.append(f"{where} must be a string (app settings are strings)")
        if folded in template:
            problems.append(f"{where} is set by the template: change its parameter instead")
        elif folded in not_deployed:
            problems.append(f"{where} must not be set on Azure: {not_deployed[folded]}")
        elif folded in forbidden:
            problems.append(f"{where} must not be set on Flex Consumption")
        elif pinned := _pinned(folded):
            problems.append(f"{where} must not be overridden: {pinned}")
        elif isinstance(value, str) and _KEY_BEARING.search(value):
            problems.append(
                f"{where} holds a key, a SAS or a password: give a secret as a Key Vault reference "
                "(@Microsoft.KeyVault(...)), never in the parameter file"
            )
    if problems:
        return problems
    # A queue option for host.json: the local host reads them as the Functions host does.
    from tools.devhost.app import HostError, read_host_config

    resolved_here = {  # a Key Vault reference is resolved by App Service, not read here
        name: value for name, value in extra.items() if not value.startswith(_KEY_VAULT_REFERENCE)
    }
    try:
        read_host_config(ROOT, resolved_here)
    except HostError as error:
        problems.append(f"main.parameters.json: {EXTRA_SETTINGS}: the host would refuse {error}")
    return problems


def _check_app_accepts(values: dict[str, Any], infra: Path) -> list[str]:
    """The app's own validation of the settings the parameter file gives it: what it would
    refuse at every invocation once deployed."""
    from shared.config import Settings, SettingsError

    try:
        Settings.from_env(deployed_settings(values, infra))
    except SettingsError as error:
        return [f"main.parameters.json: the app would refuse its settings: {error}"]
    return []


class InputError(Exception):
    """A file the checks read is missing or not readable; the message names it."""


PARAMETER_FILE = "main.parameters.json"
REQUIRED_FILES = ("main.bicep", PARAMETER_FILE)


def parameter_values(infra: Path = INFRA) -> dict[str, Any]:
    """Each parameter's `value` in main.parameters.json; InputError (one line naming the
    file, and for a JSON syntax error its line and column) when it cannot be read so."""
    path = infra / PARAMETER_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not readable ({type(error).__name__})") from None
    parameters = document.get("parameters") if isinstance(document, dict) else None
    if not isinstance(parameters, dict) or not all(
        isinstance(entry, dict) for entry in parameters.values()
    ):
        raise InputError(f'{path}: must be an object whose "parameters" object holds objects')
    return {name: entry.get("value") for name, entry in parameters.items()}


def check_inputs(infra: Path) -> None:
    """InputError when `infra` is not a folder with the files the checks read."""
    if not infra.is_dir():
        raise InputError(f"{infra}: not a folder (give the infra folder, or none for ./infra)")
    for name in REQUIRED_FILES:
        if not (infra / name).is_file():
            raise InputError(f"{infra / name}: no such file")
    parameter_values(infra)


def check_parameter_file(infra: Path = INFRA) -> list[str]:
    """main.parameters.json names only parameters main.bicep has, with values of their type
    and within their @allowed / @minValue / @maxValue / @minLength / @maxLength (and the
    PATTERNS their descriptions state), and gives every parameter that has no default."""
    declared = load(infra, "main.bicep")["parameters"]
    path = infra / PARAMETER_FILE
    try:
        values = parameter_values(infra)
    except InputError as error:
        return [str(error)]
    problems = [
        f"{path.name}: {name} is not a parameter" for name in values if name not in declared
    ]
    for name, parameter in declared.items():
        if parameter.get("default") is None and name not in values:
            problems.append(f"{path.name}: {name} has no default and is not given")
        if name not in values:
            continue
        value = values[name]
        kind = _TYPES.get(parameter["type"])
        if kind and (not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)):
            problems.append(f"{path.name}: {name} must be of type {parameter['type']}")
            continue
        rules = {d["type"]: d["argument"] for d in parameter["decorators"]}
        if "allowed" in rules and value not in rules["allowed"]:
            problems.append(f"{path.name}: {name}={value!r} is not an allowed value")
        if "min_value" in rules and value < rules["min_value"]:
            problems.append(f"{path.name}: {name} is below its minimum")
        if "max_value" in rules and value > rules["max_value"]:
            problems.append(f"{path.name}: {name} is above its maximum")
        if "min_length" in rules and len(value) < rules["min_length"]:
            problems.append(f"{path.name}: {name} is shorter than {rules['min_length']}")
        if "max_length" in rules and len(value) > rules["max_length"]:
            problems.append(f"{path.name}: {name} is longer than {rules['max_length']}")
        pattern, meaning = PATTERNS.get(name, (None, ""))
        if pattern is not None and not pattern.fullmatch(value):
            problems.append(f"{path.name}: {name}={value!r} must be {meaning}")
    for (name, value), needed in NEEDS.items():
        if values.get(name) == value:
            problems.extend(
                f"{path.name}: {name}={value} needs {other}"
                for other in needed
                if not values.get(other)
            )
    variables = load(infra, "main.bicep")["variables"]
    for variable, condition in ONLY_WITH_VARIABLES.items():
        if not render(variables.get(variable, {}).get("value")).startswith(condition):
            problems.append(f"main.bicep: var {variable} must be `{condition}...` (ONLY_WITH)")
    if isinstance(values.get(EXTRA_SETTINGS), dict):
        problems.extend(_check_extra_settings(values[EXTRA_SETTINGS], infra))
    if not problems:  # each value of its type and range: what the app makes of them
        problems.extend(_check_app_accepts(values, infra))
    return problems


def check_all(infra: Path = INFRA) -> list[str]:
    problems = check_parses(infra)
    if problems:
        return problems
    checks = (
        check_app_settings,
        check_names,
        check_roles,
        check_producer_reads,
        check_security,
        check_hosting,
        check_identity,
        check_parameter_file,
    )
    for check in checks:
        problems.extend(check(infra))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.infra_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("infra", nargs="?", type=Path, default=INFRA, help="the infra folder")
    parser.add_argument(
        "--role-condition",
        action="store_true",
        help="print the condition that limits a deployer to the roles the template assigns",
    )
    args = parser.parse_args(argv)
    infra = args.infra
    try:
        check_inputs(infra)
    except InputError as error:
        print(f"infra_check: {error}", file=sys.stderr)
        return 2
    if args.role_condition:
        # A condition made from part of the template would refuse what the rest assigns.
        problems = check_parses(infra.resolve())
        for problem in problems:
            print(f"infra_check: {problem}", file=sys.stderr)
        try:
            condition = None if problems else role_condition(infra.resolve())
        except InputError as error:
            print(f"infra_check: {error}", file=sys.stderr)
            return 2
        if condition is None:
            return 1
        print(condition)
        return 0
    problems = check_all(infra.resolve())
    for problem in problems:
        print(problem)
    print(f"{infra}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
