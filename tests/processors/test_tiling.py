"""Tiling: parity with the InternVL2.5 model-card preprocessing, shapes and normalization."""

from __future__ import annotations

import io
import random
from typing import Any

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import InterpolationMode

from processors.gathering import GatheredImages
from processors.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TilingConfig,
    build_transform,
    candidate_grids,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    image_to_tiles,
    tile_grid,
    tile_images,
)

# --------------------------------------------------------------------------------------
# Reference: the InternVL2.5 model card code, as the former service ran it
# (docs/former-service.md, "Images"). Kept verbatim on purpose, only the signatures are
# annotated; do not "improve" it.
# --------------------------------------------------------------------------------------


def ref_build_transform(input_size: int) -> Any:
    MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
    transform = T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=MEAN, std=STD),
        ]
    )
    return transform


def ref_find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: list[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:  # noqa: SIM102
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return target_ratios


def ref_dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    target_ratios = ref_target_ratios(min_num, max_num)

    # find the closest aspect ratio to the target
    target_aspect_ratio = ref_find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size
    )

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images


def ref_load_image(image_file: Any, input_size: int = 448, max_num: int = 12) -> torch.Tensor:
    image = Image.open(image_file).convert("RGB")
    transform = ref_build_transform(input_size=input_size)
    images = ref_dynamic_preprocess(
        image, image_size=input_size, use_thumbnail=True, max_num=max_num
    )
    pixel_values = [transform(image) for image in images]
    pixel_values = torch.stack(pixel_values)
    return pixel_values


def ref_grid(width: int, height: int, max_num: int, image_size: int = 448) -> tuple[int, int]:
    """The grid the reference picks, without building an image."""
    return ref_find_closest_aspect_ratio(
        width / height, ref_target_ratios(1, max_num), width, height, image_size
    )


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

MAX_NUMS = (1, 2, 6, 12)


