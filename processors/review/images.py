"""Review copies: what the model saw, kept small and content-addressed.

For each verification, each image the model received (vendor and pickup, base64 ones
included) becomes a baseline JPEG at most `max_side` px on its long side (512 by
default), addressed by the SHA-256 of its bytes, so a vendor image shared by many
returns is one stored copy. Copies travel as `review-image` events (keyed by the
hash) that the inference worker produces after the batch's decisions are sent; the
sink stores them (`review_images`, `review_image_refs`) and the review page serves
only those stored bytes. docs/review.md describes the flow.

Source of the pixels: the decoded RGB images the pipeline gathered for the model
(`GatheredImages`). In replay mode nothing is gathered, so the base64 images of the
request are decoded here (within the same `GatherLimits`); URLs are never fetched for
a copy, so a replayed request's URL images have no copy.

Failure behaviour: an image that cannot be decoded or copied is skipped (its index is
simply absent); `copies()` never raises for bad image data. Nothing here logs image
content or URLs.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from processors.errors import ProcessingError
from processors.gathering import GatheredImages, GatherLimits
from processors.image_decoding import decode_base64, decode_image
from processors.records import PickupRequest

JPEG_QUALITIES = (82, 70, 55, 40)


@dataclass(frozen=True, slots=True)
class CopyLimits:
    """How big a review copy may be: long side in px and bytes per copy.

    A copy whose JPEG is over `max_bytes` at the lowest quality is dropped.
    """

    max_side: int = 512
    max_bytes: int = 120_000

    def __post_init__(self) -> None:
        if not 16 <= self.max_side <= 4096 or self.max_bytes < 1024:
            raise ValueError("max_side must be 16..4096 px and max_bytes at least 1024")


@dataclass(frozen=True, slots=True)
class ReviewImage:
    """One review copy of one image of one request (a `review-image` event)."""

    sha256: str
    jpeg: bytes
    width: int
    height: int
    request_uuid: str
    decision_key: str
    role: str  # "vendor" or "pickup"
    image_index: int
    created_at_ms: int

    def to_event(self) -> dict[str, Any]:
        """The copy as a `review-image` event."""
        return {
            "sha256": self.sha256,
            "jpeg": self.jpeg,
            "width": self.width,
            "height": self.height,
            "request_uuid": self.request_uuid,
            "decision_key": self.decision_key,
            "role": self.role,
            "image_index": self.image_index,
            "created_at": self.created_at_ms,
        }


def encode_copy(image: Image.Image, limits: CopyLimits) -> tuple[bytes, int, int] | None:
    """(JPEG bytes, width, height) of `image` shrunk to `limits`, or None if it cannot fit."""
    copy = image.convert("RGB") if image.mode != "RGB" else image.copy()
    copy.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
    for quality in JPEG_QUALITIES:
        buffer = io.BytesIO()
        # No EXIF or other metadata is written: only pixels leave the worker.
        copy.save(buffer, format="JPEG", quality=quality, optimize=True)
        data = buffer.getvalue()
        if len(data) <= limits.max_bytes:
            return data, copy.width, copy.height
    return None


class ReviewCopier:
    """Makes the review copies of one verified request (CPU work: call it off the loop)."""

    def __init__(self, limits: CopyLimits, gather: GatherLimits) -> None:
        self.limits = limits
        self._gather = gather

    def copies(
        self,
        request: PickupRequest,
        gathered: GatheredImages | None,
        decision_key: str,
        now_ms: int,
    ) -> list[ReviewImage]:
        """The copies of every image of `request` that can be made, vendor images first."""
        made: list[ReviewImage] = []
        for role, index, image in self._images(request, gathered):
            encoded = encode_copy(image, self.limits)
            if encoded is None:
                continue
            data, width, height = encoded
            made.append(
                ReviewImage(
                    sha256=hashlib.sha256(data).hexdigest(),
                    jpeg=data,
                    width=width,
                    height=height,
                    request_uuid=request.uuid,
                    decision_key=decision_key,
                    role=role,
                    image_index=index,
                    created_at_ms=now_ms,
                )
            )
        return made

    def _images(
        self, request: PickupRequest, gathered: GatheredImages | None
    ) -> Iterator[tuple[str, int, Image.Image]]:
        if gathered is not None:
            for role, images in (("vendor", gathered.vendor), ("pickup", gathered.pickup)):
                for index, image in enumerate(images):
                    yield role, index, image
            return
        for role, sources in (
            ("vendor", request.pickupproductimage),
            ("pickup", request.skupickdone),
        ):
            for index, source in enumerate(sources):
                if source.lower().startswith(("http://", "https://")):
                    continue  # never fetched for a copy
                try:
                    yield (
                        role,
                        index,
                        decode_image(decode_base64(source, self._gather), self._gather),
                    )
                except ProcessingError:
                    continue
