"""Draw the Teams app icons once: appPackage/color.png and appPackage/outline.png.

Teams wants a full-colour 192x192 icon and a 32x32 outline icon that is white on a
transparent background. Both show a speech bubble. Pure Python (zlib + struct): the PNGs
are committed, this only documents how they were made.

    python -m tools.make_icons
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCENT = (47, 85, 151)  # the manifest's accentColor, #2F5597
WHITE = (255, 255, 255)
Pixel = tuple[int, int, int, int]


def png(width: int, height: int, pixel: Callable[[float, float], Pixel]) -> bytes:
    """An 8-bit RGBA PNG; `pixel(x, y)` gets the centre of each pixel in 0..1 units."""
    rows = bytearray()
    for row in range(height):
        rows.append(0)  # filter: none
        for column in range(width):
            rows.extend(pixel((column + 0.5) / width, (row + 0.5) / height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + chunk(b"IEND", b"")
    )


def in_bubble(x: float, y: float) -> bool:
    """A rounded speech bubble with a tail at the lower left, in 0..1 units."""
    left, top, right, bottom, radius = 0.18, 0.22, 0.82, 0.66, 0.12
    nearest_x = min(max(x, left + radius), right - radius)
    nearest_y = min(max(y, top + radius), bottom - radius)
    body = (x - nearest_x) ** 2 + (y - nearest_y) ** 2 <= radius**2
    # tail: triangle (0.30, 0.64) - (0.46, 0.64) - (0.26, 0.80)
    tail = 0.64 <= y <= 0.80 and 0.30 - (y - 0.64) * 0.25 <= x <= 0.46 - (y - 0.64) * 1.25
    return body or tail


def in_dots(x: float, y: float) -> bool:
    return any((x - cx) ** 2 + (y - 0.44) ** 2 <= 0.045**2 for cx in (0.36, 0.50, 0.64))


def color_pixel(x: float, y: float) -> Pixel:
    if in_bubble(x, y) and not in_dots(x, y):
        return (*WHITE, 255)
    return (*ACCENT, 255)


def outline_pixel(x: float, y: float) -> Pixel:
    return (*WHITE, 255) if in_bubble(x, y) and not in_dots(x, y) else (0, 0, 0, 0)


def main(folder: Path = ROOT / "appPackage") -> None:
    (folder / "color.png").write_bytes(png(192, 192, color_pixel))
    (folder / "outline.png").write_bytes(png(32, 32, outline_pixel))


if __name__ == "__main__":
    main()
