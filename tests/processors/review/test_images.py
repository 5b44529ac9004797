"""Review copies: small JPEGs of what the model received, addressed by their content."""

from __future__ import annotations

import base64
import hashlib
import io

from PIL import Image

from processors.gathering import GatheredImages, GatherLimits
from processors.records import PickupRequest
from processors.review.images import CopyLimits, ReviewCopier, encode_copy


def png_b64(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request(vendor: list[str], pickup: list[str]) -> PickupRequest:
    return PickupRequest(
        event_id="e-1",
        occurred_at_ms=0,
        shippingid="S-1",
        uuid="u-1",
        productname="shirt",
        question="[]",
        pickupproductimage=tuple(vendor),
        skupickdone=tuple(pickup),
    )


def noisy(size: tuple[int, int]) -> Image.Image:
    return Image.frombytes(
        "RGB", size, bytes((i * 7919) % 251 for i in range(size[0] * size[1] * 3))
    )


def test_copies_of_gathered_images_are_small_jpegs_addressed_by_sha256() -> None:
    copier = ReviewCopier(CopyLimits(), GatherLimits())
    shared = Image.new("RGB", (1600, 900), (10, 120, 40))
    gathered = GatheredImages(
        vendor=(shared,),
        pickup=(Image.new("RGB", (300, 2000), (200, 10, 10)), shared),
        gather_ms=1.0,
    )
    copies = copier.copies(request(["https://x/1.jpg"], ["b64", "b64"]), gathered, "k-1", 1234)
    assert [(c.role, c.image_index) for c in copies] == [
        ("vendor", 0),
        ("pickup", 0),
        ("pickup", 1),
    ]
    for copy in copies:
        assert copy.jpeg.startswith(b"\xff\xd8")
        assert copy.sha256 == hashlib.sha256(copy.jpeg).hexdigest()
        decoded = Image.open(io.BytesIO(copy.jpeg))
        assert decoded.format == "JPEG" and max(decoded.size) == 512
        assert (copy.width, copy.height) == decoded.size
        assert copy.decision_key == "k-1" and copy.created_at_ms == 1234
    assert (copies[0].width, copies[0].height) == (512, 288)
    # The same picture as vendor and as pickup image is one content address.
    assert copies[0].sha256 == copies[2].sha256 != copies[1].sha256


def test_without_gathered_images_only_base64_sources_are_copied_never_fetched() -> None:
    copier = ReviewCopier(CopyLimits(), GatherLimits())
    vendor = [png_b64((64, 48), (0, 0, 255)), "https://images.example.com/never-fetched.jpg"]
    pickup = ["not base64 at all!", png_b64((20, 30), (255, 0, 0))]
    copies = copier.copies(request(vendor, pickup), None, "k-1", 1)
    assert [(c.role, c.image_index, c.width, c.height) for c in copies] == [
        ("vendor", 0, 64, 48),
        ("pickup", 1, 20, 30),
    ]


def test_a_copy_over_the_byte_budget_steps_quality_down_or_is_dropped() -> None:
    image = noisy((512, 512))
    roomy = encode_copy(image, CopyLimits(max_bytes=1_000_000))
    assert roomy is not None
    budget = len(roomy[0]) - 1
    tighter = encode_copy(image, CopyLimits(max_bytes=budget))
    assert tighter is not None and len(tighter[0]) <= budget
    assert encode_copy(image, CopyLimits(max_bytes=1024)) is None


def test_exif_metadata_does_not_travel() -> None:
    image = Image.new("RGB", (40, 40), (1, 2, 3))
    exif = Image.Exif()
    exif[0x010E] = "customer address here"  # ImageDescription
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    with_exif = Image.open(io.BytesIO(buffer.getvalue()))
    encoded = encode_copy(with_exif, CopyLimits())
    assert encoded is not None and b"customer address" not in encoded[0]
