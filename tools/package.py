"""Build the deployable zip: the app's files, minus what `.funcignore` excludes.

This is what `func azure functionapp publish` uploads (it reads `.funcignore` the same way,
with .gitignore rules), so the zip can also go to a zip deploy. Entries are sorted and
carry a fixed timestamp: the same tree always gives the same bytes.

    python -m tools.package dist/functionapp.zip
"""

from __future__ import annotations

import argparse
import fnmatch
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
    ignore_file = root / ".funcignore"
    rules = parse_ignore(ignore_file.read_text()) if ignore_file.is_file() else []
    found: list[str] = []

    def walk(directory: Path, prefix: str) -> None:
        for entry in sorted(directory.iterdir()):
            relative = f"{prefix}{entry.name}"
            if entry.is_symlink():
                continue  # could point anywhere on this machine: a key, a home folder
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
    files = build(args.output, args.root.resolve())
    print(f"{args.output}: {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
