"""README "Deploy": every command shown is checked against what it names, where a checker
exists offline: Bicep parameters and outputs, files, make targets and variables, Core
Tools flags, the repo's own commands, settings, JSON arguments. (The Azure CLI itself
cannot run here; its commands are checked for what they pass in.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import infra_check

ROOT = Path(__file__).resolve().parents[2]
MAIN = infra_check.load(infra_check.INFRA, "main.bicep")
# Placeholders that are not deployment outputs: what the reader supplies.
READER_VALUES = {"objectId", "appId", "keyId", "conversationId", "owner", "repo"}
READER_VALUES |= {"resourceGroupId", "requestId"}
CORE_TOOLS_PUBLISH_FLAGS = {"--python"}
# The producer command's fixed contract: subcommands and their flags.
PRODUCER = {
    "send": {"--conversation", "--user", "--broadcast", "--text", "--activity", "--id"},
    "report": set(),
    "conversations": set(),
}


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Deploy\n")
    end = text.index("\n## ", start + 5)
    return text[start:end]


def commands() -> list[str]:
    found = []
    for block in re.findall(r"```sh\n(.*?)```", section(), re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        joined = re.sub(r"\n\s*\|", " |", joined)
        found.extend(line.strip() for line in joined.splitlines() if line.strip())
    return found


def words(command: str) -> list[str]:
    return shlex.split(command.split(" | ")[0])


def options(tokens: list[str]) -> dict[str, list[str]]:
    """--flag -> the values after it (a flag may repeat, take several values, or none)."""
    found: dict[str, list[str]] = {}
    current = ""
    for token in tokens:
        if token.startswith("--"):
            current = token
            found.setdefault(current, [])
        elif current:
            found[current].append(token)
    return found


def test_the_section_shows_every_step() -> None:
    joined = "\n".join(commands())
    for needle in (
        "az deployment group create",
        "func azure functionapp publish",
        "make package",
        "make teams-package",
        "shared.producer send",
        "az bot delete",
        "az keyvault secret set",
        "credential reset --id <appId> --append",
        "federated-credential create",
    ):
        assert needle in joined
    chosen = parameter_snippets()
    assert chosen["botAppType"] == "SingleTenant"
    assert {"botAppId", "secretsOfficerPrincipalId", "producerPrincipalId"} <= set(chosen)


def parameter_snippets() -> dict[str, object]:
    """The parameter entries the section tells the reader to add to main.parameters.json."""
    found: dict[str, object] = {}
    for block in re.findall(r"```json\n(.*?)```", section(), re.S):
        entries = json.loads("{" + block.strip().rstrip(",") + "}")
        found.update({name: entry["value"] for name, entry in entries.items()})
    return found


def deployment_commands() -> list[tuple[str, str]]:
    """(where, command) of every `az deployment group create`, README and workflows."""
    found = [("README", c) for c in commands() if c.startswith("az deployment group create")]
    for workflow in sorted((ROOT / ".github" / "workflows").glob("*.yml")):
        text = re.sub(r"\\\n\s*", "", workflow.read_text())
        for line in text.splitlines():
            if "az deployment group create" in line:
                command = line[line.index("az deployment group create") :].rstrip(")")
                found.append((workflow.name, command))
    return found


def test_every_deployment_deploys_the_committed_parameter_file() -> None:
    """Choices live in infra/main.parameters.json, not on a command line: a re-run, or the
    workflow's deploy on a tag, must never undo one (e.g. turn SingleTenant back into the
    managed identity)."""
    found = deployment_commands()
    assert {where for where, _ in found} >= {"README", "ci.yml"}
    for where, command in found:
        passed = options(words(command))
        assert passed["--template-file"] == ["infra/main.bicep"], (where, command)
        assert passed["--parameters"] == ["infra/main.parameters.json"], (where, command)


def test_the_parameters_the_section_adds_are_valid(tmp_path: Path) -> None:
    """What the reader adds to main.parameters.json names real parameters with accepted
    values (the repo's own check of the file, on a copy with the additions)."""
    infra = tmp_path / "infra"
    shutil.copytree(ROOT / "infra", infra)
    path = infra / "main.parameters.json"
    document = json.loads(path.read_text())
    for name, value in parameter_snippets().items():
        document["parameters"][name] = {"value": value}
    path.write_text(json.dumps(document))
    assert infra_check.check_parameter_file(infra) == []


def test_the_committed_parameter_file_gives_every_required_parameter() -> None:
    required = {name for name, p in MAIN["parameters"].items() if p.get("default") is None}
    in_file = set(json.loads((ROOT / "infra/main.parameters.json").read_text())["parameters"])
    assert required <= in_file


def test_placeholders_are_outputs_or_the_readers_own_values() -> None:
    outputs = set(MAIN["outputs"])
    shown = "\n".join(commands())
    for placeholder in set(re.findall(r"<([A-Za-z]+)>", shown)):
        assert placeholder in outputs | READER_VALUES, f"<{placeholder}> is neither"
    named = section().split("The outputs name what the next steps need:")[1].split("\n\n")[0]
    for output in re.findall(r"`<(\w+)>`", named):
        assert output in outputs


def test_make_commands_name_real_targets_and_variables() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    checked = 0
    for command in commands():
        if command.startswith("make "):
            target, *assignments = words(command)[1:]
            assert target in targets
            for assignment in assignments:
                assert f"$({assignment.split('=')[0]})" in makefile
            checked += 1
    assert checked >= 2


def test_the_zips_are_where_the_makefile_writes_them() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for path in ("dist/functionapp.zip", "dist/teams-app.zip"):
        assert path in section()
        assert path in makefile


def test_core_tools_commands_use_known_flags() -> None:
    publishes = [c for c in commands() if c.startswith("func azure functionapp publish")]
    assert publishes
    for command in publishes:
        tokens = words(command)
        assert tokens[4].startswith("<")  # the app's name
        assert set(tokens[5:]) <= CORE_TOOLS_PUBLISH_FLAGS


def test_exported_settings_are_ones_the_code_reads() -> None:
    code = infra_check.code_settings()
    exported = [c for c in commands() if c.startswith("export ")]
    assert exported
    for command in exported:
        assert command.split()[1].split("=")[0] in code


def test_producer_commands_follow_the_contract() -> None:
    producers = [c for c in commands() if "-m shared.producer" in c]
    assert producers
    for command in producers:
        tokens = words(command)
        subcommand = tokens[tokens.index("shared.producer") + 1]
        assert subcommand in PRODUCER
        assert set(options(tokens)) <= PRODUCER[subcommand]


@pytest.mark.skipif(
    not (ROOT / "shared" / "producer.py").exists() and not (ROOT / "shared" / "producer").is_dir(),
    reason="shared.producer has not landed on this branch yet",
)
def test_the_producer_command_accepts_what_the_readme_shows() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shared.producer", "send", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--conversation", "--text"):
        assert flag in result.stdout


