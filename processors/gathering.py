"""Image gathering: turn the image references of a request into decoded RGB images.

The HTTP service this project replaces downloaded vendor
images with aiohttp and pickup images with blocking `requests` calls, checked only
the byte size and used one error code for everything. Here one shared aiohttp
session fetches every image of a micro-batch concurrently, under an explicit
policy:

- only http(s) URLs; every host (on every redirect hop) must resolve to public
  addresses unless `GatherLimits` allows loopback or private ones. The check runs
  inside the connector's resolver, so the connection goes to exactly the addresses
  that were checked (no second lookup an attacker's DNS could answer differently);
- bodies are streamed and cut off at `max_image_bytes`;
- 5xx answers, timeouts and connection errors are retried with exponential backoff
  inside one overall deadline; 4xx answers never are;
- decoding runs off the event loop, with a pixel limit against decompression bombs,
  a short list of image formats, EXIF orientation applied and every mode
  normalized to RGB.

Every failure is a `ProcessingError` with an `IMAGE_*` code and stage "gather";
messages name the URL without its query string or credentials and never include
base64 payloads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType
from typing import Self

import aiohttp
import numpy as np
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image, ImageOps
from yarl import URL

from processors.addresses import address_refusal, non_canonical_ipv4
from processors.errors import ErrorCode, Failure, ProcessingError, failure_from_exception
from processors.records import MAX_IMAGES_PER_KIND, PickupRequest

STAGE = "gather"

MIB = 1024 * 1024

Resolver = Callable[[str], Awaitable[Sequence[str]]]
"""Resolves a host name to IP address strings (IPv4 or IPv6); raises OSError on failure."""

# Formats customers' phones and vendors' CDNs actually produce. Pillow can open many
# more (EPS would even run Ghostscript), none of which an untrusted body should reach.
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_DATA_URL_RE = re.compile(r"^data:image/[A-Za-z0-9.+-]+(?:;[^,;]*)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_USER_AGENT = "visionstream-gatherer/1"


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


@dataclass(frozen=True)
class GatheredImages:
    """The decoded images of one request, vendor (reference) first, then pickup."""

    vendor: tuple[Image.Image, ...]
    pickup: tuple[Image.Image, ...]
    gather_ms: float


# --------------------------------------------------------------------------- decoding


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
                oriented = opened.copy()
            return _to_rgb(oriented)
    except ProcessingError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProcessingError(ErrorCode.IMAGE_TOO_LARGE, str(exc), STAGE) from exc
    except Image.UnidentifiedImageError as exc:
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


def _decode_base64(source: str, limits: GatherLimits) -> bytes:
    """Bytes of a base64 image (optionally a `data:image/...;base64,` URL)."""
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


def _decode_base64_image(source: str, limits: GatherLimits) -> Image.Image:
    return decode_image(_decode_base64(source, limits), limits)


# --------------------------------------------------------------------------- address policy


def redact_url(url: URL | str) -> str:
    """The URL as it may appear in messages: no credentials, query or fragment; bounded."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        text = str(parsed.with_user(None).with_query(None).with_fragment(None))
        if parsed.query_string:
            text += "?…"
    except (ValueError, TypeError):
        text = str(url).split("?", 1)[0].split("#", 1)[0]
    return text if len(text) <= 200 else text[:199] + "…"


class _AddressRefusedError(OSError):
    """Raised inside the connector's resolver; an OSError so aiohttp wraps and passes it on."""


