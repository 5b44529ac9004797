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
- decoding runs off the event loop (`processors.image_decoding`: a pixel limit
  against decompression bombs, a short list of image formats, EXIF orientation
  applied and every mode normalized to RGB).

The limits themselves are `processors.gather_limits.GatherLimits` (re-exported here).

Every failure is a `ProcessingError` with an `IMAGE_*` code and stage "gather";
messages name the URL without its query string or credentials and never include
base64 payloads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image
from yarl import URL

from processors.addresses import address_refusal, non_canonical_ipv4
from processors.errors import ErrorCode, Failure, ProcessingError, failure_from_exception
from processors.gather_limits import DEFAULT_IMAGE_FORMATS, MIB, GatherLimits
from processors.image_decoding import STAGE, decode_base64_image, decode_image
from processors.records import MAX_IMAGES_PER_KIND, PickupRequest

Resolver = Callable[[str], Awaitable[Sequence[str]]]
"""Resolves a host name to IP address strings (IPv4 or IPv6); raises OSError on failure."""

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_USER_AGENT = "visionstream-gatherer/1"


@dataclass(frozen=True)
class GatheredImages:
    """The decoded images of one request, vendor (reference) first, then pickup."""

    vendor: tuple[Image.Image, ...]
    pickup: tuple[Image.Image, ...]
    gather_ms: float


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
        """The limits every fetch and decode of this gatherer applies."""
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
        return await asyncio.to_thread(decode_base64_image, source, self._limits)

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
    "MIB",
    "GatherLimits",
    "GatheredImages",
    "ImageGatherer",
    "Resolver",
    "address_refusal",
    "decode_image",
    "redact_url",
]