def test_repo_tools_named_in_the_section_run() -> None:
    for module in set(re.findall(r"-m (tools\.\w+)", section())):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (module, result.stderr)


def test_the_federated_credential_matches_the_workflow() -> None:
    (command,) = [c for c in commands() if "federated-credential create" in c]
    credential = json.loads(options(words(command))["--parameters"][0])
    assert credential["issuer"] == "https://token.actions.githubusercontent.com"
    assert credential["audiences"] == ["api://AzureADTokenExchange"]
    environment = credential["subject"].rsplit(":", 1)[-1]
    workflow = (ROOT / ".github/workflows/ci.yml").read_text()
    assert f"environment: {environment}\n" in workflow
    for variable in re.findall(r"vars\.(\w+)", workflow):
        assert variable in section()


def test_the_parameter_table_lists_exactly_the_parameters() -> None:
    text = section()
    table = text[text.index("### Parameters of `infra/main.bicep`") :]
    listed = set()
    for row in re.findall(r"^\| (`[^|]+`) \|", table, re.M):
        listed.update(re.findall(r"`(\w+)`", row))
    assert listed == set(MAIN["parameters"])


def test_the_deployer_may_assign_only_the_templates_roles() -> None:
    # Unconstrained, Role Based Access Control Administrator could grant anyone Owner.
    (command,) = [c for c in commands() if "Role Based Access Control Administrator" in c]
    passed = options(words(command))
    assert passed["--condition"] == ["$(.venv/bin/python -m tools.infra_check --role-condition)"]
    assert passed["--condition-version"] == ["2.0"]
