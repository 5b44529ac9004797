"""CategorizationService: images fetched concurrently, unusable ones left out, one phase time."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from PIL import Image

from processors.categorization.service import CategorizationService
from processors.errors import ErrorCode, Failure, ProcessingError
from processors.records import CategoryTag, ProductListing, SourcePosition, TopCategory


def listing(n: int, image: str | None) -> ProductListing:
    return ProductListing.from_event(
        {
            "event_id": f"e-{n}",
            "occurred_at": 1_763_800_000_000,
            "product_id": f"PROD-{n}",
            "title": "Cotton tee",
            "description": "Short sleeves.",
            "image": image,
            "top_k_tags": 2,
        }
    )


class Fetcher:
    """Red 8x8 images by URL; `broken` URLs raise like the gatherer does."""

    def __init__(self, broken: frozenset[str] = frozenset()) -> None:
        self.broken = broken
        self.fetched: list[str] = []

    async def fetch_image(self, source: str) -> Image.Image:
        self.fetched.append(source)
        if source in self.broken:
            raise ProcessingError(ErrorCode.IMAGE_DOWNLOAD_FAILED, "HTTP 404", "gather")
        return Image.new("RGB", (8, 8), (200, 0, 0))


class Categorizer:
    """Records what it was given; tags with the key so the order is visible."""

    model_version = "categorizer@test"

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.seen: list[tuple[str, bool, str, int | None]] = []

    def predict_batch(
        self,
        listings: Sequence[ProductListing],
        images: Sequence[Image.Image | None],
        *,
        idempotency_keys: Sequence[str],
        sources: Sequence[SourcePosition | None] | None = None,
    ) -> list[CategoryTag | Failure]:
        if self.fail:
            raise RuntimeError("encoder crashed")
        positions = list(sources or [None] * len(listings))
        for item, image, key, source in zip(
            listings, images, idempotency_keys, positions, strict=True
        ):
            self.seen.append(
                (item.product_id, image is not None, key, source.offset if source else None)
            )
        return [
            CategoryTag(item.product_id, "tops", 0.9, (TopCategory("tops", 0.9),), (), "v", key)
            for item, key in zip(listings, idempotency_keys, strict=True)
        ]


async def test_broken_and_missing_images_are_left_out_and_the_batch_is_categorized() -> None:
    fetcher, categorizer = Fetcher(broken=frozenset({"https://cdn.example/2.jpg"})), Categorizer()
    phases: list[str] = []
    service = CategorizationService(
        categorizer, fetcher, on_phase=lambda phase, seconds: phases.append(phase)
    )
    listings = [
        listing(1, "https://cdn.example/1.jpg"),
        listing(2, "https://cdn.example/2.jpg"),
        listing(3, None),
    ]
    sources = [SourcePosition("product-listed", 0, n) for n in (10, 11, 12)]
    results = await service(listings, ["k1", "k2", "k3"], sources)
    assert [r.product_id for r in results if isinstance(r, CategoryTag)] == [
        "PROD-1",
        "PROD-2",
        "PROD-3",
    ]
    assert sorted(fetcher.fetched) == ["https://cdn.example/1.jpg", "https://cdn.example/2.jpg"]
    assert categorizer.seen == [
        ("PROD-1", True, "k1", 10),
        ("PROD-2", False, "k2", 11),
        ("PROD-3", False, "k3", 12),
    ]
    assert phases == ["categorize"]
    assert service.model_version == "categorizer@test"


async def test_a_raising_categorizer_propagates_and_its_time_is_still_reported() -> None:
    phases: list[str] = []
    service = CategorizationService(
        Categorizer(fail=True), Fetcher(), on_phase=lambda phase, seconds: phases.append(phase)
    )
    with pytest.raises(RuntimeError, match="encoder crashed"):
        await service([listing(1, None)], ["k1"], [SourcePosition("product-listed", 0, 0)])
    assert phases == ["categorize"]
