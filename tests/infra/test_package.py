"""`make package`: the zip holds the app and nothing dev-only, and its functions import in
a fresh venv that has only requirements.txt installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools import package

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ("messages_function", "proactive_function", "schedule_function")
DEV_ONLY = (
    "tests/",
    "tools/",
    "benchmarks/",
    "infra/",
    "appPackage/",
    "docs/",
    "dist/",
    ".venv/",
    ".tools/",
    ".github/",
    ".git",
    "Makefile",
    "requirements-dev.txt",
    "local.settings.json",
    "local.settings.example.json",
    "pyproject.toml",
)


# Imports the function folders, then every module any file of the package imports, lazy
# (inside a function) imports included, so a package missing from requirements.txt shows.
_IMPORT_EVERYTHING = """
import ast, importlib, pathlib, sys
for function in sys.argv[1:]:
    importlib.import_module(function)
modules = set()
for path in pathlib.Path(".").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
for module in sorted(modules):
    importlib.import_module(module)
print(len(modules), "modules ok")
"""

# Every distribution installed, as `name==version` (names normalised as pip writes pins).
_VERSIONS = """
import importlib.metadata, re
for dist in importlib.metadata.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    print(f"{name}=={dist.version}")
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    output = tmp_path_factory.mktemp("package") / "functionapp.zip"
    package.build(output)
    with zipfile.ZipFile(output) as archive:
        return output, archive.namelist()


def test_the_package_holds_the_app(built) -> None:
    _, names = built
    for required in ("host.json", "requirements.txt", "shared/__init__.py", "shared/config.py"):
        assert required in names
    for function in FUNCTIONS:
        assert f"{function}/function.json" in names
        assert f"{function}/__init__.py" in names


def test_the_package_holds_nothing_dev_only(built) -> None:
    _, names = built
    leaked = [n for n in names if n.startswith(DEV_ONLY)]
    assert leaked == []
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pem", ".key"))]


def test_funcignore_rules_follow_gitignore(tmp_path: Path) -> None:
    (tmp_path / ".funcignore").write_text("# comment\n*.log\n/top.txt\nsecrets/\n!keep.log\n")
    for name in ("host.json", "requirements.txt", "a.log", "keep.log", "top.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.txt").write_text("x")
    (tmp_path / "sub" / "b.log").write_text("x")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "s.json").write_text("x")
    files = package.package_files(tmp_path)
    assert files == [".funcignore", "host.json", "keep.log", "requirements.txt", "sub/top.txt"]


def test_a_folder_that_is_not_an_app_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(SystemExit, match=r"missing host\.json, requirements\.txt"):
        package.build(tmp_path / "out.zip", tmp_path)
    assert not (tmp_path / "out.zip").exists()


def test_the_same_tree_gives_the_same_bytes(built, tmp_path: Path) -> None:
    output, _ = built
    again = tmp_path / "again.zip"
    package.build(again)
    assert again.read_bytes() == output.read_bytes()


