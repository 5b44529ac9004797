"""Fashion-MNIST in the categorizer's training layout.

Fashion-MNIST (Zalando Research; Debian's `dataset-fashion-mnist` installs it under
/usr/share/datasets/fashion-mnist/) holds 70,000 28x28 grayscale product photos in 10
classes: 60,000 for training and 10,000 for testing, as gzip-compressed IDX files.
`convert_fashion_mnist` writes one PNG per photo and a CSV (title, description,
image, category) that `train_categorizer` reads.

Fashion-MNIST has no text. What the `text_mode` argument puts in title/description:

- `"empty"` (default): both empty. Only the image head can be trained; this is the
  setting for the headline image-only figure.
- `"template"`: title `"Product photo #<index>"` (the row in the IDX file,
  zero-padded to 5 digits), description `"Grayscale 28x28 catalogue photo."`.
  Neither names or hints at the class, and Fashion-MNIST's order is shuffled, so a
  text-only classifier can do no better than chance (about 10%); it exists to
  exercise the text and combined heads honestly. The split's name is deliberately
  not in the text: with it, test texts ("test-...") drifted away from every training
  text and dragged the combined head from 89% down to 60% (docs/categorization-eval.md).
- `"catalog"`: LEAKS THE LABEL on purpose. Made-up listing text built from a small
  per-class vocabulary (e.g. "Black leather ankle boot"), with one row in five given a
  generic title ("Fashion item") that names no class. For tests and demos of text
  features and tags only; accuracies on it say nothing about skill.

Command line: `python -m processors.categorization convert|demo-events --help`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import gzip
import io
import json
import random
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

DEFAULT_SRC = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CSV_COLUMNS = ("title", "description", "image", "category")
TEMPLATE_DESCRIPTION = "Grayscale 28x28 catalogue photo."

Split = Literal["train", "test"]
TextMode = Literal["empty", "template", "catalog"]

_CATALOG_NOUNS: dict[str, tuple[str, ...]] = {
    "T-shirt/top": ("t-shirt", "tee", "crew-neck top", "tank top"),
    "Trouser": ("trousers", "jeans", "chinos", "slim-fit pants"),
    "Pullover": ("pullover", "knit sweater", "jumper", "hoodie"),
    "Dress": ("dress", "midi dress", "summer dress", "wrap dress"),
    "Coat": ("coat", "parka", "trench coat", "padded jacket"),
    "Sandal": ("sandals", "flip-flops", "strappy sandals", "slides"),
    "Shirt": ("shirt", "button-down shirt", "flannel shirt", "oxford shirt"),
    "Sneaker": ("sneakers", "running shoes", "trainers", "canvas sneakers"),
    "Bag": ("bag", "tote bag", "shoulder bag", "backpack"),
    "Ankle boot": ("ankle boots", "chelsea boots", "heeled booties", "leather boots"),
}
_CATALOG_COLOURS = ("black", "white", "navy", "grey", "beige", "red", "olive", "brown")
_CATALOG_MATERIALS = ("cotton", "leather", "wool", "denim", "linen", "polyester", "suede")
_CATALOG_DETAILS = (
    "Regular fit, easy care.",
    "Soft and comfortable for every day.",
    "A classic piece for any wardrobe.",
    "Lightweight and durable.",
    "Machine washable.",
)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (unsigned bytes) into an array of its shape.

    Raises `ValueError` when the magic number, type or size does not match.
    """
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {expected} bytes, file has {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_split(src_dir: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) uint8 and labels (n,) uint8 of one split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_name, labels_name = _FILES[split]
    images = read_idx(src_dir / images_name)
    labels = read_idx(src_dir / labels_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{src_dir}: images {images.shape} and labels {labels.shape} disagree")
    return images, labels


def stratified_indices(labels: np.ndarray, limit: int | None) -> list[int]:
    """Indices of the first `ceil(limit / classes)` rows of every class, in file order.

    With `limit=None` all rows. The classes are balanced in both splits, so the subset
    is balanced too; it is truncated to exactly `limit` rows.
    """
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    if limit <= 0:
        raise ValueError("limit must be positive")
    classes = np.unique(labels)
    per_class = -(-limit // len(classes))
    chosen: list[int] = []
    for cls in classes:
        chosen.extend(np.flatnonzero(labels == cls)[:per_class].tolist())
    chosen.sort()
    # Dropping from the end keeps the per-class counts within one of each other.
    while len(chosen) > limit:
        counts = {int(c): int(np.sum(labels[chosen] == c)) for c in classes}
        biggest = max(counts, key=lambda c: (counts[c], c))
        drop = max(i for i in chosen if labels[i] == biggest)
        chosen.remove(drop)
    return chosen


def listing_text(
    mode: TextMode, category: str, split: str, index: int, rng: random.Random
) -> tuple[str, str]:
    """Title and description for one photo under `mode` (see the module docstring)."""
    if mode == "empty":
        return "", ""
    if mode == "template":
        return f"Product photo #{index:05d}", TEMPLATE_DESCRIPTION
    if mode == "catalog":
        colour = rng.choice(_CATALOG_COLOURS)
        material = rng.choice(_CATALOG_MATERIALS)
        detail = rng.choice(_CATALOG_DETAILS)
        if rng.random() < 0.2:
            return "Fashion item", f"{colour.capitalize()} {material}. {detail}"
        noun = rng.choice(_CATALOG_NOUNS[category])
        return f"{colour.capitalize()} {material} {noun}", f"{detail} Colour: {colour}."
    raise ValueError(f"text_mode must be 'empty', 'template' or 'catalog', got {mode!r}")


def convert_fashion_mnist(
    src_dir: Path,
    out_dir: Path,
    *,
    split: Split = "train",
    limit: int | None = None,
    text_mode: TextMode = "empty",
    seed: int = 0,
) -> Path:
    """Write `out_dir/images/<split>_<index>.png` and `out_dir/<split>.csv`; return the CSV.

    `index` is the row in the IDX file (so photos can be traced back). `limit` keeps a
    balanced subset (`stratified_indices`). The CSV's `image` column is relative to the
    CSV. `seed` only drives the `catalog` text. Raises `FileNotFoundError` when the IDX
    files are missing and `ValueError` for bad arguments or files.
    """
    images, labels = load_split(src_dir, split)
    rows = stratified_indices(labels, limit)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{split}.csv"
    rng = random.Random(seed)
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for index in rows:
            category = CLASS_NAMES[int(labels[index])]
            name = f"{split}_{index:05d}.png"
            Image.fromarray(images[index]).save(image_dir / name, optimize=True)
            title, description = listing_text(text_mode, category, split, index, rng)
            writer.writerow((title, description, f"images/{name}", category))
    return csv_path


def png_base64(pixels: np.ndarray) -> str:
    """A grayscale photo as base64 PNG bytes (what a product-listed event carries)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def demo_events(src_dir: Path, indices: Sequence[int]) -> list[dict[str, object]]:
    """Product-listed events (schemas/avro/product-listed/v1.avsc) from test-split photos.

    One event per index, with catalog-style text and the photo as base64 PNG, then
    three edge cases: text without an image, an image without text, and neither
    (which the categorizer answers with NO_USABLE_INPUT).
    """
    images, labels = load_split(src_dir, "test")
    rng = random.Random(7)
    events: list[dict[str, object]] = []
    base_ms = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    for n, index in enumerate(indices):
        category = CLASS_NAMES[int(labels[index])]
        noun = rng.choice(_CATALOG_NOUNS[category])
        colour = rng.choice(_CATALOG_COLOURS)
        material = rng.choice(_CATALOG_MATERIALS)
        events.append(
            {
                "event_id": f"demo-listing-{n + 1:02d}",
                "occurred_at": base_ms + n * 60_000,
                "product_id": f"FMNIST-T{index:05d}",
                "title": f"{colour.capitalize()} {material} {noun}",
                "description": f"{rng.choice(_CATALOG_DETAILS)} Colour: {colour}.",
                "image": png_base64(images[index]),
                "top_k_tags": 5 if n % 2 == 0 else 3,
            }
        )
    last = indices[-1] if indices else 0
    n = len(events)
    events.append(
        {
            "event_id": f"demo-listing-{n + 1:02d}-text-only",
            "occurred_at": base_ms + n * 60_000,
            "product_id": "DEMO-TEXT-ONLY",
            "title": "Brown suede chelsea boots",
            "description": "Ankle-high boots with elastic side panels. Colour: brown.",
            "image": None,
            "top_k_tags": 5,
        }
    )
    events.append(
        {
            "event_id": f"demo-listing-{n + 2:02d}-image-only",
            "occurred_at": base_ms + (n + 1) * 60_000,
            "product_id": f"FMNIST-T{last + 1:05d}",
            "title": "",
            "description": "",
            "image": png_base64(images[last + 1]),
            "top_k_tags": 5,
        }
    )
    events.append(
        {
            "event_id": f"demo-listing-{n + 3:02d}-no-input",
            "occurred_at": base_ms + (n + 2) * 60_000,
            "product_id": "DEMO-NO-INPUT",
            "title": "",
            "description": "",
            "image": None,
            "top_k_tags": 5,
        }
    )
    return events


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `convert` a split, or write `demo-events` as JSON lines."""
    parser = argparse.ArgumentParser(prog="python -m processors.categorization")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="write PNGs and a training CSV")
    convert.add_argument("--src", type=Path, default=DEFAULT_SRC)
    convert.add_argument("--out", type=Path, required=True)
    convert.add_argument("--split", choices=("train", "test"), default="train")
    convert.add_argument("--limit", type=int, default=None)
    convert.add_argument("--text-mode", choices=("empty", "template", "catalog"), default="empty")
    convert.add_argument("--seed", type=int, default=0)
    demo = sub.add_parser("demo-events", help="write product-listed demo events (JSON lines)")
    demo.add_argument("--src", type=Path, default=DEFAULT_SRC)
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 13, 18, 19, 8])
    args = parser.parse_args(argv)
    if args.command == "convert":
        path = convert_fashion_mnist(
            args.src,
            args.out,
            split=args.split,
            limit=args.limit,
            text_mode=args.text_mode,
            seed=args.seed,
        )
        print(path)
        return 0
    events = demo_events(args.src, args.indices)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for event in events:
            handle.write(json.dumps(event, separators=(",", ":")) + "\n")
    print(f"{len(events)} events -> {args.out}")
    return 0
