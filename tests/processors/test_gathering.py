"""Image gathering against a local aiohttp server: policy, limits, retries, decoding."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from processors.addresses import non_canonical_ipv4
from processors.errors import ErrorCode, Failure, ProcessingError
from processors.gathering import (
    GatheredImages,
    GatherLimits,
    ImageGatherer,
    address_refusal,
    redact_url,
)
from processors.records import PickupRequest
from tests.support.events import free_port
from tests.support.images import (
    BIG_DIMENSIONS_PNG,
    JPEG,
    PNG,
    dominant,
    encode,
    pixel,
    png_declaring,
)

# --------------------------------------------------------------------------------------
# Test images
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Local server and gatherer fixtures
# --------------------------------------------------------------------------------------


@dataclass
class Site:
    base: str
    hits: Counter[str] = field(default_factory=Counter)
    queries: dict[str, str] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


LIMIT = 200_000


async def _jpeg(_: web.Request) -> web.Response:
    return web.Response(body=JPEG, content_type="image/jpeg")


async def _png(_: web.Request) -> web.Response:
    return web.Response(body=PNG, content_type="image/png")


async def _slow(_: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.Response(body=PNG, content_type="image/png")


async def _missing(_: web.Request) -> web.Response:
    return web.Response(status=404, text="no such image")


async def _down(_: web.Request) -> web.Response:
    return web.Response(status=503, text="down")


async def _big_declared(request: web.Request) -> web.StreamResponse:
    # Declares more than the limit but sends little: only the header check can
    # refuse it as too large (reading would end in a truncated-body error).
    response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    response.content_length = LIMIT + 1
    await response.prepare(request)
    await response.write(b"\xff" * 1000)
    return response


async def _big_streamed(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()  # no Content-Length
    await response.prepare(request)
    try:
        for _ in range(50):
            await response.write(b"\xff" * 65536)
    except (ConnectionResetError, RuntimeError):
        pass  # the client hung up once over the limit, as it should
    return response


def _redirect_to(location: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": location})

    return handler


async def _loop(_: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/loop"})


async def _bomb(_: web.Request) -> web.Response:
    return web.Response(body=png_declaring(100_000, 100_000), content_type="image/png")


async def _big_dimensions(_: web.Request) -> web.Response:
    return web.Response(body=BIG_DIMENSIONS_PNG, content_type="image/png")


async def _truncated(_: web.Request) -> web.Response:
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), np.uint8))
    data = encode(noisy, "JPEG")
    return web.Response(body=data[: len(data) // 2], content_type="image/jpeg")


async def _garbage(_: web.Request) -> web.Response:
    return web.Response(body=b"<html>not an image</html>", content_type="image/jpeg")


# Routes whose answer does not depend on the site's counters.
_FIXED_ROUTES: tuple[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]], ...] = (
    ("/img.jpg", _jpeg),
    ("/img.png", _png),
    ("/cdn/{name}", _png),
    ("/slow", _slow),
    ("/missing", _missing),
    ("/down", _down),
    ("/big-declared", _big_declared),
    ("/big-streamed", _big_streamed),
    ("/to-metadata", _redirect_to("http://169.254.169.254/latest/meta-data")),
    ("/to-evil", _redirect_to("http://evil.test/img.png")),
    ("/to-relative", _redirect_to("/img.png")),
    ("/to-decimal-loopback", _redirect_to("http://2130706433/img.png")),
    ("/to-ftp", _redirect_to("ftp://example.com/img.png")),
    ("/loop", _loop),
    ("/bomb.png", _bomb),
    ("/big-dimensions.png", _big_dimensions),
    ("/truncated.jpg", _truncated),
    ("/garbage.jpg", _garbage),
)


def build_app(site: Site) -> web.Application:
    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        site.hits[request.path] += 1
        site.queries[request.path] = request.query_string
        return await handler(request)

    async def flaky(request: web.Request) -> web.Response:
        if site.hits[request.path] == 1:
            return web.Response(status=503, text="try later")
        return web.Response(body=PNG, content_type="image/png")

    async def counted(request: web.Request) -> web.Response:
        site.in_flight += 1
        site.max_in_flight = max(site.max_in_flight, site.in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            site.in_flight -= 1
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application(middlewares=[count])
    for path, handler in _FIXED_ROUTES:
        app.router.add_get(path, handler)
    app.router.add_get("/flaky", flaky)
    app.router.add_get("/counted/{name}", counted)
    return app


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    placeholder = Site(base="")
    server = TestServer(build_app(placeholder), host="127.0.0.1")
    await server.start_server()
    placeholder.base = f"http://127.0.0.1:{server.port}"
    try:
        yield placeholder
    finally:
        await server.close()


HOSTS = {
    "images.test": ["127.0.0.1"],
    "evil.test": ["10.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["127.0.0.1", "192.168.1.5"],
    "sixtofour.test": ["2002:7f00:1::1"],  # 6to4 of 127.0.0.1
    "nat64.test": ["64:ff9b::a9fe:a9fe"],  # NAT64 of 169.254.169.254
}


async def fake_resolve(host: str) -> list[str]:
    if host not in HOSTS:
        raise OSError(f"unknown host {host}")
    return HOSTS[host]


TEST_LIMITS = GatherLimits(
    max_image_bytes=LIMIT,
    connect_timeout_s=0.5,
    total_timeout_s=2.0,
    backoff_s=0.01,
    allow_loopback=True,
)

GathererFactory = Callable[..., Awaitable[ImageGatherer]]


@pytest.fixture
async def make_gatherer() -> AsyncIterator[GathererFactory]:
    """Started gatherers over `TEST_LIMITS` with overrides; closed after the test."""
    started: list[ImageGatherer] = []

    async def make(resolver: Any = fake_resolve, **overrides: Any) -> ImageGatherer:
        gatherer = ImageGatherer(replace(TEST_LIMITS, **overrides), resolver=resolver)
        await gatherer.start()
        started.append(gatherer)
        return gatherer

    yield make
    for gatherer in started:
        await gatherer.close()


async def expect_error(gatherer: ImageGatherer, source: str, code: ErrorCode) -> ProcessingError:
    with pytest.raises(ProcessingError) as caught:
        await gatherer.fetch_image(source)
    assert caught.value.code == code, caught.value.message
    assert caught.value.stage == "gather"
    return caught.value


# --------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------


async def test_fetches_jpeg_and_png_as_rgb(site: Site, make_gatherer: GathererFactory) -> None:
    gatherer = await make_gatherer()
    jpeg = await gatherer.fetch_image(site.url("/img.jpg"))
    png = await gatherer.fetch_image(site.url("/img.png"))
    assert (jpeg.mode, jpeg.size) == ("RGB", (64, 48))
    assert dominant(pixel(jpeg, (5, 24))) == 0  # red left half
    assert dominant(pixel(jpeg, (60, 24))) == 2  # blue right half
    assert (png.mode, png.size, png.getpixel((3, 3))) == ("RGB", (30, 20), (0, 200, 0))


async def test_host_name_connects_to_the_checked_address(
    site: Site, make_gatherer: GathererFactory
) -> None:
    # images.test exists only in the test resolver: the connection can only succeed if
    # aiohttp connects to the address our policy resolver returned.
    gatherer = await make_gatherer()
    port = site.base.rsplit(":", 1)[1]
    image = await gatherer.fetch_image(f"http://images.test:{port}/img.png")
    assert image.size == (30, 20)


async def test_slow_host_times_out(site: Site, make_gatherer: GathererFactory) -> None:
    gatherer = await make_gatherer(total_timeout_s=0.3)
    started = time.monotonic()
    error = await expect_error(gatherer, site.url("/slow"), ErrorCode.IMAGE_TIMEOUT)
    assert time.monotonic() - started < 1.5
    assert "timed out" in error.message


async def test_404_fails_without_retry(site: Site, make_gatherer: GathererFactory) -> None:
    gatherer = await make_gatherer(retries=2)
    error = await expect_error(
        gatherer, site.url("/missing?token=SECRET-123"), ErrorCode.IMAGE_DOWNLOAD_FAILED
    )
    assert site.hits["/missing"] == 1
    assert "404" in error.message
    assert "/missing" in error.message
    assert "SECRET-123" not in error.message


async def test_503_then_200_succeeds_after_retry(
    site: Site, make_gatherer: GathererFactory
) -> None:
    gatherer = await make_gatherer(retries=2)
    image = await gatherer.fetch_image(site.url("/flaky"))
    assert image.size == (30, 20)
    assert site.hits["/flaky"] == 2


async def test_persistent_503_gives_up_after_retries(
    site: Site, make_gatherer: GathererFactory
) -> None:
    gatherer = await make_gatherer(retries=2)
    error = await expect_error(gatherer, site.url("/down"), ErrorCode.IMAGE_DOWNLOAD_FAILED)
    assert site.hits["/down"] == 3
    assert "503" in error.message and "3 attempts" in error.message


async def test_connection_refused_is_retried_then_fails(make_gatherer: GathererFactory) -> None:
    gatherer = await make_gatherer(retries=1)
    error = await expect_error(
        gatherer, f"http://127.0.0.1:{free_port()}/x.png", ErrorCode.IMAGE_DOWNLOAD_FAILED
    )
    assert "connection failed" in error.message and "2 attempts" in error.message


@pytest.mark.parametrize("path", ["/big-declared", "/big-streamed"])
async def test_oversized_body_is_refused(
    site: Site, make_gatherer: GathererFactory, path: str
) -> None:
    gatherer = await make_gatherer(retries=2)
    error = await expect_error(gatherer, site.url(path), ErrorCode.IMAGE_TOO_LARGE)
    assert str(LIMIT) in error.message
    assert site.hits[path] == 1  # never retried


async def test_redirect_is_followed(site: Site, make_gatherer: GathererFactory) -> None:
    gatherer = await make_gatherer()
    image = await gatherer.fetch_image(site.url("/to-relative"))
    assert image.size == (30, 20)
    assert site.hits["/img.png"] == 1


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/to-metadata", ErrorCode.IMAGE_ADDRESS_REFUSED),  # literal link-local IP
        ("/to-evil", ErrorCode.IMAGE_ADDRESS_REFUSED),  # host name resolving to 10.0.0.1
        ("/to-ftp", ErrorCode.IMAGE_ADDRESS_REFUSED),
        ("/loop", ErrorCode.IMAGE_DOWNLOAD_FAILED),  # more than max_redirects
    ],
)
async def test_every_redirect_hop_is_checked(
    site: Site, make_gatherer: GathererFactory, path: str, code: ErrorCode
) -> None:
    gatherer = await make_gatherer(max_redirects=3)
    error = await expect_error(gatherer, site.url(path), code)
    if path == "/loop":
        assert site.hits["/loop"] == 4 and "redirects" in error.message
    else:
        assert site.hits[path] == 1


@pytest.mark.parametrize(
    "source",
    [
        "http://127.0.0.1:{port}/img.png",
        "http://[::1]:{port}/img.png",
        "http://localhost:{port}/img.png",  # through the system resolver
        "http://images.test:{port}/img.png",  # through the test resolver
    ],
)
async def test_loopback_refused_unless_allowed(
    site: Site, make_gatherer: GathererFactory, source: str
) -> None:
    resolver = None if "localhost" in source else fake_resolve
    gatherer = await make_gatherer(resolver=resolver, allow_loopback=False)
    port = site.base.rsplit(":", 1)[1]
    error = await expect_error(gatherer, source.format(port=port), ErrorCode.IMAGE_ADDRESS_REFUSED)
    assert "loopback" in error.message
    assert site.hits["/img.png"] == 0


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("http://metadata.test/latest", "link-local"),
        ("http://evil.test/x.png", "private"),
        ("http://mixed.test/x.png", "private"),  # one bad address refuses the host
        ("http://[::ffff:10.0.0.1]/x.png", "private"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://224.0.0.1/x.png", "multicast"),
    ],
)
async def test_private_and_special_addresses_refused(
    make_gatherer: GathererFactory, source: str, reason: str
) -> None:
    gatherer = await make_gatherer()
    error = await expect_error(gatherer, source, ErrorCode.IMAGE_ADDRESS_REFUSED)
    assert reason in error.message


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("http://[2002:7f00:1::1]:{port}/img.png", "loopback address (6to4"),
        ("http://[2002:a9fe:a9fe::1]/x.png", "link-local address (6to4"),
        ("http://[64:ff9b::7f00:1]:{port}/img.png", "loopback address (NAT64"),
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/x.png", "loopback address (Teredo"),
        ("http://[::7f00:1]:{port}/img.png", "loopback address (IPv4-compatible"),
        ("http://sixtofour.test:{port}/img.png", "loopback address (6to4"),  # resolved
        ("http://nat64.test/x.png", "link-local address (NAT64"),  # resolved
    ],
)
async def test_ipv6_forms_embedding_ipv4_are_judged_as_that_address(
    site: Site, make_gatherer: GathererFactory, source: str, reason: str
) -> None:
    gatherer = await make_gatherer(allow_loopback=False)
    port = site.base.rsplit(":", 1)[1]
    error = await expect_error(gatherer, source.format(port=port), ErrorCode.IMAGE_ADDRESS_REFUSED)
    assert reason in error.message
    assert sum(site.hits.values()) == 0


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "0X7F.1"])
@pytest.mark.parametrize("allow_loopback", [False, True])
async def test_non_canonical_ipv4_spellings_are_refused_before_any_connection(
    site: Site, make_gatherer: GathererFactory, host: str, allow_loopback: bool
) -> None:
    # The system resolver reads these as 127.0.0.1 (inet_aton); even where loopback is
    # allowed, the spelling itself is refused and the local server is never reached.
    gatherer = await make_gatherer(resolver=None, allow_loopback=allow_loopback)
    port = site.base.rsplit(":", 1)[1]
    source = f"http://{host}:{port}/img.png"
    error = await expect_error(gatherer, source, ErrorCode.IMAGE_ADDRESS_REFUSED)
    assert "non-canonical" in error.message
    assert site.hits["/img.png"] == 0


async def test_a_redirect_to_a_non_canonical_ipv4_spelling_is_refused(
    site: Site, make_gatherer: GathererFactory
) -> None:
    gatherer = await make_gatherer(allow_loopback=True)
    error = await expect_error(
        gatherer, site.url("/to-decimal-loopback"), ErrorCode.IMAGE_ADDRESS_REFUSED
    )
    assert "non-canonical" in error.message
    assert site.hits["/img.png"] == 0


@pytest.mark.parametrize(
    "source", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://example.com/"]
)
async def test_other_schemes_refused(make_gatherer: GathererFactory, source: str) -> None:
    gatherer = await make_gatherer()
    error = await expect_error(gatherer, source, ErrorCode.IMAGE_ADDRESS_REFUSED)
    assert "http" in error.message


async def test_url_rewrites_are_applied(site: Site, make_gatherer: GathererFactory) -> None:
    rewrites = (("https://bucket.s3.amazonaws.com/", site.url("/cdn/")),)
    gatherer = await make_gatherer(url_rewrites=rewrites)
    image = await gatherer.fetch_image("https://bucket.s3.amazonaws.com/a.png?X-Sig=abc")
    assert image.size == (30, 20)
    assert site.hits["/cdn/a.png"] == 1
    assert site.queries["/cdn/a.png"] == "X-Sig=abc"


@pytest.mark.parametrize(
    ("path", "max_pixels", "code"),
    [
        ("/bomb.png", 40_000_000, ErrorCode.IMAGE_TOO_LARGE),  # declares 10^10 pixels
        ("/big-dimensions.png", 1_000_000, ErrorCode.IMAGE_TOO_LARGE),  # 3 MP real image
        ("/truncated.jpg", 40_000_000, ErrorCode.IMAGE_DECODE_FAILED),
        ("/garbage.jpg", 40_000_000, ErrorCode.IMAGE_DECODE_FAILED),
    ],
)
async def test_bad_bodies(
    site: Site, make_gatherer: GathererFactory, path: str, max_pixels: int, code: ErrorCode
) -> None:
    gatherer = await make_gatherer(max_pixels=max_pixels)
    await expect_error(gatherer, site.url(path), code)


async def test_per_host_concurrency_is_bounded(site: Site) -> None:
    limits = replace(TEST_LIMITS, per_host_concurrency=2)
    async with ImageGatherer(limits, resolver=fake_resolve) as gatherer:
        images = await asyncio.gather(
            *(gatherer.fetch_image(site.url(f"/counted/{i}.png")) for i in range(6))
        )
    assert len(images) == 6
    assert site.max_in_flight == 2


async def test_url_needs_start() -> None:
    gatherer = ImageGatherer(TEST_LIMITS)
    with pytest.raises(RuntimeError, match="start"):
        await gatherer.fetch_image("http://127.0.0.1/x.png")
    await gatherer.close()  # harmless without start


# --------------------------------------------------------------------------------------
# Base64
# --------------------------------------------------------------------------------------


async def test_base64_with_and_without_data_prefix(make_gatherer: GathererFactory) -> None:
    gatherer = await make_gatherer()
    plain = base64.b64encode(PNG).decode()
    urlsafe_unpadded = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    for source in (
        plain,
        f"data:image/png;base64,{plain}",
        "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76)),
        urlsafe_unpadded,
    ):
        image = await gatherer.fetch_image(source)
        assert (image.mode, image.getpixel((0, 0))) == ("RGB", (0, 200, 0))


@pytest.mark.parametrize(
    "source", ["!!!not*base64$$$", "data:text/plain;base64,aGVsbG8=", "data:image/png,rawbytes"]
)
async def test_bad_base64(make_gatherer: GathererFactory, source: str) -> None:
    gatherer = await make_gatherer()
    error = await expect_error(gatherer, source, ErrorCode.IMAGE_BASE64_INVALID)
    assert source not in error.message


async def test_base64_message_never_echoes_payload(make_gatherer: GathererFactory) -> None:
    gatherer = await make_gatherer()
    payload = base64.b64encode(b"definitely not an image, but valid base64").decode()
    error = await expect_error(gatherer, payload, ErrorCode.IMAGE_DECODE_FAILED)
    assert payload not in error.message
    big = base64.b64encode(b"\x00" * (LIMIT + 10)).decode()
    error = await expect_error(gatherer, big, ErrorCode.IMAGE_TOO_LARGE)
    assert big[:50] not in error.message


# --------------------------------------------------------------------------------------
# Policy helpers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT: not global
        ("169.254.169.254", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),  # noqa: S104
        ("::", False),
        ("239.1.1.1", False),
        ("240.0.0.1", False),
    ],
)
def test_address_policy(address: str, allowed: bool) -> None:
    assert (address_refusal(address, GatherLimits()) is None) is allowed


@pytest.mark.parametrize(
    ("address", "refusal"),
    [
        # IPv4-mapped and SIIT-translated
        ("::ffff:127.0.0.1", "loopback address (IPv4-mapped"),
        ("::ffff:169.254.169.254", "link-local address (IPv4-mapped"),
        ("::ffff:0:7f00:1", "loopback address (IPv4-translated"),
        ("::ffff:93.184.216.34", None),
        # 6to4 2002::/16: bits 16-48
        ("2002:7f00:1::1", "loopback address (6to4"),
        ("2002:a9fe:a9fe::1", "link-local address (6to4"),
        ("2002:0a00:0001::1", "private address (6to4"),
        ("2002:5db8:d822::1", None),  # 6to4 of 93.184.216.34
        # NAT64 64:ff9b::/96: the last 32 bits
        ("64:ff9b::7f00:1", "loopback address (NAT64"),
        ("64:ff9b::a9fe:a9fe", "link-local address (NAT64"),
        ("64:ff9b::c0a8:1", "private address (NAT64"),
        ("64:ff9b::5db8:d822", None),
        # Teredo 2001::/32: the client is the inverted last 32 bits
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback address (Teredo"),
        ("2001:0:4136:e378:8000:63bf:5601:5601", "link-local address (Teredo"),
        ("2001:0:4136:e378:8000:63bf:a247:27dd", None),  # client 93.184.216.34
        # IPv4-compatible ::a.b.c.d (deprecated); :: and ::1 are themselves
        ("::7f00:1", "loopback address (IPv4-compatible"),
        ("::a9fe:a9fe", "link-local address (IPv4-compatible"),
        ("::1", "loopback address"),
        ("::", "unspecified address"),
    ],
)
def test_ipv6_embedding_ipv4_is_judged_as_the_ipv4_address(
    address: str, refusal: str | None
) -> None:
    got = address_refusal(address, GatherLimits())
    if refusal is None:
        assert got is None
    else:
        assert got is not None and got.startswith(refusal), got


def test_embedded_loopback_follows_the_loopback_switch_and_metadata_never_passes() -> None:
    both = GatherLimits(allow_loopback=True, allow_private=True)
    assert address_refusal("2002:7f00:1::1", GatherLimits(allow_loopback=True)) is None
    for metadata in ("2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe", "::ffff:169.254.169.254"):
        assert address_refusal(metadata, both) is not None


@pytest.mark.parametrize(
    ("host", "non_canonical"),
    [
        ("127.1", True),
        ("2130706433", True),
        ("0177.0.0.1", True),
        ("0x7f.0.0.1", True),
        ("0x7f000001", True),
        ("127.0.0.1.", True),
        ("017700000001", True),
        ("127.0.0.1", False),
        ("93.184.216.34", False),
        ("images.example.com", False),
        ("1e100.net", False),
        ("123.example", False),
    ],
)
def test_non_canonical_ipv4_spellings(host: str, non_canonical: bool) -> None:
    assert non_canonical_ipv4(host) is non_canonical


def test_address_policy_switches() -> None:
    loopback = GatherLimits(allow_loopback=True)
    private = GatherLimits(allow_private=True)
    assert address_refusal("127.0.0.1", loopback) is None
    assert address_refusal("10.0.0.1", loopback) is not None
    assert address_refusal("10.0.0.1", private) is None
    assert address_refusal("127.0.0.1", private) is not None
    # Never allowed, whatever the switches: cloud metadata lives here.
    both = GatherLimits(allow_loopback=True, allow_private=True)
    assert address_refusal("169.254.169.254", both) is not None


def test_redact_url_drops_credentials_query_and_fragment() -> None:
    text = redact_url("https://user:pw@cdn.example.com/a/b.jpg?sig=SECRET#frag")
    assert text == "https://cdn.example.com/a/b.jpg?…"


# --------------------------------------------------------------------------------------
# Requests and batches
# --------------------------------------------------------------------------------------


def pickup_request(vendor: list[str], pickup: list[str], shippingid: str = "S1") -> PickupRequest:
    return PickupRequest(
        event_id=f"e-{shippingid}",
        occurred_at_ms=0,
        shippingid=shippingid,
        uuid=f"u-{shippingid}",
        productname="shoe",
        question="[]",
        pickupproductimage=tuple(vendor),
        skupickdone=tuple(pickup),
    )


async def test_gather_request_vendor_and_pickup(site: Site, make_gatherer: GathererFactory) -> None:
    gatherer = await make_gatherer()
    request = pickup_request(
        [site.url("/img.jpg")], [base64.b64encode(PNG).decode(), site.url("/img.jpg")]
    )
    gathered = await gatherer.gather_request(request)
    assert [im.size for im in gathered.vendor] == [(64, 48)]
    assert [im.size for im in gathered.pickup] == [(30, 20), (64, 48)]
    assert all(im.mode == "RGB" for im in gathered.vendor + gathered.pickup)
    assert gathered.gather_ms > 0
    assert site.hits["/img.jpg"] == 1  # the same URL twice is fetched once


@pytest.mark.parametrize(("vendor", "pickup"), [(0, 1), (1, 0), (11, 1), (1, 11), (6, 6)])
async def test_gather_request_image_counts(
    make_gatherer: GathererFactory, vendor: int, pickup: int
) -> None:
    gatherer = await make_gatherer(max_images_per_request=11)
    source = base64.b64encode(PNG).decode()
    with pytest.raises(ProcessingError) as caught:
        await gatherer.gather_request(pickup_request([source] * vendor, [source] * pickup))
    assert caught.value.code == ErrorCode.INVALID_REQUEST


async def test_gather_batch_isolates_failures(site: Site, make_gatherer: GathererFactory) -> None:
    gatherer = await make_gatherer()
    good = pickup_request([site.url("/img.png")], [site.url("/img.jpg")], "good")
    bad = pickup_request([site.url("/img.png")], [site.url("/img.jpg"), site.url("/missing")], "b")
    also_good = pickup_request([site.url("/img.jpg")], [base64.b64encode(PNG).decode()], "g2")
    results = await gatherer.gather_batch([good, bad, also_good])
    assert isinstance(results[0], GatheredImages) and isinstance(results[2], GatheredImages)
    failure = results[1]
    assert isinstance(failure, Failure)
    assert failure.code == ErrorCode.IMAGE_DOWNLOAD_FAILED
    assert failure.stage == "gather"
    assert failure.message.startswith("pickup image 2:")
    assert [im.size for im in results[2].vendor] == [(64, 48)]
    assert site.hits["/img.png"] == 1 and site.hits["/img.jpg"] == 1  # shared across the batch


async def test_gather_batch_reports_count_errors_per_request(
    site: Site, make_gatherer: GathererFactory
) -> None:
    gatherer = await make_gatherer()
    results = await gatherer.gather_batch(
        [
            pickup_request([], [site.url("/img.png")], "a"),
            pickup_request([site.url("/img.png")], [site.url("/img.png")], "b"),
        ]
    )
    assert isinstance(results[0], Failure) and results[0].code == ErrorCode.INVALID_REQUEST
    assert isinstance(results[1], GatheredImages)
