"""Build the Teams app package (the zip to upload in Teams) from appPackage/.

appPackage/manifest.json is a template: `${{NAME}}` placeholders are filled from the
options below, then the manifest is checked against its JSON schema (from the
`@microsoft/app-manifest` npm package `make setup` installs; never fetched) and zipped
with the two icons.

    python -m tools.teams_package --bot-id GUID --domain HOST dist/teams-app.zip
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGE = ROOT / "appPackage"
SCHEMAS = ROOT / ".tools/app-manifest/node_modules/@microsoft/app-manifest/build/json-schemas/teams"
ICONS = {"color": (192, 192), "outline": (32, 32)}
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_HOST = re.compile(r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
_PLACEHOLDER = re.compile(r"\$\{\{([A-Z_]+)\}\}")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class PackageError(Exception):
    """A parameter or the manifest is not valid; the message says which."""


def parameters(
    bot_id: str,
    domain: str,
    app_id: str = "",
    developer: str = "",
    website: str = "",
    privacy: str = "",
    terms: str = "",
) -> dict[str, str]:
    """The template's values, validated. The Teams app id defaults to the bot id."""
    bot_id, domain, app_id = bot_id.strip(), domain.strip().lower(), app_id.strip()
    if not _GUID.fullmatch(bot_id):
        raise PackageError("--bot-id must be the bot's app id, a GUID (BOT_ID=...)")
    if not _HOST.fullmatch(domain):
        raise PackageError(
            "--domain must be the app's host name without scheme or path, "
            "e.g. func-bot-abc.azurewebsites.net (BOT_DOMAIN=...)"
        )
    if app_id and not _GUID.fullmatch(app_id):
        raise PackageError("--app-id must be a GUID")
    home = f"https://{domain}/"
    values = {
        "BOT_ID": bot_id,
        "BOT_DOMAIN": domain,
        "TEAMS_APP_ID": app_id or bot_id,
        "DEVELOPER_NAME": developer.strip() or "Echo bot developer",
        "WEBSITE_URL": website.strip() or home,
        "PRIVACY_URL": privacy.strip() or home,
        "TERMS_URL": terms.strip() or home,
    }
    for name in ("WEBSITE_URL", "PRIVACY_URL", "TERMS_URL"):
        if not values[name].startswith("https://"):
            raise PackageError(f"{name.lower().replace('_', ' ')} must be an https URL")
    return values


def fill(template: Any, values: dict[str, str]) -> Any:
    """The template with every `${{NAME}}` replaced; an unknown NAME is an error."""
    if isinstance(template, dict):
        return {key: fill(value, values) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(item, values) for item in template]
    if isinstance(template, str):

        def replace(match: re.Match[str]) -> str:
            if match.group(1) not in values:
                raise PackageError(f"the manifest uses an unknown placeholder {match.group(0)}")
            return values[match.group(1)]

        return _PLACEHOLDER.sub(replace, template)
    return template


def schema_path(manifest: dict[str, Any], schemas: Path = SCHEMAS) -> Path:
    path = schemas / f"v{manifest.get('manifestVersion', '')}" / "MicrosoftTeams.schema.json"
    if not path.is_file():
        raise PackageError(f"no schema for manifestVersion {manifest.get('manifestVersion')!r}")
    return path


def validate(manifest: dict[str, Any], schemas: Path = SCHEMAS) -> None:
    """Raise PackageError listing what the official schema rejects."""
    import jsonschema

    schema = json.loads(schema_path(manifest, schemas).read_text(encoding="utf-8-sig"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(manifest), key=lambda error: list(error.path))
    if errors:
        lines = [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:10]]
        raise PackageError("the manifest does not match its schema:\n  " + "\n  ".join(lines))


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise PackageError("an icon is not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def build(output: Path, values: dict[str, str], app_package: Path = APP_PACKAGE) -> dict:
    """Write the zip (manifest.json + icons at its root) and return the filled manifest."""
    template = json.loads((app_package / "manifest.json").read_text(encoding="utf-8"))
    manifest = fill(template, values)
    validate(manifest)
    files = {"manifest.json": json.dumps(manifest, indent=2).encode() + b"\n"}
    for kind, size in ICONS.items():
        name = manifest["icons"][kind]
        data = (app_package / name).read_bytes()
        if png_size(data) != size:
            raise PackageError(f"the {kind} icon must be {size[0]}x{size[1]}")
        files[name] = data
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, _FIXED_TIME), data)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.teams_package", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--bot-id", default="", help="the bot's app id (deployment output botAppId)"
    )
    parser.add_argument("--domain", default="", help="the function app's host name")
    parser.add_argument("--app-id", default="", help="Teams app id (default: the bot id)")
    parser.add_argument("--developer", default="", help="developer name shown in Teams")
    parser.add_argument("--website", default="", help="https URL (default: the app's host)")
    parser.add_argument("--privacy", default="", help="https URL of the privacy statement")
    parser.add_argument("--terms", default="", help="https URL of the terms of use")
    args = parser.parse_args(argv)
    try:
        values = parameters(
            args.bot_id,
            args.domain,
            args.app_id,
            args.developer,
            args.website,
            args.privacy,
            args.terms,
        )
        if args.output.is_dir():
            raise PackageError(
                f"{args.output} is a folder: give the zip's file name, e.g. "
                f"{args.output / 'teams-app.zip'}"
            )
        try:
            build(args.output, values)
        except OSError as error:  # a parent that is a file, no permission, a full disk
            raise PackageError(
                f"cannot write {args.output}: {error.strerror or type(error).__name__}"
            ) from None
    except PackageError as error:
        print(f"teams-package: {error}", file=sys.stderr)
        return 2
    print(f"{args.output}: manifest.json, {', '.join(ICONS)} icons")
    return 0


if __name__ == "__main__":
    sys.exit(main())
