"""Build the deployable zip: the app's files, minus what `.funcignore` excludes.

This is what `func azure functionapp publish` uploads (it reads `.funcignore` the same way,
with .gitignore rules), so the zip can also go to a zip deploy. In a git work tree only
files git tracks go in: a stray file beside the app (a settings backup holding a secret, a
download) is left out and named, where `func` would upload it. Entries are sorted and
carry a fixed timestamp: the same tree always gives the same bytes.

    python -m tools.package dist/functionapp.zip
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Rule:
    """One .gitignore-style line of `.funcignore`."""

    pattern: str
    negated: bool = False
    directory_only: bool = False
    anchored: bool = False  # has a slash: matched against the whole relative path

    def matches(self, relative: str, is_dir: bool) -> bool:
        if self.directory_only and not is_dir:
            return False
        if self.anchored:
            return fnmatch.fnmatchcase(relative, self.pattern)
        return fnmatch.fnmatchcase(relative.rsplit("/", 1)[-1], self.pattern)


def parse_ignore(text: str) -> list[Rule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.removeprefix("!")
        directory_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        rules.append(Rule(line.lstrip("/"), negated, directory_only, anchored))
    return rules


def is_ignored(relative: str, is_dir: bool, rules: list[Rule]) -> bool:
    """The last matching rule decides, as in .gitignore."""
    ignored = False
    for rule in rules:
        if rule.matches(relative, is_dir):
            ignored = not rule.negated
    return ignored


def package_files(root: Path = ROOT) -> list[str]:
    """Relative paths (with /) of every file that goes into the package, sorted."""
    found = app_files(root)
    tracked = tracked_files(root)
    return found if tracked is None else [name for name in found if name in tracked]


def untracked_files(root: Path = ROOT) -> list[str]:
    """The app's files left out because git does not track them (none outside git)."""
    tracked = tracked_files(root)
    return [] if tracked is None else [name for name in app_files(root) if name not in tracked]


def tracked_files(root: Path) -> set[str] | None:
    """The files git tracks under `root`, relative to it; None when `root` is not in a git
    work tree (a downloaded copy) or git is not installed."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    return {name for name in listed.stdout.decode("utf-8", "surrogateescape").split("\0") if name}


def app_files(root: Path = ROOT) -> list[str]:
    """Every file under `root` that `.funcignore` lets through (what `func` uploads)."""
    ignore_file = root / ".funcignore"
    rules = parse_ignore(ignore_file.read_text()) if ignore_file.is_file() else []
    found: list[str] = []

    def walk(directory: Path, prefix: str) -> None:
        for entry in sorted(directory.iterdir()):
            relative = f"{prefix}{entry.name}"
            if entry.is_symlink():
                continue  # could point anywhere on this machine: a key, a home folder
            if relative == ".git":
                continue  # the repository itself, whatever `.funcignore` says
            is_dir = entry.is_dir()
            if is_ignored(relative, is_dir, rules):
                continue
            if is_dir:
                walk(entry, relative + "/")
            elif entry.is_file():
                found.append(relative)

    walk(root, "")
    return found


def build(output: Path, root: Path = ROOT) -> list[str]:
    """Write the zip to `output` and return the paths it holds."""
    files = package_files(root)
    missing = [name for name in ("host.json", "requirements.txt") if name not in files]
    if missing:
        raise SystemExit(f"not a Functions app root (missing {', '.join(missing)}): {root}")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".tmp")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for relative in files:
            info = zipfile.ZipInfo(relative, _FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, (root / relative).read_bytes())
    partial.replace(output)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.package", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("output", type=Path, help="where to write the zip")
    parser.add_argument("--root", type=Path, default=ROOT, help="the app's folder")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files = build(args.output, root)
    print(f"{args.output}: {len(files)} files")
    left_out = untracked_files(root)
    if left_out:
        shown = ", ".join(left_out[:10]) + (", ..." if len(left_out) > 10 else "")
        print(f"left out, not tracked by git ({len(left_out)}): {shown} (git add what belongs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
