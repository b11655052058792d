"""`make teams-package`: the manifest template, filled, matches Microsoft's official schema
(from the npm package `make setup` installs, never fetched), the icons are what Teams asks
for, and bad parameters or a broken manifest produce an error and no zip."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

from tools import make_icons, teams_package
from tools.teams_package import PackageError

ROOT = Path(__file__).resolve().parents[2]
BOT_ID = "6f1c2a7e-3b0d-4c55-9a1e-2d8f0b7c4e11"
DOMAIN = "func-echobot-ab12cd34.azurewebsites.net"


def values() -> dict[str, str]:
    return teams_package.parameters(BOT_ID, DOMAIN)


def newest_stable_schema() -> str:
    versions = [p.name[1:] for p in teams_package.SCHEMAS.glob("v1.*")]
    return max(versions, key=lambda v: tuple(int(part) for part in v.split(".")))


def test_the_schemas_are_installed_locally() -> None:
    assert (teams_package.SCHEMAS / "v1.5" / "MicrosoftTeams.schema.json").is_file(), (
        "run `make setup`: it installs @microsoft/app-manifest"
    )


def test_the_manifest_uses_the_newest_schema_the_package_has() -> None:
    template = json.loads((ROOT / "appPackage" / "manifest.json").read_text())
    version = newest_stable_schema()
    assert template["manifestVersion"] == version
    assert template["$schema"].endswith(f"/v{version}/MicrosoftTeams.schema.json")


def test_the_package_holds_a_valid_manifest_and_the_icons(tmp_path: Path) -> None:
    output = tmp_path / "teams-app.zip"
    teams_package.build(output, values())
    with zipfile.ZipFile(output) as archive:
        assert sorted(archive.namelist()) == ["color.png", "manifest.json", "outline.png"]
        manifest = json.loads(archive.read("manifest.json"))
        color, outline = archive.read("color.png"), archive.read("outline.png")
    teams_package.validate(manifest)  # the official schema, again, on what was zipped
    (bot,) = manifest["bots"]
    assert bot["botId"] == BOT_ID
    assert sorted(bot["scopes"]) == ["groupChat", "personal", "team"]
    assert bot["supportsFiles"] is False
    assert manifest["id"] == BOT_ID
    assert manifest["validDomains"] == [DOMAIN]
    assert "${{" not in json.dumps(manifest)
    assert teams_package.png_size(color) == (192, 192)
    assert teams_package.png_size(outline) == (32, 32)


def pixels(png: bytes) -> list[tuple[int, int, int, int]]:
    """RGBA pixels of an 8-bit RGBA PNG whose rows use filter 0 (what tools/make_icons writes)."""
    width, height, depth, color_type = struct.unpack(">IIBB", png[16:26])
    assert (depth, color_type) == (8, 6), "expected 8-bit RGBA"
    data, offset = b"", 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        if png[offset + 4 : offset + 8] == b"IDAT":
            data += png[offset + 8 : offset + 8 + length]
        offset += 12 + length
    raw = zlib.decompress(data)
    stride = width * 4 + 1
    found = []
    for row in range(height):
        line = raw[row * stride : (row + 1) * stride]
        assert line[0] == 0, "expected filter 0"
        found.extend(struct.iter_unpack("4B", line[1:]))
    return found


def test_the_outline_icon_is_white_on_transparent() -> None:
    found = pixels((ROOT / "appPackage" / "outline.png").read_bytes())
    assert {p for p in found if p[3] != 0} <= {(255, 255, 255, 255)}
    assert any(p[3] == 0 for p in found) and any(p[3] == 255 for p in found)


def test_the_committed_icons_are_what_the_generator_draws(tmp_path: Path) -> None:
    make_icons.main(tmp_path)
    for name in ("color.png", "outline.png"):
        assert (tmp_path / name).read_bytes() == (ROOT / "appPackage" / name).read_bytes()


def test_the_color_icon_is_opaque() -> None:
    found = pixels((ROOT / "appPackage" / "color.png").read_bytes())
    assert all(p[3] == 255 for p in found)


def test_a_manifest_missing_a_required_field_is_rejected(tmp_path: Path) -> None:
    package = tmp_path / "appPackage"
    shutil.copytree(ROOT / "appPackage", package)
    manifest = json.loads((package / "manifest.json").read_text())
    del manifest["developer"]
    (package / "manifest.json").write_text(json.dumps(manifest))
    output = tmp_path / "teams-app.zip"
    with pytest.raises(PackageError, match="'developer' is a required property"):
        teams_package.build(output, values(), package)
    assert not output.exists()


def test_a_manifest_with_a_bot_that_supports_files_wrongly_typed_is_rejected() -> None:
    manifest = teams_package.fill(
        json.loads((ROOT / "appPackage" / "manifest.json").read_text()), values()
    )
    manifest["bots"][0]["supportsFiles"] = "no"
    with pytest.raises(PackageError, match="bots/0/supportsFiles"):
        teams_package.validate(manifest)


def test_a_wrong_sized_icon_is_rejected(tmp_path: Path) -> None:
    package = tmp_path / "appPackage"
    shutil.copytree(ROOT / "appPackage", package)
    shutil.copy(package / "outline.png", package / "color.png")
    with pytest.raises(PackageError, match="color icon must be 192x192"):
        teams_package.build(tmp_path / "teams-app.zip", values(), package)


@pytest.mark.parametrize(
    ("bot_id", "domain", "message"),
    [
        ("", DOMAIN, "--bot-id"),
        ("not-a-guid", DOMAIN, "--bot-id"),
        (BOT_ID, "", "--domain"),
        (BOT_ID, "https://" + DOMAIN, "--domain"),
        (BOT_ID, DOMAIN + "/api/messages", "--domain"),
    ],
)
def test_bad_parameters_are_refused(bot_id: str, domain: str, message: str) -> None:
    with pytest.raises(PackageError, match=re.escape(message)):
        teams_package.parameters(bot_id, domain)


def test_an_unknown_placeholder_is_refused() -> None:
    with pytest.raises(PackageError, match=r"unknown placeholder \$\{\{NOPE\}\}"):
        teams_package.fill({"a": ["x ${{NOPE}}"]}, values())


def test_the_command_fails_clearly_without_a_bot_id(tmp_path: Path) -> None:
    output = tmp_path / "teams-app.zip"
    result = subprocess.run(
        [sys.executable, "-m", "tools.teams_package", "--domain", DOMAIN, str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--bot-id must be the bot's app id" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_an_output_that_cannot_be_a_zip_is_one_line(tmp_path: Path, where: str) -> None:
    # A folder as the output was an IsADirectoryError traceback.
    (tmp_path / "file").write_text("")
    output = tmp_path if where == "a folder" else tmp_path / "file" / "teams-app.zip"
    command = ["tools.teams_package", "--bot-id", BOT_ID, "--domain", DOMAIN, str(output)]
    result = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    expected = (
        f"{output} is a folder: give the zip's file name, e.g. {output / 'teams-app.zip'}"
        if where == "a folder"
        else f"cannot write {output}: File exists"
    )
    assert result.stderr.splitlines() == [f"teams-package: {expected}"]
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written
