"""`GatherLimits`: the size, time, address and format limits of image gathering.

One frozen record shared by the downloader (`processors.gathering`), the decoder
(`processors.image_decoding`) and the review copies; built once from the settings.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024

# Formats customers' phones and vendors' CDNs actually produce. Pillow can open many
# more (EPS would even run Ghostscript), none of which an untrusted body should reach.
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


@dataclass(frozen=True)
class GatherLimits:
    """Limits and policy for fetching and decoding images.

    `total_timeout_s` bounds one `fetch_image` call as a whole: every redirect hop,
    retry and backoff sleep happens inside it. `connect_timeout_s` bounds each TCP
    (and TLS) connect. `retries` counts extra attempts after the first one.

    `url_rewrites` are (prefix, replacement) pairs applied to a source URL before
    anything else; the first matching prefix wins (the old service hard-coded an
    S3 to CDN rewrite). `max_pixels` is the decompression-bomb limit (width x height)
    applied to every decode, independently of Pillow's global `MAX_IMAGE_PIXELS`
    (which is neither read for this limit nor changed). `image_formats` are the Pillow
    format names tried when decoding; names this Pillow build lacks are skipped.
    `per_host_concurrency` bounds open connections per host; the connector's overall
    bound stays aiohttp's default (100).
    """

    max_image_bytes: int = 10 * MIB
    max_images_per_request: int = 20
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 20.0
    retries: int = 2
    backoff_s: float = 0.25
    per_host_concurrency: int = 8
    max_redirects: int = 3
    allow_loopback: bool = False
    allow_private: bool = False
    url_rewrites: tuple[tuple[str, str], ...] = ()
    max_pixels: int = 40_000_000
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS

    def __post_init__(self) -> None:
        positive = {
            "max_image_bytes": self.max_image_bytes,
            "max_images_per_request": self.max_images_per_request,
            "connect_timeout_s": self.connect_timeout_s,
            "total_timeout_s": self.total_timeout_s,
            "per_host_concurrency": self.per_host_concurrency,
            "max_pixels": self.max_pixels,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"GatherLimits.{name} must be positive, got {value}")
        if self.retries < 0 or self.backoff_s < 0 or self.max_redirects < 0:
            raise ValueError("GatherLimits.retries, backoff_s and max_redirects must be >= 0")
        if not self.image_formats:
            raise ValueError("GatherLimits.image_formats must name at least one format")