@pytest.mark.integration
def test_the_functions_import_with_only_requirements_installed(built, tmp_path: Path) -> None:
    output, _ = built
    app = tmp_path / "app"
    with zipfile.ZipFile(output) as archive:
        archive.extractall(app)
    # The packaged constraints apply to whatever installs requirements.txt (Azure's remote
    # build): pinned lower here, the dependency the app only brings in comes at that pin.
    constraints = app / "constraints.txt"
    pins = constraints.read_text()
    assert "\nazure-core==1.41.0\n" in pins
    constraints.write_text(pins.replace("\nazure-core==1.41.0\n", "\nazure-core==1.40.0\n"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The repo's pip installs into the new venv (pip's cache keeps this quick).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(app / "requirements.txt"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    result = subprocess.run(
        [str(python), "-E", "-s", "-c", _IMPORT_EVERYTHING, *FUNCTIONS],
        cwd=app,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    versions = subprocess.run(
        [str(python), "-E", "-s", "-c", _VERSIONS],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout.split()
    assert "azure-core==1.40.0" in versions
    pinned = {re.sub(r"[-_.]+(?=.*==)", "-", line.strip().lower()) for line in pins.splitlines()}
    pinned.add("azure-core==1.40.0")
    assert [v for v in versions if v not in pinned and not v.startswith("pip==")] == []


def test_the_make_targets_run_the_builders() -> None:
    result = subprocess.run(
        ["make", "-n", "package", "teams-package", "BOT_ID=id", "BOT_DOMAIN=host"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "-m tools.package dist/functionapp.zip" in result.stdout
    assert (
        '-m tools.teams_package --bot-id "id" --domain "host" dist/teams-app.zip' in result.stdout
    )


def test_settings_files_never_go_into_the_package(tmp_path: Path) -> None:
    # A copy outside git packs every file `.funcignore` lets through, and `func` uploads
    # them: `.funcignore` named only local.settings.json, so a `make run --settings` file
    # (local.settings.prod.json, the client secret in it) went to Azure.
    (tmp_path / ".funcignore").write_text("tests\n")  # one that forgot them
    for name in ("host.json", "requirements.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "shared").mkdir()
    for name in (
        "local.settings.prod.json",
        "shared/local.settings.json",
        ".env.production",
        "Local.Settings.json",
        "local.settings.json.bak",
        "local.settings.json~",
        "prod.env",
        "shared/Copy of local.settings.json",
        "local.settings.json.orig",
        "#local.settings.json#",
    ):
        (tmp_path / name).write_text('{"MicrosoftAppPassword": "secret"}')
    assert package.package_files(tmp_path) == [".funcignore", "host.json", "requirements.txt"]
    # `.funcignore` for `func publish`, whose parser matches a rule without a slash at the
    # top folder only: `**/` for the folders below.
    lines = (package.ROOT / ".funcignore").read_text().splitlines()
    for pattern in ("*local.settings*", ".env", ".env.*"):
        assert pattern in lines and f"**/{pattern}" in lines, pattern
    rules = package.parse_ignore("\n".join(lines))
    for name in ("local.settings.prod.json", "shared/.env", "shared/.env.local"):
        assert package.is_ignored(name, False, rules), name


def test_a_symlink_never_brings_a_file_from_outside_into_the_package(tmp_path: Path) -> None:
    app, outside = tmp_path / "app", tmp_path / "outside"
    app.mkdir()
    outside.mkdir()
    (outside / "id_rsa").write_text("private key")
    for name in ("host.json", "requirements.txt"):
        (app / name).write_text("x")
    (app / "shared").mkdir()
    (app / "shared" / "key.txt").symlink_to(outside / "id_rsa")
    (app / "linked").symlink_to(outside, target_is_directory=True)
    assert package.package_files(app) == ["host.json", "requirements.txt"]


def test_in_a_git_work_tree_only_tracked_files_are_packed_and_strays_stop_the_build(
    tmp_path: Path, capsys
) -> None:
    # A settings backup with a secret beside the app would go to Azure with `func publish`,
    # and a module not added yet would be missing there: the build stops and names them.
    # Ignored files are left out without a word.
    import subprocess

    app = tmp_path / "app"
    (app / "shared").mkdir(parents=True)
    for name in ("host.json", "requirements.txt", "app.py", "shared/bot.py"):
        (app / name).write_text("x")
    (app / ".gitignore").write_text("*.log\n")
    git = ["git", "-C", str(app), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "app"], check=True)
    (app / "prod-settings.json").write_text('{"MicrosoftAppPassword": "secret"}')
    (app / "shared" / "helper.py").write_text("untracked")
    (app / "host.log").write_text("ignored")

    expected = [".gitignore", "app.py", "host.json", "requirements.txt", "shared/bot.py"]
    assert package.package_files(app) == expected
    out = tmp_path / "out.zip"
    assert package.main([str(out), "--root", str(app)]) == 1
    assert not out.exists()
    error = capsys.readouterr().err
    assert "2 file(s) git neither tracks nor ignores: prod-settings.json, shared/helper.py" in error

    assert package.main([str(out), "--root", str(app), "--allow-untracked"]) == 0
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == expected
    assert "left out, not tracked by git (2)" in capsys.readouterr().out


def test_a_work_tree_git_cannot_read_stops_the_build(tmp_path: Path) -> None:
    # Packing everything when git fails (a repository another user owns, say) could take a
    # stray secret along.
    app = tmp_path / "app"
    (app / ".git").mkdir(parents=True)  # not a repository git can read
    for name in ("host.json", "requirements.txt"):
        (app / name).write_text("x")
    with pytest.raises(SystemExit, match="git could not list its files"):
        package.package_files(app)


def _git_app(folder: Path, files: tuple[str, ...] = ("host.json", "requirements.txt")) -> list:
    """A committed git repository at `folder` holding `files`; the git command prefix."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    return git


def test_a_module_in_a_nested_repository_stops_the_build_and_a_submodules_is_packed(
    tmp_path: Path, capsys
) -> None:
    # git lists a nested repository as one folder entry and a submodule as one gitlink:
    # their files must neither vanish from the zip without a word nor be refused.
    import subprocess

    app, lib = tmp_path / "app", tmp_path / "lib"
    git = _git_app(app)
    _git_app(lib, ("helper.py",))
    subprocess.run(["git", "clone", "-q", str(lib), str(app / "shared" / "vendor")], check=True)
    out = tmp_path / "out.zip"
    assert package.main([str(out), "--root", str(app)]) == 1
    assert "shared/vendor/helper.py" in capsys.readouterr().err

    (app / "shared").joinpath("vendor").rename(tmp_path / "gone")
    clone = ["-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib)]
    subprocess.run([*git, *clone, "shared/vendor"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "vendor"], check=True)
    assert package.main([str(out), "--root", str(app)]) == 0
    with zipfile.ZipFile(out) as archive:
        assert "shared/vendor/helper.py" in archive.namelist()


def test_an_app_the_enclosing_repository_ignores_is_told_so(tmp_path: Path) -> None:
    # A copy inside a repository that ignores it: "not a Functions app" would be wrong.
    parent = tmp_path / "home"
    _git_app(parent, (".gitignore",))
    (parent / ".gitignore").write_text("app/\n")
    app = parent / "app"
    app.mkdir()
    for name in ("host.json", "requirements.txt"):
        (app / name).write_text("x")
    with pytest.raises(SystemExit, match=r"git tracks none of host\.json, requirements\.txt"):
        package.build(tmp_path / "out.zip", app)
