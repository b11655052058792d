"""checkov's Bicep checks (offline) pass on infra/, every suppression has a reason and is
still needed, and a weakened copy fails. One checkov run covers both copies (it is slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKOV = ROOT / ".tools" / "checkov-venv" / "bin" / "checkov"
SKIP = re.compile(r"//\s*checkov:skip=([A-Z0-9_]+)(?::(.*))?")


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[dict]]]:
    """checkov's results per copy ('good', 'bad') and per outcome ('failed', 'skipped')."""
    if not CHECKOV.is_file():
        pytest.fail("checkov is not installed: run `make setup`")
    base = tmp_path_factory.mktemp("checkov")
    shutil.copytree(ROOT / "infra", base / "good")
    shutil.copytree(ROOT / "infra", base / "bad")
    storage = base / "bad" / "modules" / "storage.bicep"
    text = storage.read_text()
    assert "minimumTlsVersion: 'TLS1_2'" in text
    storage.write_text(text.replace("minimumTlsVersion: 'TLS1_2'", "minimumTlsVersion: 'TLS1_0'"))
    result = subprocess.run(
        [str(CHECKOV), "-d", str(base), "--framework", "bicep", "-o", "json", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=600,
        # No network: no platform key, no download of guidelines or mappings.
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0, result.stdout[-2000:]
    outcome: dict[str, dict[str, list[dict]]] = {
        copy: {"failed": [], "skipped": []} for copy in ("good", "bad")
    }
    for kind in ("failed", "skipped"):
        for check in report["results"].get(f"{kind}_checks", []):
            copy = check["file_path"].strip("/").split("/")[0]
            outcome[copy][kind].append(check)
    return outcome


def test_checkov_passes_on_the_infra(scan) -> None:
    failed = [(c["check_id"], c["file_path"], c["resource"]) for c in scan["good"]["failed"]]
    assert failed == []


def test_checkov_fails_a_copy_that_allows_old_tls(scan) -> None:
    failed = {(c["check_id"], c["file_path"]) for c in scan["bad"]["failed"]}
    assert ("CKV_AZURE_44", "/bad/modules/storage.bicep") in failed


def suppressions() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((ROOT / "infra").rglob("*.bicep")):
        for match in SKIP.finditer(path.read_text()):
            found.append((path.relative_to(ROOT / "infra").as_posix(), match[1], match[2] or ""))
    return found


def test_every_suppression_gives_a_reason() -> None:
    assert suppressions()
    for file, check_id, reason in suppressions():
        assert len(reason.strip()) >= 20, f"{file}: skip of {check_id} needs a reason"


def test_every_suppression_is_still_needed(scan) -> None:
    used = {(c["file_path"].removeprefix("/good/"), c["check_id"]) for c in scan["good"]["skipped"]}
    stale = [(file, check) for file, check, _ in suppressions() if (file, check) not in used]
    assert stale == []
