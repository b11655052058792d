"""Build the deployable zip: the app's files, minus what `.funcignore` excludes.

This is what `func azure functionapp publish` uploads (it reads `.funcignore` the same way,
with .gitignore rules), so the zip can also go to a zip deploy. In a git work tree only
files git tracks go in, and a file git neither tracks nor ignores stops the build (a
module not added yet would be missing on Azure; a stray settings backup may hold a
secret, which `func` would upload) unless `--allow-untracked` leaves such files out.
Entries are sorted and carry a fixed timestamp: the same tree always gives the same bytes.

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
# Files that hold settings and their secrets, and copies an editor or a hand left beside
# them, at any depth, in any case: never packed, whatever `.funcignore` says (a copy
# outside git packs every file it lets through). `.funcignore` names them too.
NEVER_PACKED = (
    "*local.settings*",
    ".env",
    ".env.*",
    "*.env",
    "*.bak",
    "*.old",
    "*.orig",
    "*.save",
    "*~",
    "*.sw?",
    "#*#",
    ".#*",
)


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
    tracked = _tracked(root)
    return found if tracked is None else [name for name in found if name in tracked]


def untracked_files(root: Path = ROOT) -> list[str]:
    """The app's files git neither tracks nor ignores (none outside git): a file not added
    yet (in a nested repository too), or a stray one beside the app. Ignored files are
    left out without a word."""
    tracked = _tracked(root)
    if tracked is None:
        return []
    candidates = [name for name in app_files(root) if name not in tracked]
    if not candidates:
        return []
    # check-ignore answers 1 when none of them is ignored: not a failure.
    listed = _git(root, ["check-ignore", "-z", "--stdin"], "\0".join(candidates), ok=(0, 1))
    ignored = set(_names(listed or b""))
    return [name for name in candidates if name not in ignored]


def _tracked(root: Path) -> set[str] | None:
    """The files git tracks under `root` (a submodule's included), relative to it."""
    listed = _git(root, ["ls-files", "-z", "--cached", "--recurse-submodules"])
    return None if listed is None else set(_names(listed))


def _names(listed: bytes) -> list[str]:
    return [name for name in listed.decode("utf-8", "surrogateescape").split("\0") if name]


def _git(
    root: Path, args: list[str], stdin: str | None = None, ok: tuple[int, ...] = (0,)
) -> bytes | None:
    """git's output for `args` run in `root`; None when `root` is in no git work tree (a
    downloaded copy) or git is not installed. SystemExit when it is in one and git fails
    there (a repository another user owns, say): packing everything instead could take a
    stray secret along."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            input=stdin.encode("utf-8", "surrogateescape") if stdin is not None else None,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is not None and done.returncode in ok:
        return done.stdout
    if not any((folder / ".git").exists() for folder in (root, *root.parents)):
        return None
    reason = done.stderr.decode("utf-8", "replace").strip().splitlines() if done else []
    raise SystemExit(
        f"{root} is in a git work tree, but git could not list its files"
        + (f": {reason[0]}" if reason else " (is git installed?)")
    )


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
            if entry.name == ".git":
                continue  # a repository (a nested one's too), whatever `.funcignore` says
            is_dir = entry.is_dir()
            if is_ignored(relative, is_dir, rules):
                continue
            if not is_dir and any(
                fnmatch.fnmatchcase(entry.name.lower(), pattern) for pattern in NEVER_PACKED
            ):
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
    if missing and not [name for name in missing if name not in app_files(root)]:
        raise SystemExit(
            f"{root}: git tracks none of {', '.join(missing)} here (a folder the enclosing "
            "repository ignores, or files not added yet): add them, or package a copy "
            "outside the repository"
        )
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
    parser.add_argument(
        "--allow-untracked",
        action="store_true",
        help="build even when files git neither tracks nor ignores are beside the app",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    untracked = untracked_files(root)
    shown = ", ".join(untracked[:10]) + (", ..." if len(untracked) > 10 else "")
    if untracked and not args.allow_untracked:
        print(
            f"error: {len(untracked)} file(s) git neither tracks nor ignores: {shown}. "
            "git add what the app needs, delete or ignore the rest, or pass "
            "--allow-untracked to leave them out",
            file=sys.stderr,
        )
        return 1
    files = build(args.output, root)
    print(f"{args.output}: {len(files)} files")
    if untracked:
        print(f"left out, not tracked by git ({len(untracked)}): {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
