"""Decoding image bytes: orientation, modes, formats and the pixel limit (pure, no I/O)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from processors.errors import ErrorCode, ProcessingError
from processors.gather_limits import GatherLimits
from processors.image_decoding import decode_base64, decode_image
from tests.support.images import BIG_DIMENSIONS_PNG, PNG, dominant, encode, pixel, two_halves


def test_exif_orientation_is_applied() -> None:
    # Stored 40x20 (left red, right blue) with orientation 6 ("rotate 90 CW to view"):
    # displayed 20x40 with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(two_halves(40, 20), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data, GatherLimits())
    assert image.size == (20, 40)
    assert dominant(pixel(image, (10, 5))) == 0
    assert dominant(pixel(image, (10, 35))) == 2


def test_cmyk_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    image = decode_image(data, GatherLimits())
    assert image.mode == "RGB"
    red, green, blue = pixel(image, (8, 8))
    assert red > 230 and green < 30 and blue < 30


def test_palette_transparency_composited_on_white() -> None:
    palette_image = Image.new("P", (10, 10), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    palette_image.paste(1, (5, 0, 10, 10))
    data = encode(palette_image, "PNG", transparency=0)
    image = decode_image(data, GatherLimits())
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 255, 255)  # transparent index -> white, not black
    assert image.getpixel((8, 8)) == (255, 0, 0)


def test_rgba_and_la_alpha_composited_on_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 128))
    rgba.paste((0, 0, 0, 0), (5, 0, 10, 10))
    image = decode_image(encode(rgba, "PNG"), GatherLimits())
    red, green, blue = pixel(image, (1, 1))
    assert red == 255 and abs(green - 127) <= 1 and abs(blue - 127) <= 1
    assert image.getpixel((8, 8)) == (255, 255, 255)
    la = decode_image(encode(Image.new("LA", (4, 4), (0, 0)), "PNG"), GatherLimits())
    assert la.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.full((8, 8), 32768, dtype=np.uint16)
    values[:, 4:] = 65535
    data = encode(Image.fromarray(values), "PNG")
    image = decode_image(data, GatherLimits())
    assert image.mode == "RGB"
    assert abs(pixel(image, (1, 1))[0] - 128) <= 1
    assert image.getpixel((6, 6)) == (255, 255, 255)


def test_formats_outside_the_list_are_refused() -> None:
    data = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PPM")
    with pytest.raises(ProcessingError) as caught:
        decode_image(data, GatherLimits())
    assert caught.value.code == ErrorCode.IMAGE_DECODE_FAILED
    assert decode_image(data, GatherLimits(image_formats=("PPM",))).getpixel((0, 0)) == (1, 2, 3)
    # A format this Pillow build lacks is skipped instead of breaking every decode.
    assert decode_image(PNG, GatherLimits(image_formats=("NOSUCH", "PNG"))).size == (30, 20)


def test_bomb_limit_does_not_touch_pillow_global() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ProcessingError) as caught:
        decode_image(BIG_DIMENSIONS_PNG, GatherLimits(max_pixels=1_000_000))
    assert caught.value.code == ErrorCode.IMAGE_TOO_LARGE
    assert before == Image.MAX_IMAGE_PIXELS
    assert decode_image(BIG_DIMENSIONS_PNG, GatherLimits()).size == (2000, 1500)


def test_base64_in_either_alphabet_with_or_without_padding_gives_the_same_bytes() -> None:
    limits = GatherLimits()
    plain = base64.b64encode(PNG).decode()
    urlsafe = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    wrapped = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))
    for source in (plain, urlsafe, wrapped, f"data:image/png;base64,{plain}"):
        assert decode_base64(source, limits) == PNG


def test_base64_over_the_byte_limit_is_refused_before_decoding() -> None:
    payload = base64.b64encode(b"\x00" * 200).decode()
    with pytest.raises(ProcessingError) as caught:
        decode_base64(payload, GatherLimits(max_image_bytes=100))
    assert caught.value.code is ErrorCode.IMAGE_TOO_LARGE
    assert payload not in caught.value.message
