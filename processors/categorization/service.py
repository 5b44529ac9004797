"""Categorization of one micro-batch: fetch each listing's image, then predict the batch.

The categorization counterpart of `processors.verification.VerificationPipeline`: the
stream handler decodes the listings and publishes the results; this class does the work
between, without Kafka. A listing whose image is missing or unusable is categorized from
its text (the categorizer falls back to the head it has, docs/former-service.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from PIL import Image

from processors.batching import PhaseObserver, timed
from processors.errors import Failure, ProcessingError
from processors.records import CategoryTag, ProductListing, SourcePosition

log = logging.getLogger(__name__)


class ImageFetcher(Protocol):
    """Fetches one image (implemented by `processors.gathering.ImageGatherer`)."""

    async def fetch_image(self, source: str) -> Image.Image:
        """The decoded RGB image of `source`; `ProcessingError` when it is unusable."""


class BatchCategorizer(Protocol):
    """Predicts a batch (implemented by `processors.categorization.Categorizer`)."""

    @property
    def model_version(self) -> str:
        """The version the category tags name."""

    def predict_batch(
        self,
        listings: Sequence[ProductListing],
        images: Sequence[Image.Image | None],
        *,
        idempotency_keys: Sequence[str],
        sources: Sequence[SourcePosition | None] | None = None,
    ) -> list[CategoryTag | Failure]:
        """One tag or failure per listing, in order."""


class CategorizationService:
    """Fetches the listings' images concurrently, then runs the categorizer on the batch.

    `on_phase("categorize", seconds)` is told the wall time of each call (fetching and
    predicting together), once per batch.
    """

    def __init__(
        self,
        categorizer: BatchCategorizer,
        images: ImageFetcher,
        *,
        on_phase: PhaseObserver | None = None,
    ) -> None:
        """Keep the collaborators; nothing is loaded or fetched here."""
        self._categorizer = categorizer
        self._images = images
        self._on_phase = on_phase

    @property
    def model_version(self) -> str:
        """The categorizer's version."""
        return self._categorizer.model_version

    async def __call__(
        self,
        listings: Sequence[ProductListing],
        keys: Sequence[str],
        sources: Sequence[SourcePosition],
    ) -> list[CategoryTag | Failure]:
        """One `CategoryTag` or `Failure` per listing, in order.

        An image that cannot be fetched or decoded is logged and left out (the listing is
        categorized from its text). The categorizer runs in a thread; what it raises
        (a programming error: it reports per-listing problems as failures) propagates.
        """
        with timed(self._on_phase, "categorize"):
            images = await asyncio.gather(*(self._fetch(listing) for listing in listings))
            return await asyncio.to_thread(
                self._categorizer.predict_batch,
                list(listings),
                list(images),
                idempotency_keys=list(keys),
                sources=list(sources),
            )

    async def _fetch(self, listing: ProductListing) -> Image.Image | None:
        if not listing.image:
            return None
        try:
            return await self._images.fetch_image(listing.image)
        except ProcessingError as exc:
            # A listing with a broken image is still categorized from its text.
            log.warning("product %s: image unusable (%s)", listing.product_id, exc.message)
            return None
