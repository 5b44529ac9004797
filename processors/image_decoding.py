"""Decoding untrusted image bytes (or base64) into loaded RGB images, within limits.

Pure functions, no I/O; run them off the event loop (they are CPU-bound). A pixel limit
guards against decompression bombs, only a short list of formats is tried, EXIF
orientation is applied and every mode is normalised to 8-bit RGB. Every failure is a
`ProcessingError` with an `IMAGE_*` code and stage "gather"; messages never include
the base64 payload.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from processors.errors import ErrorCode, ProcessingError
from processors.gather_limits import GatherLimits

STAGE = "gather"

log = logging.getLogger(__name__)

_DATA_URL_RE = re.compile(r"^data:image/[A-Za-z0-9.+-]+(?:;[^,;]*)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


def decode_image(data: bytes, limits: GatherLimits) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image.

    Only `limits.image_formats` are tried. EXIF orientation is applied (a malformed
    EXIF block is ignored rather than failing the image). Palette, grey, CMYK,
    16-bit and float images are converted to 8-bit RGB; transparency is composited
    on white. Multi-frame files yield their first frame.

    Raises `ProcessingError`: IMAGE_TOO_LARGE when width x height exceeds
    `limits.max_pixels` (or Pillow's own bomb check fires), IMAGE_DECODE_FAILED for
    anything Pillow cannot decode, including truncated files.
    """
    if not data:
        raise ProcessingError(ErrorCode.IMAGE_DECODE_FAILED, "image body is empty", STAGE)
    try:
        formats = _available_formats(limits.image_formats)
        with Image.open(io.BytesIO(data), formats=formats) as opened:
            # Only the header has been read: refuse bombs before any pixel is decoded.
            _check_pixels(opened.size, limits)
            opened.load()
            _check_pixels(opened.size, limits)
            try:
                oriented = ImageOps.exif_transpose(opened)
            except Exception:
                # A broken EXIF block must not cost a usable photo; keep it unrotated.
                log.debug("EXIF orientation unreadable; image kept unrotated", exc_info=True)
                oriented = opened.copy()
            return _to_rgb(oriented)
    except ProcessingError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProcessingError(ErrorCode.IMAGE_TOO_LARGE, str(exc), STAGE) from exc
    except UnidentifiedImageError as exc:
        raise ProcessingError(
            ErrorCode.IMAGE_DECODE_FAILED,
            f"bytes are not an image in an accepted format ({', '.join(limits.image_formats)})",
            STAGE,
        ) from exc
    except Exception as exc:
        # Pillow's decoders raise a wide variety of types on hostile input
        # (OSError, SyntaxError, ValueError, struct.error, EOFError, ...).
        raise ProcessingError(
            ErrorCode.IMAGE_DECODE_FAILED,
            f"cannot decode image: {type(exc).__name__}: {str(exc)[:300]}",
            STAGE,
        ) from exc


@lru_cache(maxsize=8)
def _available_formats(wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The wanted formats this Pillow build can open (Pillow raises KeyError for others)."""
    Image.init()
    return tuple(name for name in (w.upper() for w in wanted) if name in Image.OPEN)


def _check_pixels(size: tuple[int, int], limits: GatherLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ProcessingError(
            ErrorCode.IMAGE_DECODE_FAILED, f"image has no pixels ({width}x{height})", STAGE
        )
    if width * height > limits.max_pixels:
        raise ProcessingError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels}",
            STAGE,
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        image = _high_depth_to_l(image)
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grey images to 8 bits instead of clipping them."""
    values = np.asarray(image, dtype=np.float64)
    high = float(values.max()) if values.size else 0.0
    if image.mode == "F" and high <= 1.0:
        values = values * 255.0
    elif high > 255.0:
        values = values * (255.0 / max(high, 65535.0))
    return Image.fromarray(np.clip(values, 0.0, 255.0).astype(np.uint8), mode="L")


def decode_base64(source: str, limits: GatherLimits) -> bytes:
    """Bytes of a base64 image (optionally a `data:image/...;base64,` URL).

    Whitespace is ignored, both base64 alphabets are accepted and missing padding is
    added. Raises `ProcessingError`: IMAGE_BASE64_INVALID for a malformed payload or
    data URL, IMAGE_TOO_LARGE over `limits.max_image_bytes` (checked before decoding).
    """
    match = _DATA_URL_RE.match(source)
    payload = source[match.end() :] if match else source
    if not match and source[:5].lower() == "data:":
        raise ProcessingError(
            ErrorCode.IMAGE_BASE64_INVALID,
            "data URL is not of the form data:image/<type>;base64,<payload>",
            STAGE,
        )
    payload = _WHITESPACE.sub("", payload)
    if not payload:
        raise ProcessingError(ErrorCode.IMAGE_BASE64_INVALID, "base64 payload is empty", STAGE)
    # Refuse before decoding: 4 characters carry 3 bytes.
    if len(payload) // 4 * 3 > limits.max_image_bytes + 3:
        raise ProcessingError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"base64 image is over {limits.max_image_bytes} bytes",
            STAGE,
        )
    # Clients send both alphabets and often drop the padding.
    payload = payload.replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProcessingError(
            ErrorCode.IMAGE_BASE64_INVALID,
            f"image is neither an http(s) URL nor valid base64 ({len(source)} characters)",
            STAGE,
        ) from None
    if len(data) > limits.max_image_bytes:
        raise ProcessingError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"base64 image is {len(data)} bytes, over the limit of {limits.max_image_bytes}",
            STAGE,
        )
    return data


def decode_base64_image(source: str, limits: GatherLimits) -> Image.Image:
    """`decode_base64`, then `decode_image`; raises what either raises."""
    return decode_image(decode_base64(source, limits), limits)
