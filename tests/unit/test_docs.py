"""What the README and docs/ tell a user agrees with the code: settings, defaults, links."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from shared.config import AZURE_HOST_MARKERS, Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_TABLES = ("README.md", "docs/contracts.md")
# Read by the code, but set by the platform, not by a user: never in the settings tables.
PLATFORM_SETTINGS = set(AZURE_HOST_MARKERS)
LOCAL = {"BOT_ALLOW_UNAUTHENTICATED": "true"}  # the fewest settings that validate


class RecordingEnv(Mapping[str, str]):
    """An environment that remembers every name the settings code looked up."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        return self.values[name]

    def get(self, name: str, default=None):  # type: ignore[override]
        self.asked.add(name)
        return self.values.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def settings_rows(document: str) -> dict[str, str]:
    """The Configuration/Settings table of a document: setting name -> its default cell."""
    rows: dict[str, str] = {}
    text = (ROOT / document).read_text(encoding="utf-8")
    table = text.split("| setting | meaning | default |", 1)[1].split("\n\n", 1)[0]
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells[-1]
    return rows


def names_the_code_reads() -> set[str]:
    env = RecordingEnv(dict(LOCAL))
    Settings.from_env(env)
    storage = {name for name in env.asked if name.startswith("AzureWebJobsStorage")}
    return (env.asked - storage - PLATFORM_SETTINGS) | {"AzureWebJobsStorage"}


@pytest.mark.parametrize("document", SETTINGS_TABLES)
def test_the_settings_table_lists_exactly_the_settings_the_code_reads(document):
    assert set(settings_rows(document)) == names_the_code_reads()


def shown(value: object, cell: str) -> bool:
    """The value is in the cell, whole or as a `prefix/...` abbreviation of a URL."""
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if f"`{text}`" in cell:
        return True
    return any(text.startswith(prefix) for prefix in re.findall(r"`([^`]+)/\.\.\.`", cell))


DEFAULTS = {
    "MicrosoftAppType": "app_type",
    "BOT_CHANNEL_SERVICE": "channel_service",
    "BOT_OPENID_METADATA_URL": "openid_metadata_url",
    "BOT_EMULATOR_OPENID_METADATA_URL": "emulator_openid_metadata_url",
    "BOT_LOGIN_AUTHORITY": "login_authority",
    "BOT_ALLOW_UNAUTHENTICATED": "allow_unauthenticated",
    "BOT_REFERENCES_CONTAINER": "references_container",
    "BOT_PROACTIVE_QUEUE": "proactive_queue",
    "BOT_SCHEDULE": "schedule",
    "BOT_PROACTIVE_MAX_AGE_SECONDS": "proactive_max_age",
    "BOT_PROACTIVE_CLAIM_SECONDS": "proactive_claim_seconds",
    "BOT_MAX_BODY_BYTES": "max_body_bytes",
    "BOT_CONNECTOR_RATE_LIMIT": "connector_rate_limit",
}
CLOUD_DEFAULTS = (
    "BOT_OPENID_METADATA_URL",
    "BOT_EMULATOR_OPENID_METADATA_URL",
    "BOT_LOGIN_AUTHORITY",
)


@pytest.mark.parametrize("document", SETTINGS_TABLES)
def test_the_defaults_in_the_settings_table_are_the_codes(document):
    rows = settings_rows(document)
    public = Settings.from_env({"MicrosoftAppId": "00000000-0000-0000-0000-000000000001"})
    usgov = Settings.from_env({**LOCAL, "BOT_CHANNEL_SERVICE": "usgov"})
    wrong = {}
    for name, attribute in DEFAULTS.items():
        value = getattr(public, attribute)
        if isinstance(value, bool):
            value = str(value).lower()
        if not shown(value, rows[name]):
            wrong[name] = (value, rows[name])
        if name in CLOUD_DEFAULTS and not shown(getattr(usgov, attribute), rows[name]):
            wrong[f"{name} (usgov)"] = (getattr(usgov, attribute), rows[name])
    assert wrong == {}


def test_the_contract_names_every_variable_that_means_azure():
    # A reader checking why local mode was refused finds the variable the error named.
    text = (ROOT / "docs" / "contracts.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `BOT_ALLOW_UNAUTH"))
    assert [m for m in AZURE_HOST_MARKERS if f"`{m}`" not in row] == []


def tracked(*patterns: str) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return listed.stdout.split()


def test_relative_links_in_the_docs_resolve_inside_the_repo():
    broken = []
    for name in tracked("*.md"):
        document = ROOT / name
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if not path or re.match(r"[a-z]+:", path):
                continue
            resolved = (document.parent / path).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{name}: {target}")
    assert broken == []


def test_every_python_m_command_in_the_docs_exists():
    missing = []
    for name in tracked("*.md", "Makefile", ".github/workflows/*.yml"):
        for module in re.findall(r"python -m ([A-Za-z_][\w.]*\w)", (ROOT / name).read_text()):
            path = ROOT / module.replace(".", "/")
            if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
                missing.append(f"{name}: python -m {module}")
    assert missing == []


def test_a_tool_version_changed_in_the_makefile_is_installed_by_make_setup():
    # Each tool's target was the installed binary: a pull that moved its pinned version
    # kept the old one installed.
    import subprocess

    versions = {
        "AZURITE_VERSION": ("azurite@9.9.9", "npm install"),
        "PLAYGROUND_VERSION": ("m365agentsplayground@9.9.9", "npm install"),
        "CHECKOV_VERSION": ("checkov==9.9.9", "pip install"),
        "APP_MANIFEST_VERSION": ("app-manifest@9.9.9", "npm install"),
    }
    for setting, (package, how) in versions.items():
        target = "playground" if setting == "PLAYGROUND_VERSION" else "setup"
        planned = subprocess.run(
            ["make", "-n", target, f"{setting}=9.9.9"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert planned.returncode == 0, planned.stderr
        lines = planned.stdout.replace("\\\n", " ").splitlines()  # continued lines joined
        installs = [line for line in lines if package in line]
        assert installs and how in installs[0], (setting, planned.stdout[-1000:])
