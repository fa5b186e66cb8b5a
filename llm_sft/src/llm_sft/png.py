"""A loss curve as a PNG without matplotlib: a small RGB canvas, lines, a 3x5 pixel font, zlib.

Used when matplotlib (the ``plot`` extra) is not installed, so ``llm-sft train`` always writes its
loss curve. PNG = signature + IHDR + IDAT (zlib of rows, each prefixed by filter byte 0) + IEND.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Color = tuple[int, int, int]
BLUE, ORANGE, GREY, BLACK = (
    (31, 119, 180),
    (255, 127, 14),
    (200, 200, 200),
    (40, 40, 40),
)

_FONT = {  # 3 x 5 glyphs, rows top to bottom
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"),
    "-": ("000", "000", "111", "000", "000"),
    "a": ("000", "011", "101", "101", "011"),
    "e": ("000", "111", "111", "100", "011"),
    "i": ("010", "000", "010", "010", "010"),
    "l": ("010", "010", "010", "010", "011"),
    "n": ("000", "110", "101", "101", "101"),
    "o": ("000", "010", "101", "101", "010"),
    "p": ("000", "110", "101", "110", "100"),
    "r": ("000", "101", "110", "100", "100"),
    "s": ("000", "011", "110", "011", "110"),
    "t": ("010", "111", "010", "010", "011"),
    "v": ("000", "101", "101", "101", "010"),
    " ": ("000",) * 5,
}


class Canvas:
    """An RGB image with a white background."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def dot(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.pixels[y][3 * x : 3 * x + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, width: int = 1) -> None:
        """Bresenham's line, thickened by drawing it ``width`` times one pixel apart."""
        for k in range(width):
            ax, ay, bx, by = x0, y0 + k, x1, y1 + k
            dx, dy = abs(bx - ax), -abs(by - ay)
            sx, sy = (1 if ax < bx else -1), (1 if ay < by else -1)
            err = dx + dy
            while True:
                self.dot(ax, ay, color)
                if ax == bx and ay == by:
                    break
                e2 = 2 * err
                if e2 >= dy:
                    err, ax = err + dy, ax + sx
                if e2 <= dx:
                    err, ay = err + dx, ay + sy

    def text(self, x: int, y: int, s: str, color: Color = BLACK, scale: int = 2) -> None:
        for i, ch in enumerate(s.lower()):
            for r, row in enumerate(_FONT.get(ch, _FONT[" "])):
                for c, bit in enumerate(row):
                    if bit == "1":
                        for u in range(scale):
                            for v in range(scale):
                                self.dot(
                                    x + (4 * i + c) * scale + u,
                                    y + r * scale + v,
                                    color,
                                )

    def save(self, path: str | Path) -> Path:
        raw = b"".join(b"\x00" + bytes(row) for row in self.pixels)  # filter type 0 per row

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        png = (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )
        path = Path(path)
        path.write_bytes(png)
        return path


def _fmt(v: float, steps: bool = False) -> str:
    if steps and float(v).is_integer():
        return str(int(v))
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]], Color]],
    path: str | Path,
    width: int = 640,
    height: int = 400,
) -> Path:
    """Draw ``(label, [(x, y), ...], color)`` series on shared axes and write a PNG.

    Example::

        line_chart([("train", [(1, 2.3), (2, 2.1)], BLUE)], "loss_curve.png")
    """
    points = [p for _, pts, _ in series for p in pts]
    if not points:
        raise ValueError("nothing to plot: no points")
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_hi = (
        (x_hi if x_hi > x_lo else x_lo + 1),
        (y_hi if y_hi > y_lo else y_lo + 1),
    )
    left, right, top, bottom = 70, width - 20, 30, height - 40
    img = Canvas(width, height)

    def px(x: float, y: float) -> tuple[int, int]:
        return (
            round(left + (x - x_lo) / (x_hi - x_lo) * (right - left)),
            round(bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)),
        )

    for k in range(5):  # horizontal grid and y labels
        y = y_lo + (y_hi - y_lo) * k / 4
        _, yy = px(x_lo, y)
        img.line(left, yy, right, yy, GREY)
        img.text(4, yy - 5, _fmt(y))
    img.line(left, top, left, bottom, BLACK)
    img.line(left, bottom, right, bottom, BLACK)
    img.text(left, bottom + 10, _fmt(x_lo, steps=True))
    img.text(right - 8 * len(_fmt(x_hi, steps=True)), bottom + 10, _fmt(x_hi, steps=True))
    img.text((left + right) // 2 - 16, bottom + 20, "step")
    for n, (label, pts, color) in enumerate(series):
        coords = [px(x, y) for x, y in pts]
        for (a, b), (c, d) in itertools.pairwise(coords):
            img.line(a, b, c, d, color, width=2)
        for a, b in coords if len(coords) < 60 else ():
            img.line(a - 2, b, a + 2, b, color, width=2)
        img.text(left + 10 + 90 * n, 8, label, color)  # legend
    return img.save(path)