async def _system_resolve(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


class _PolicyResolver(AbstractResolver):
    """aiohttp resolver that refuses hosts with any disallowed address.

    Because aiohttp connects to what this returns, the address that passed the policy
    is the address connected to.
    """

    def __init__(self, resolve: Resolver, limits: GatherLimits) -> None:
        self._resolve = resolve
        self._limits = limits

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = list(dict.fromkeys(await self._resolve(host)))
        if not addresses:
            raise OSError(f"{host} resolved to no address")
        results: list[ResolveResult] = []
        for address in addresses:
            reason = address_refusal(address, self._limits)
            if reason is not None:
                # One bad address refuses the host: the connector could pick any of them.
                raise _AddressRefusedError(f"host {host} resolves to {address} ({reason})")
            ip = ipaddress.ip_address(address)
            results.append(
                {
                    "hostname": host,
                    "host": str(ip),
                    "port": port,
                    "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                    "proto": socket.IPPROTO_TCP,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return results

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------- fetching


class _TransientError(Exception):
    """A failed attempt worth retrying; carries the error to raise if none is left."""

    def __init__(self, error: ProcessingError) -> None:
        super().__init__(error.message)
        self.error = error


class ImageGatherer:
    """Fetches and decodes the images of requests over one shared HTTP session.

    `__init__` only records configuration; `start()` opens the session and `close()`
    releases it (or use `async with`). Base64 sources decode without a session; URL
    sources need `start()` first, otherwise `RuntimeError`.
    """

    def __init__(self, limits: GatherLimits, *, resolver: Resolver | None = None) -> None:
        self._limits = limits
        self._resolve: Resolver = resolver or _system_resolve
        self._session: aiohttp.ClientSession | None = None

    @property
    def limits(self) -> GatherLimits:
        return self._limits

    async def start(self) -> None:
        """Open the shared session; idempotent."""
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit_per_host=self._limits.per_host_concurrency,
            resolver=_PolicyResolver(self._resolve, self._limits),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # The overall deadline is ours (see _download); aiohttp bounds connects only.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._limits.connect_timeout_s),
            # No cookies carried from one vendor's CDN to the next request.
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": _USER_AGENT},
            trust_env=False,
        )

    async def close(self) -> None:
        """Close the session; safe to call twice or without `start()`."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------------- one image

    async def fetch_image(self, source: str) -> Image.Image:
        """Fetch (or base64-decode) and decode one image; returns a loaded RGB image.

        `source` is an http(s) URL or base64, with or without a
        `data:image/<type>;base64,` prefix. Any other scheme is refused.

        Raises `ProcessingError` (stage "gather") with IMAGE_ADDRESS_REFUSED,
        IMAGE_DOWNLOAD_FAILED, IMAGE_TIMEOUT, IMAGE_TOO_LARGE, IMAGE_DECODE_FAILED or
        IMAGE_BASE64_INVALID.
        """
        source = source.strip()
        if not source:
            raise ProcessingError(ErrorCode.IMAGE_BASE64_INVALID, "image source is empty", STAGE)
        lowered = source[:8].lower()
        if lowered.startswith(("http://", "https://")):
            data = await self._download(self._rewrite(source))
            return await asyncio.to_thread(decode_image, data, self._limits)
        if _SCHEME_RE.match(source) and not lowered.startswith("data:"):
            # "file://...", "ftp://...", "https:/x"; base64 has no ':' so cannot match.
            scheme = source.split(":", 1)[0].lower()
            reason = (
                "malformed URL"
                if scheme in ("http", "https")
                else f"only http and https URLs are fetched, not {scheme!r}"
            )
            raise ProcessingError(ErrorCode.IMAGE_ADDRESS_REFUSED, reason, STAGE)
        return await asyncio.to_thread(_decode_base64_image, source, self._limits)

    def _rewrite(self, source: str) -> str:
        for prefix, replacement in self._limits.url_rewrites:
            if source.startswith(prefix):
                return replacement + source[len(prefix) :]
        return source

    def _parse_and_check(self, raw: str | URL) -> URL:
        """Parse a URL and refuse it by scheme or IP literal; host names are checked on connect."""
        try:
            url = raw if isinstance(raw, URL) else URL(raw)
            host = url.host
        except (ValueError, TypeError):
            raise ProcessingError(
                ErrorCode.IMAGE_ADDRESS_REFUSED, f"not a valid URL: {redact_url(raw)}", STAGE
            ) from None
        if url.scheme not in ("http", "https"):
            raise ProcessingError(
                ErrorCode.IMAGE_ADDRESS_REFUSED,
                f"only http and https URLs are fetched, not {url.scheme!r}: {redact_url(url)}",
                STAGE,
            )
        if not host:
            raise ProcessingError(
                ErrorCode.IMAGE_ADDRESS_REFUSED, f"URL has no host: {redact_url(url)}", STAGE
            )
        literal = host.strip("[]")
        if non_canonical_ipv4(literal):
            raise ProcessingError(
                ErrorCode.IMAGE_ADDRESS_REFUSED,
                f"{redact_url(url)}: {literal!r} is an IPv4 address in a non-canonical "
                "spelling (write it as a dotted quad)",
                STAGE,
            )
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return url  # a host name: `_PolicyResolver` judges it when connecting
        # aiohttp skips the resolver for IP literals, so they are judged here.
        reason = address_refusal(literal, self._limits)
        if reason is not None:
            raise ProcessingError(
                ErrorCode.IMAGE_ADDRESS_REFUSED, f"{redact_url(url)} points to a {reason}", STAGE
            )
        return url

    async def _download(self, source: str) -> bytes:
        """Body bytes of `source`, with retries inside one overall deadline."""
        if self._session is None:
            raise RuntimeError("ImageGatherer.start() must be called before fetching URLs")
        url = self._parse_and_check(source)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._limits.total_timeout_s
        attempt = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._download_once(self._session, url)
            except _TransientError as exc:
                error = exc.error
            except TimeoutError:
                # The overall deadline, or aiohttp's per-connect timeout.
                error = ProcessingError(
                    ErrorCode.IMAGE_TIMEOUT,
                    f"{redact_url(url)} timed out (connect {self._limits.connect_timeout_s} s, "
                    f"total {self._limits.total_timeout_s} s)",
                    STAGE,
                )
            delay = self._limits.backoff_s * (2**attempt)
            if attempt >= self._limits.retries or loop.time() + delay >= deadline:
                if attempt:
                    raise ProcessingError(
                        error.code, f"{error.message} (after {attempt + 1} attempts)", STAGE
                    )
                raise error
            attempt += 1
            await asyncio.sleep(delay)

    async def _download_once(self, session: aiohttp.ClientSession, url: URL) -> bytes:
        """One attempt: follow up to `max_redirects` redirects, checking every hop."""
        for _hop in range(self._limits.max_redirects + 1):
            try:
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in _REDIRECT_STATUSES:
                        url = self._next_hop(url, response)
                        continue
                    self._check_status(url, response)
                    return await self._read_body(url, response)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, _AddressRefusedError):
                    raise ProcessingError(
                        ErrorCode.IMAGE_ADDRESS_REFUSED,
                        f"{redact_url(url)}: {exc.os_error}",
                        STAGE,
                    ) from None
                raise _TransientError(self._connection_error(url, exc)) from exc
            except aiohttp.ServerTimeoutError:
                raise  # a TimeoutError: handled (and retried) by _download
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                raise _TransientError(self._connection_error(url, exc)) from exc
            except aiohttp.ClientError as exc:
                raise ProcessingError(
                    ErrorCode.IMAGE_DOWNLOAD_FAILED,
                    f"{redact_url(url)}: {type(exc).__name__}",
                    STAGE,
                ) from exc
        raise ProcessingError(
            ErrorCode.IMAGE_DOWNLOAD_FAILED,
            f"more than {self._limits.max_redirects} redirects, last to {redact_url(url)}",
            STAGE,
        )

    def _next_hop(self, url: URL, response: aiohttp.ClientResponse) -> URL:
        location = response.headers.get("Location")
        if not location:
            raise ProcessingError(
                ErrorCode.IMAGE_DOWNLOAD_FAILED,
                f"{redact_url(url)} answered {response.status} without a Location",
                STAGE,
            )
        try:
            target = url.join(URL(location))
        except (ValueError, TypeError):
            raise ProcessingError(
                ErrorCode.IMAGE_ADDRESS_REFUSED,
                f"{redact_url(url)} redirects to an invalid URL",
                STAGE,
            ) from None
        return self._parse_and_check(target)

    @staticmethod
    def _check_status(url: URL, response: aiohttp.ClientResponse) -> None:
        status = response.status
        if 200 <= status < 300:
            return
        error = ProcessingError(
            ErrorCode.IMAGE_DOWNLOAD_FAILED,
            f"{redact_url(url)} answered HTTP {status}",
            STAGE,
        )
        if status >= 500:
            raise _TransientError(error)
        raise error

    async def _read_body(self, url: URL, response: aiohttp.ClientResponse) -> bytes:
        limit = self._limits.max_image_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise ProcessingError(
                ErrorCode.IMAGE_TOO_LARGE,
                f"{redact_url(url)} declares {declared} bytes, over the limit of {limit}",
                STAGE,
            )
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                # Leaving the `async with` closes the connection; the rest is never read.
                raise ProcessingError(
                    ErrorCode.IMAGE_TOO_LARGE,
                    f"{redact_url(url)} sent more than the limit of {limit} bytes",
                    STAGE,
                )
        return bytes(body)

    @staticmethod
    def _connection_error(url: URL, exc: BaseException) -> ProcessingError:
        detail = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
        reason = str(detail) or type(detail).__name__
        # aiohttp messages can repeat the full URL; keep only what names the cause.
        reason = reason.replace(str(url), redact_url(url))[:300]
        return ProcessingError(
            ErrorCode.IMAGE_DOWNLOAD_FAILED,
            f"{redact_url(url)}: connection failed: {reason}",
            STAGE,
        )

    # ----------------------------------------------------------------------- requests

    async def gather_request(self, request: PickupRequest) -> GatheredImages:
        """Fetch the vendor (`pickupproductimage`) and pickup (`skupickdone`) images.

        Needs 1-10 images of each kind and at most `max_images_per_request` in all,
        otherwise INVALID_REQUEST. All images are fetched concurrently; the first
        failing image (in request order) is raised, its message prefixed with which
        image it was.
        """
        return await self._gather_one(request, {})

    async def gather_batch(
        self, requests: Sequence[PickupRequest]
    ) -> list[GatheredImages | Failure]:
        """Gather every request of a micro-batch concurrently, one result per request.

        A failing request yields a `Failure` in its slot and never affects the others.
        A source that appears several times in the batch is fetched once and its
        image shared (images are treated as read-only downstream).
        """
        shared: dict[str, asyncio.Task[Image.Image]] = {}
        try:
            results = await asyncio.gather(
                *(self._gather_one(request, shared) for request in requests),
                return_exceptions=True,
            )
        finally:
            for task in shared.values():
                task.cancel()
        gathered: list[GatheredImages | Failure] = []
        for result in results:
            if isinstance(result, GatheredImages):
                gathered.append(result)
            elif isinstance(result, Exception | asyncio.CancelledError):
                gathered.append(failure_from_exception(result, STAGE))
            else:
                raise result  # KeyboardInterrupt and the like are not per-request failures
        return gathered

    async def _gather_one(
        self, request: PickupRequest, shared: dict[str, asyncio.Task[Image.Image]]
    ) -> GatheredImages:
        started = time.perf_counter()
        vendor_sources, pickup_sources = request.pickupproductimage, request.skupickdone
        self._check_counts(len(vendor_sources), len(pickup_sources))
        labelled = [("vendor", i, s) for i, s in enumerate(vendor_sources)] + [
            ("pickup", i, s) for i, s in enumerate(pickup_sources)
        ]
        tasks = [self._shared_fetch(source, shared) for _, _, source in labelled]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        images: list[Image.Image] = []
        for (kind, index, _), result in zip(labelled, results, strict=True):
            if isinstance(result, BaseException):
                raise _label(result, kind, index)
            images.append(result)
        return GatheredImages(
            vendor=tuple(images[: len(vendor_sources)]),
            pickup=tuple(images[len(vendor_sources) :]),
            gather_ms=(time.perf_counter() - started) * 1000.0,
        )

    def _shared_fetch(
        self, source: str, shared: dict[str, asyncio.Task[Image.Image]]
    ) -> asyncio.Task[Image.Image]:
        task = shared.get(source)
        if task is None:
            task = asyncio.ensure_future(self.fetch_image(source))
            shared[source] = task
        return task

    def _check_counts(self, vendor: int, pickup: int) -> None:
        for kind, count in (("pickupproductimage", vendor), ("skupickdone", pickup)):
            if not 1 <= count <= MAX_IMAGES_PER_KIND:
                raise ProcessingError(
                    ErrorCode.INVALID_REQUEST,
                    f"{kind} needs 1-{MAX_IMAGES_PER_KIND} images, got {count}",
                    STAGE,
                )
        if vendor + pickup > self._limits.max_images_per_request:
            raise ProcessingError(
                ErrorCode.INVALID_REQUEST,
                f"{vendor + pickup} images, over the limit of "
                f"{self._limits.max_images_per_request} per request",
                STAGE,
            )


def _label(exc: BaseException, kind: str, index: int) -> BaseException:
    """Prefix a per-image error with which image it was; other exceptions pass unchanged."""
    if isinstance(exc, ProcessingError):
        return ProcessingError(exc.code, f"{kind} image {index + 1}: {exc.message}", STAGE)
    return exc


__all__ = [
    "DEFAULT_IMAGE_FORMATS",
    "GatherLimits",
    "GatheredImages",
    "ImageGatherer",
    "Resolver",
    "address_refusal",
    "decode_image",
    "redact_url",
]
