"""Fashion-MNIST conversion, the in-repo sample set and the demo events."""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from processors.categorization import FASHION_MNIST_CLASSES, convert_fashion_mnist
from processors.categorization.fashion_mnist import (
    DEFAULT_SRC,
    TEMPLATE_DESCRIPTION,
    read_idx,
    stratified_indices,
)
from processors.records import ProductListing

from .conftest import SAMPLE_CSV

REPO = Path(__file__).resolve().parents[3]
CLASS_WORDS = {
    "t-shirt", "shirt", "top", "trouser", "pullover", "dress", "coat", "sandal", "sneaker",
    "bag", "boot", "ankle",
}  # fmt: skip


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_src(tmp_path: Path) -> Path:
    """A 20-photo 'train' split in IDX format: two photos per class, labels shuffled."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), 2))
    images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    _write_idx(src / "train-images-idx3-ubyte.gz", images)
    _write_idx(src / "train-labels-idx1-ubyte.gz", labels)
    return src


def test_read_idx_round_trip_and_errors(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    _write_idx(tmp_path / "ok.gz", array)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), array)
    with gzip.open(tmp_path / "magic.gz", "wb") as handle:
        handle.write(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "magic.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x00\x00")
    with pytest.raises(ValueError, match="header says 5 bytes"):
        read_idx(tmp_path / "short.gz")


def test_stratified_limit_is_balanced() -> None:
    labels = np.array([i % 10 for i in range(200)])
    chosen = stratified_indices(labels, 25)
    assert len(chosen) == 25 and chosen == sorted(chosen)
    counts = np.bincount(labels[chosen], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert stratified_indices(labels, None) == list(range(200))


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _image(path: Path) -> Image.Image:
    """The image at `path`, decoded and its file closed."""
    with Image.open(path) as image:
        image.load()
    return image


def test_convert_template_text_never_names_the_class(fake_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    csv_path = convert_fashion_mnist(fake_src, out, split="train", limit=10, text_mode="template")
    rows = _csv_rows(csv_path)
    assert list(rows[0]) == ["title", "description", "image", "category"]
    assert sorted(r["category"] for r in rows) == sorted(FASHION_MNIST_CLASSES)
    images = read_idx(fake_src / "train-images-idx3-ubyte.gz")
    for row in rows:
        index = int(row["image"].split("_")[1].split(".")[0])
        assert row["title"] == f"Product photo #{index:05d}"
        assert row["description"] == TEMPLATE_DESCRIPTION
        words = set(f"{row['title']} {row['description']}".lower().replace(".", "").split())
        assert not words & CLASS_WORDS
        assert np.array_equal(np.asarray(_image(out / row["image"])), images[index])


def test_convert_empty_and_catalog_modes(fake_src: Path, tmp_path: Path) -> None:
    empty = convert_fashion_mnist(fake_src, tmp_path / "e", split="train", text_mode="empty")
    rows = _csv_rows(empty)
    assert len(rows) == 20 and all(r["title"] == r["description"] == "" for r in rows)
    catalog = convert_fashion_mnist(fake_src, tmp_path / "c", split="train", text_mode="catalog")
    rows = _csv_rows(catalog)
    named = [r for r in rows if r["title"] != "Fashion item"]
    assert named and all(r["title"] and r["description"] for r in rows)
    with pytest.raises(ValueError, match="text_mode"):
        convert_fashion_mnist(fake_src, tmp_path / "x", text_mode="leaky")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        convert_fashion_mnist(tmp_path / "nowhere", tmp_path / "y")


@pytest.mark.skipif(not DEFAULT_SRC.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_convert_the_installed_test_split(tmp_path: Path) -> None:
    csv_path = convert_fashion_mnist(DEFAULT_SRC, tmp_path, split="test", limit=20)
    rows = _csv_rows(csv_path)
    assert len(rows) == 20
    assert {r["category"] for r in rows} == set(FASHION_MNIST_CLASSES)
    assert rows[0] == {
        "title": "",
        "description": "",
        "image": "images/test_00000.png",
        "category": "Ankle boot",
    }


def test_sample_set_is_small_balanced_and_readable() -> None:
    rows = _csv_rows(SAMPLE_CSV)
    assert len(rows) == 300
    counts = {c: sum(r["category"] == c for r in rows) for c in FASHION_MNIST_CLASSES}
    assert set(counts.values()) == {30}
    total = sum(p.stat().st_size for p in SAMPLE_CSV.parent.rglob("*") if p.is_file())
    assert total < 1_000_000
    assert _image(SAMPLE_CSV.parent / rows[0]["image"]).size == (28, 28)


def test_demo_events_follow_the_product_listed_contract() -> None:
    path = REPO / "streams" / "samples" / "product_events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert 6 <= len(events) <= 10
    schema = json.loads((REPO / "schemas/avro/product-listed/v1.avsc").read_text())
    fields = {f["name"] for f in schema["fields"]}
    for event in events:
        assert set(event) == fields
        listing = ProductListing.from_event(event)
        if listing.image is not None:
            photo = Image.open(io.BytesIO(base64.b64decode(listing.image, validate=True)))
            assert photo.format == "PNG" and photo.size == (28, 28)
    assert len({e["event_id"] for e in events}) == len(events)
    assert any(e["image"] is None and e["title"] for e in events)
    assert any(e["image"] and not e["title"] and not e["description"] for e in events)
