"""InternVL dynamic tiling: images to normalized 448 x 448 tiles.

This reproduces the preprocessing of the InternVL2.5 model card, which the HTTP
service this project replaces used unchanged (docs/former-service.md, "Images"):

- the image is resized to the grid of `image_size` tiles (between `min_num` and
  `max_num` tiles) whose aspect ratio is closest to the image's, then cut into tiles
  row by row;
- when there is more than one tile, a thumbnail of the whole image is appended;
- every tile is resized (bicubic) to `image_size`, turned into a tensor and
  normalized with the ImageNet mean and standard deviation.

The model was trained on exactly this, so the behaviour is kept bit for bit,
including the tie-break in `find_closest_aspect_ratio`; the tests compare it with a
verbatim copy of the model-card code. Vendor images get at most 1 tile and pickup
images at most 2 (plus the thumbnail), as in the old service.

Everything here is synchronous and CPU-bound: callers run it off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import InterpolationMode

from processors.gathering import GatheredImages

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 448


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


def build_transform(input_size: int) -> T.Compose:
    """PIL image to a (3, input_size, input_size) float32 tensor, ImageNet-normalized."""
    return T.Compose(
        [
            T.Lambda(_to_rgb),
            T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


@lru_cache(maxsize=8)
def _cached_transform(input_size: int) -> T.Compose:
    return build_transform(input_size)


@lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """Candidate grids (columns, rows) with min_num..max_num tiles, fewest tiles first.

    Built exactly like the model card (a set sorted by tile count), so grids with the
    same tile count keep the model card's relative order, which the tie-break in
    `find_closest_aspect_ratio` depends on.
    """
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(ratios, key=lambda x: x[0] * x[1]))


def find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to `aspect_ratio`.

    On an exact tie the later (larger) grid wins only if the image has more than
    half the pixels that grid would hold; smaller images keep the smaller grid.
    """
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        grid_pixels = image_size * image_size * ratio[0] * ratio[1]
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * grid_pixels:
            best_ratio = ratio
    return best_ratio


def tile_grid(
    width: int, height: int, *, min_num: int = 1, max_num: int = 12, image_size: int = IMAGE_SIZE
) -> tuple[int, int]:
    """The (columns, rows) grid `dynamic_preprocess` uses for an image of this size."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image must have pixels, got {width}x{height}")
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got {min_num}, {max_num}")
    return find_closest_aspect_ratio(
        width / height, candidate_grids(min_num, max_num), width, height, image_size
    )


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """Cut `image` into `image_size` tiles on the closest grid, row by row.

    With `use_thumbnail`, a resize of the whole image is appended when there is more
    than one tile. Raises ValueError for an empty image or bad tile counts.
    """
    orig_width, orig_height = image.size
    columns, rows = tile_grid(
        orig_width, orig_height, min_num=min_num, max_num=max_num, image_size=image_size
    )
    target_width = image_size * columns
    target_height = image_size * rows
    # Pillow's default filter, as in the model card (bicubic for RGB images).
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(columns * rows):
        left = (i % columns) * image_size
        top = (i // columns) * image_size
        processed_images.append(resized_img.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def image_to_tiles(
    image: Image.Image, *, max_num: int, image_size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Tiles of one image as a float32 tensor (n, 3, image_size, image_size).

    The model card's `load_image` for an already decoded image: n is 1, or the grid's
    tile count plus one thumbnail.
    """
    transform = _cached_transform(image_size)
    tiles = dynamic_preprocess(
        _to_rgb(image), image_size=image_size, use_thumbnail=True, max_num=max_num
    )
    return torch.stack([transform(tile) for tile in tiles])


@dataclass(frozen=True)
class TilingConfig:
    """Tile budget per image kind; the old service used 1 for vendor and 2 for pickup."""

    image_size: int = IMAGE_SIZE
    vendor_max_tiles: int = 1
    pickup_max_tiles: int = 2

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.vendor_max_tiles < 1 or self.pickup_max_tiles < 1:
            raise ValueError("TilingConfig needs a positive image_size and max tiles >= 1")


@dataclass(frozen=True)
class TiledRequest:
    """The model input of one request.

    `pixel_values` is (sum(num_patches), 3, size, size) float32; `num_patches` has
    one entry per image, vendor images first, then pickup images.
    """

    pixel_values: torch.Tensor
    num_patches: tuple[int, ...]
    vendor_count: int
    pickup_count: int


def tile_images(gathered: GatheredImages, config: TilingConfig) -> TiledRequest:
    """Tile the vendor images, then the pickup images, into one tensor."""
    parts = [
        image_to_tiles(image, max_num=config.vendor_max_tiles, image_size=config.image_size)
        for image in gathered.vendor
    ] + [
        image_to_tiles(image, max_num=config.pickup_max_tiles, image_size=config.image_size)
        for image in gathered.pickup
    ]
    size = config.image_size
    pixel_values = torch.cat(parts, dim=0) if parts else torch.empty((0, 3, size, size))
    return TiledRequest(
        pixel_values=pixel_values,
        num_patches=tuple(int(part.shape[0]) for part in parts),
        vendor_count=len(gathered.vendor),
        pickup_count=len(gathered.pickup),
    )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SIZE",
    "TiledRequest",
    "TilingConfig",
    "build_transform",
    "candidate_grids",
    "dynamic_preprocess",
    "find_closest_aspect_ratio",
    "image_to_tiles",
    "tile_grid",
    "tile_images",
]
