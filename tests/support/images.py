"""Small test images built in memory, and helpers to read their pixels."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def two_halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


JPEG = encode(two_halves(64, 48), "JPEG", quality=95)
PNG = encode(Image.new("RGB", (30, 20), (0, 200, 0)), "PNG")
# A real image whose pixel count is over a lowered bomb limit; compresses to a few KB.
BIG_DIMENSIONS_PNG = encode(Image.new("L", (2000, 1500), 0), "PNG")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` with almost no data (a bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return (value[0], value[1], value[2])


def dominant(rgb: tuple[int, int, int]) -> int:
    return int(np.argmax(rgb))