def _sizes(count: int, seed: int, high: int = 4000) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(rng.randint(1, high), rng.randint(1, high)) for _ in range(count)]
    # Extreme aspect ratios, squares, exact grid multiples and exact ties between grids.
    sizes += [(1, 1), (1, high), (high, 1), (2, high), (high, 3), (448, 448), (896, 448)]
    sizes += [(448, 896), (1344, 448), (300, 400), (600, 800), (400, 300), (800, 600)]
    sizes += [(rng.randint(1, 40), rng.randint(1000, high)) for _ in range(count // 10)]
    sizes += [(rng.randint(1000, high), rng.randint(1, 40)) for _ in range(count // 10)]
    return sizes


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def _png_bytes(image: Image.Image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


# --------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------


def test_candidate_grids_match_reference_order() -> None:
    for max_num in range(1, 13):
        for min_num in range(1, max_num + 1):
            assert list(candidate_grids(min_num, max_num)) == ref_target_ratios(min_num, max_num)


@pytest.mark.parametrize("max_num", MAX_NUMS)
def test_grid_matches_reference_on_hundreds_of_sizes(max_num: int) -> None:
    sizes = _sizes(600, seed=max_num)
    grids = set()
    for width, height in sizes:
        expected = ref_grid(width, height, max_num)
        assert tile_grid(width, height, max_num=max_num) == expected, (width, height)
        assert (
            find_closest_aspect_ratio(
                width / height, candidate_grids(1, max_num), width, height, 448
            )
            == expected
        )
        grids.add(expected)
    # The sizes really exercise several grids, not just (1, 1).
    assert len(grids) >= min(max_num, 5)


@pytest.mark.parametrize("max_num", MAX_NUMS)
def test_dynamic_preprocess_tiles_match_reference(max_num: int) -> None:
    # Real images: same tile count and identical tile pixels (sizes kept small for speed,
    # plus extreme strips).
    sizes = [*_sizes(20, seed=100 + max_num, high=1300)[:20], (1, 2500), (2500, 2), (31, 7)]
    for index, (width, height) in enumerate(sizes):
        image = _noise_image(width, height, seed=index)
        ours = dynamic_preprocess(image, max_num=max_num, use_thumbnail=True)
        reference = ref_dynamic_preprocess(image, max_num=max_num, use_thumbnail=True)
        assert len(ours) == len(reference), (width, height)
        for mine, theirs in zip(ours, reference, strict=True):
            assert mine.size == theirs.size == (448, 448)
            assert mine.tobytes() == theirs.tobytes(), (width, height)


@pytest.mark.parametrize(
    ("width", "height", "max_num"),
    [(640, 480, 1), (640, 480, 2), (480, 900, 2), (1600, 700, 6), (300, 400, 2), (2000, 600, 12)],
)
def test_image_to_tiles_is_identical_to_reference_load_image(
    width: int, height: int, max_num: int
) -> None:
    image = _noise_image(width, height, seed=width * height)
    # A smooth gradient on top of the noise, so resizing has structure to work on.
    gradient = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image = Image.blend(image, gradient, 0.7)
    expected = ref_load_image(_png_bytes(image), max_num=max_num)
    ours = image_to_tiles(image, max_num=max_num)
    assert ours.dtype == torch.float32
    assert ours.shape == expected.shape
    assert torch.equal(ours, expected)


def test_build_transform_matches_reference_on_non_rgb_input() -> None:
    image = _noise_image(200, 120, seed=3).convert("L")
    assert torch.equal(build_transform(448)(image), ref_build_transform(448)(image))


# --------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------


def test_tie_break_prefers_larger_grid_only_for_large_images() -> None:
    # Aspect 0.75 is exactly between 1x1 (1.0) and 1x2 (0.5).
    assert tile_grid(300, 400, max_num=2) == (1, 1)  # 120,000 px < half of 2 tiles
    assert tile_grid(600, 800, max_num=2) == (1, 2)  # 480,000 px > half of 2 tiles
    assert ref_grid(300, 400, 2) == (1, 1)
    assert ref_grid(600, 800, 2) == (1, 2)


@pytest.mark.parametrize(
    ("size", "max_num", "tiles"),
    [
        ((640, 480), 1, 1),  # vendor budget: always one tile, no thumbnail
        ((448, 448), 2, 1),  # square: one tile, no thumbnail
        ((900, 450), 2, 3),  # 2x1 grid + thumbnail
        ((450, 900), 2, 3),  # 1x2 grid + thumbnail
        ((1344, 896), 6, 7),  # 3x2 grid + thumbnail
        ((4000, 10), 12, 13),  # 12x1 strip + thumbnail
    ],
)
def test_image_to_tiles_shapes(size: tuple[int, int], max_num: int, tiles: int) -> None:
    tensor = image_to_tiles(Image.new("RGB", size, (10, 20, 30)), max_num=max_num)
    assert tensor.shape == (tiles, 3, 448, 448)
    assert tensor.dtype == torch.float32


def test_normalization_uses_imagenet_mean_and_std() -> None:
    white = image_to_tiles(Image.new("RGB", (500, 300), (255, 255, 255)), max_num=1)
    black = image_to_tiles(Image.new("RGB", (500, 300), (0, 0, 0)), max_num=1)
    for channel in range(3):
        mean, std = IMAGENET_MEAN[channel], IMAGENET_STD[channel]
        assert torch.allclose(white[0, channel], torch.tensor((1.0 - mean) / std), atol=1e-6)
        assert torch.allclose(black[0, channel], torch.tensor((0.0 - mean) / std), atol=1e-6)


def test_image_to_tiles_accepts_non_rgb_images() -> None:
    rgba = Image.new("RGBA", (300, 300), (255, 0, 0, 255))
    tensor = image_to_tiles(rgba, max_num=1)
    red = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert tensor.shape == (1, 3, 448, 448)
    assert torch.allclose(tensor[0, 0], torch.tensor(red), atol=1e-6)


def test_tile_images_orders_vendor_then_pickup() -> None:
    vendor = (Image.new("RGB", (300, 300), (255, 0, 0)), Image.new("RGB", (800, 400), (0, 255, 0)))
    pickup = (Image.new("RGB", (900, 450), (0, 0, 255)), Image.new("RGB", (400, 400), (0, 0, 0)))
    tiled = tile_images(GatheredImages(vendor, pickup, gather_ms=1.0), TilingConfig())
    # Vendor: 1 tile each (budget 1). Pickup: 2x1 grid + thumbnail, then a square (1 tile).
    assert tiled.num_patches == (1, 1, 3, 1)
    assert tiled.vendor_count == 2
    assert tiled.pickup_count == 2
    assert tiled.pixel_values.shape == (6, 3, 448, 448)
    assert tiled.pixel_values.dtype == torch.float32

    def dominant_channel(tile: torch.Tensor) -> int:
        # Undo normalization and pick the brightest channel of the tile's mean color.
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return int((tile * std + mean).mean(dim=(1, 2)).argmax())

    assert dominant_channel(tiled.pixel_values[0]) == 0  # red vendor
    assert dominant_channel(tiled.pixel_values[1]) == 1  # green vendor
    for index in (2, 3, 4):
        assert dominant_channel(tiled.pixel_values[index]) == 2  # blue pickup tiles + thumbnail
    assert float(tiled.pixel_values[5].max()) < -1.5  # black pickup


def test_tile_images_respects_config_budgets() -> None:
    wide = Image.new("RGB", (1800, 450), (128, 128, 128))
    config = TilingConfig(vendor_max_tiles=4, pickup_max_tiles=1)
    tiled = tile_images(GatheredImages((wide,), (wide,), gather_ms=0.0), config)
    assert tiled.num_patches == (5, 1)  # 4x1 + thumbnail for vendor, single tile for pickup
    assert tiled.pixel_values.shape[0] == sum(tiled.num_patches)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="pixels"):
        tile_grid(0, 10)
    with pytest.raises(ValueError, match="min_num"):
        tile_grid(10, 10, min_num=3, max_num=2)
    with pytest.raises(ValueError):
        TilingConfig(pickup_max_tiles=0)
