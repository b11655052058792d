"""The CI workflow offered to users is linted by actionlint (it cannot run here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ACTIONLINT), "-no-color", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_workflows_pass_actionlint() -> None:
    assert WORKFLOWS
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout


def test_actionlint_fails_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "ci.yml"
    shutil.copy(ROOT / ".github" / "workflows" / "ci.yml", broken)
    text = broken.read_text()
    assert "needs: test\n" in text
    broken.write_text(text.replace("needs: test\n", "needs: tests\n"))
    result = actionlint(broken)
    assert result.returncode == 1
    assert "tests" in result.stdout


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_deploys_use_federated_credentials_not_secrets(workflow: Path) -> None:
    text = workflow.read_text()
    assert "secrets." not in text
    if "azure/login@" in text:
        assert "id-token: write" in text
        assert "client-secret" not in text and "creds:" not in text


def test_deploying_happens_on_tags_after_the_tests() -> None:
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    deploy = text[text.index("\n  deploy:") :]
    assert "if: startsWith(github.ref, 'refs/tags/v')" in deploy
    assert "needs: test\n" in deploy
    assert "run: make test" in text[: text.index("\n  deploy:")]


def test_two_deploys_never_run_at_once() -> None:
    # Two tags pushed close together must queue, not interleave provisioning and code deploys
    # (nor cancel one half-way).
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    deploy = text[text.index("\n  deploy:") :]
    assert re.search(
        r"\n    concurrency:\n      group: [\w${}.-]+\n      cancel-in-progress: false\n", deploy
    )


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_checkouts_leave_no_token_behind(workflow: Path) -> None:
    # Later steps (make test runs code from the repository) never need the job's token.
    text = workflow.read_text()
    checkouts = re.findall(r"- uses: actions/checkout@\S+\n((?:\s{8}.*\n)*)", text)
    assert checkouts
    for options in checkouts:
        assert "persist-credentials: false" in options


def _run_block(step_name: str) -> str:
    """The shell script of the ci.yml step named `step_name` (its `run: |` block)."""
    lines = (ROOT / ".github" / "workflows" / "ci.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"- name: {step_name}")
    run = next(i for i in range(start, len(lines)) if lines[i].strip() == "run: |")
    indent = len(lines[run]) - len(lines[run].lstrip()) + 2
    script = []
    for line in lines[run + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        script.append(line[indent:])
    return "\n".join(script)


@pytest.mark.parametrize(("refusals", "code", "uploads"), [(0, 0, 1), (3, 0, 4), (9, 1, 5)])
def test_the_package_upload_is_tried_again_while_new_roles_apply(
    tmp_path: Path, refusals: int, code: int, uploads: int
) -> None:
    # Right after the first provisioning the upload is refused until the identity's new
    # storage roles apply: the step tries up to 5 times. An `az` of our own counts the
    # uploads and refuses the first `refusals` (the one thing made up: no Azure here).
    calls = tmp_path / "calls"
    fake = tmp_path / "az"
    fake.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n[ "$(wc -l < {calls})" -gt {refusals} ] || exit 1\n'
    )
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "DEPLOY_RETRY_SECONDS": "0"}
    env |= {"RESOURCE_GROUP": "rg", "APP": "app"}
    result = subprocess.run(
        [
            "bash",
            "-e",
            "-c",
            _run_block("Deploy the package (remote build installs requirements.txt)"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == code, result.stdout + result.stderr
    made = calls.read_text().splitlines()
    assert len(made) == uploads
    assert all("deployment source config-zip" in call and "--name app" in call for call in made)
