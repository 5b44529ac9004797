"""Training on the in-repo sample set, artifacts, and batch categorization.

One training run (250 listings, every sixth of the 300 held out) is shared by the whole module. The
sample set's text is Fashion-MNIST's "catalog" text, which names the class on
purpose: these tests check behaviour, not skill (docs/categorization-eval.md has the
real evaluation).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from processors.categorization import (
    ArtifactError,
    ArtifactMismatchError,
    Categorizer,
    ImageEncoderSettings,
    TextEncoder,
    TrainingDataError,
    TrainingReport,
    build_image_encoder,
    evaluate,
    train_categorizer,
)
from processors.categorization.encoders import ImageEncoder
from processors.errors import ErrorCode, Failure
from processors.gathering import GatherLimits, decode_image
from processors.records import CategoryTag, ProductListing, SourcePosition

from .conftest import SAMPLE_CSV, SAMPLE_DIR, TEST_INPUT_SIZE

REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Trained:
    report: TrainingReport
    artifacts: Path
    test_csv: Path


def _write_csv(path: Path, rows: Sequence[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["title", "description", "image", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _sample_rows() -> list[dict[str, str]]:
    with SAMPLE_CSV.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["image"] = str(SAMPLE_DIR / row["image"])
    return rows


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
) -> Trained:
    base = tmp_path_factory.mktemp("categorizer")
    rows = _sample_rows()
    train_csv = _write_csv(base / "train.csv", [r for i, r in enumerate(rows) if i % 6 != 5])
    test_csv = _write_csv(base / "test.csv", [r for i, r in enumerate(rows) if i % 6 == 5])
    report = train_categorizer(
        train_csv,
        base / "artifacts",
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        test_csv=test_csv,
        progress=False,
    )
    return Trained(report, base / "artifacts", test_csv)


@pytest.fixture(scope="module")
def categorizer(
    trained: Trained, text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> Categorizer:
    return Categorizer.load(trained.artifacts, text_encoder, image_encoder)


def _listing(
    title: str = "", description: str = "", top_k: int = 5, pid: str = "p1"
) -> ProductListing:
    return ProductListing(
        event_id=f"e-{pid}",
        occurred_at_ms=0,
        product_id=pid,
        title=title,
        description=description,
        image=None,
        top_k_tags=top_k,
    )


def _photo(category: str) -> Image.Image:
    row = next(r for r in _sample_rows() if r["category"] == category)
    with Image.open(row["image"]) as image:
        image.load()
    return image


def _predict(
    categorizer: Categorizer,
    listings: Sequence[ProductListing],
    images: Sequence[Image.Image | None],
) -> list[CategoryTag | Failure]:
    keys = [f"key-{i}" for i in range(len(listings))]
    return categorizer.predict_batch(listings, images, idempotency_keys=keys)


def _tag(result: CategoryTag | Failure) -> CategoryTag:
    assert isinstance(result, CategoryTag), result
    return result


def test_training_reports_three_heads_and_writes_artifacts(trained: Trained) -> None:
    report = trained.report
    evaluation = report.evaluation
    assert set(evaluation.heads) == {"image", "text", "combined"}
    assert all(m.n == 50 for m in evaluation.heads.values())
    assert evaluation.majority_baseline == pytest.approx(0.1, abs=0.05)
    assert evaluation.heads["image"].accuracy > 0.5  # 10 classes: chance is 0.1
    assert evaluation.heads["combined"].accuracy >= evaluation.heads["image"].accuracy
    assert re.fullmatch(r"categorizer:\d{8}T\d{6}Z:[0-9a-f]{12}", report.model_version)
    manifest = json.loads((trained.artifacts / "manifest.json").read_text())
    assert manifest["model_version"] == report.model_version
    assert manifest["text_encoder"]["name"] == "all-MiniLM-L6-v2"
    image = manifest["image_encoder"]
    assert (image["name"], image["dim"], image["input_size"]) == (
        "efficientnet-lite0",
        1280,
        TEST_INPUT_SIZE,
    )
    assert manifest["feature_dims"] == {"text": 384, "image": 1280, "combined": 1664}
    assert len(manifest["labels"]) == 10 and manifest["trained_at"].endswith("Z")
    assert manifest["metrics"]["accuracy"]["image"] == round(evaluation.heads["image"].accuracy, 4)
    assert manifest["training"]["train_rows"] == 250
    assert re.fullmatch(r"\d+\.\d+.*", manifest["sklearn_version"])
    png = (trained.artifacts / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert sum(map(sum, evaluation.confusion)) == 50


def test_round_trip_reproduces_the_training_figures(
    trained: Trained, text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> None:
    again = evaluate(
        trained.artifacts,
        trained.test_csv,
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        progress=False,
    )
    assert again.heads == trained.report.evaluation.heads
    assert again.confusion == trained.report.evaluation.confusion


def test_two_loads_predict_identically(
    trained: Trained,
    categorizer: Categorizer,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
) -> None:
    other = Categorizer.load(trained.artifacts, text_encoder, image_encoder)
    listings = [_listing("Navy wool coat", "Warm.", pid="a"), _listing(pid="b")]
    images = [_photo("Coat"), _photo("Bag")]
    assert _predict(categorizer, listings, images) == _predict(other, listings, images)


def test_top_three_sorted_and_probabilities_bounded(categorizer: Categorizer) -> None:
    source = SourcePosition("product-listed", 3, 42)
    result = categorizer.predict_batch(
        [_listing("Black leather ankle boots", "Chelsea style.")],
        [_photo("Ankle boot")],
        idempotency_keys=["k-1"],
        sources=[source],
    )[0]
    tag = _tag(result)
    probs = [c.prob for c in tag.top_categories]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)
    assert sum(probs) <= 1.0 + 1e-9 and all(0.0 <= p <= 1.0 for p in probs)
    assert (tag.category, tag.score) == (tag.top_categories[0].category, probs[0])
    assert tag.category == "Ankle boot"
    assert tag.used_text and tag.used_image
    assert (tag.idempotency_key, tag.source, tag.model_version) == (
        "k-1",
        source,
        categorizer.model_version,
    )
    assert len({c.category for c in tag.top_categories}) == 3


def test_tags_are_top_k_words_of_the_text(categorizer: Categorizer) -> None:
    listings = [
        _listing("Black leather ankle boots", "Machine washable. Colour: black.", top_k=2),
        _listing("Black leather ankle boots", "Machine washable. Colour: black.", top_k=0),
        _listing("Grey wool pullover", "Soft and comfortable for every day.", top_k=50),
    ]
    results = [_tag(r) for r in _predict(categorizer, listings, [None, None, None])]
    assert len(results[0].tags) == 2
    assert results[1].tags == ()
    words = set(re.findall(r"[a-z-]+", "grey wool pullover soft and comfortable for every day"))
    assert results[2].tags and set(results[2].tags) <= words
    assert "and" not in results[2].tags and "for" not in results[2].tags  # stop words
    assert set(results[0].tags) <= {"black", "leather", "ankle", "boots", "machine", "washable"}


def test_text_only_listing_uses_the_text_head(categorizer: Categorizer) -> None:
    tag = _tag(_predict(categorizer, [_listing("Brown suede ankle boots")], [None])[0])
    assert (tag.used_text, tag.used_image) == (True, False)
    assert tag.category == "Ankle boot"


def test_image_only_listing_uses_the_image_head_and_has_no_tags(categorizer: Categorizer) -> None:
    tag = _tag(_predict(categorizer, [_listing()], [_photo("Trouser")])[0])
    assert (tag.used_text, tag.used_image) == (False, True)
    assert tag.tags == ()
    assert tag.category == "Trouser"


def _corrupt_png() -> Image.Image:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 30)).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[:-40]))  # lazily opened, truncated


def test_corrupt_image_falls_back_to_text_or_fails_without_text(categorizer: Categorizer) -> None:
    with_text, without_text = _predict(
        categorizer,
        [_listing("White cotton t-shirt", pid="t"), _listing(pid="n")],
        [_corrupt_png(), _corrupt_png()],
    )
    tag = _tag(with_text)
    assert (tag.used_text, tag.used_image) == (True, False)
    assert isinstance(without_text, Failure)
    assert without_text.code == ErrorCode.NO_USABLE_INPUT and without_text.stage == "categorize"
    assert "did not decode" in without_text.message


def test_no_text_and_no_image_is_no_usable_input(categorizer: Categorizer) -> None:
    results = _predict(
        categorizer,
        [_listing("  ", " ", pid="x"), _listing("Red linen dress", pid="y")],
        [None, None],
    )
    assert isinstance(results[0], Failure)
    assert results[0].code == ErrorCode.NO_USABLE_INPUT
    assert "x" in results[0].message
    assert isinstance(results[1], CategoryTag)


def test_a_one_megabyte_description_is_truncated_and_works(categorizer: Categorizer) -> None:
    huge = "Soft knit pullover in grey wool. " * 32_000
    assert len(huge) > 1_000_000
    started = time.perf_counter()
    tag = _tag(_predict(categorizer, [_listing("Grey wool pullover", huge, top_k=3)], [None])[0])
    assert time.perf_counter() - started < 15
    assert 0 < len(tag.tags) <= 3
    assert set(tag.tags) <= {"soft", "knit", "pullover", "grey", "wool"}


def test_mismatched_encoders_fail_at_load_not_per_event(
    trained: Trained, text_encoder: TextEncoder
) -> None:
    resnet = build_image_encoder(ImageEncoderSettings(name="resnet50"))  # no weights: load fails
    with pytest.raises(ArtifactMismatchError) as error:
        Categorizer.load(trained.artifacts, text_encoder, resnet)
    assert str(error.value) == (
        "artifacts were trained with image encoder efficientnet-lite0 (1280-d) but the worker "
        "is configured with resnet50 (2048-d); retrain or change VS_IMAGE_ENCODER"
    )
    other_size = build_image_encoder(ImageEncoderSettings(input_size=224))
    with pytest.raises(ArtifactMismatchError, match=r"112x112 input .* 224x224"):
        Categorizer.load(trained.artifacts, text_encoder, other_size)
    assert not getattr(other_size, "loaded", True)

    class OtherText(TextEncoder):
        name = "paraphrase-MiniLM-L3-v2"

    with pytest.raises(ArtifactMismatchError, match="text encoder all-MiniLM-L6-v2"):
        Categorizer.load(trained.artifacts, OtherText(), other_size)


def test_changed_or_missing_artifacts_are_refused(
    trained: Trained, tmp_path: Path, text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> None:
    with pytest.raises(ArtifactError, match="train first"):
        Categorizer.load(tmp_path / "none", text_encoder, image_encoder)
    copy = tmp_path / "copy"
    shutil.copytree(trained.artifacts, copy)
    with (copy / "classifier.joblib").open("ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(ArtifactError, match="changed since training"):
        Categorizer.load(copy, text_encoder, image_encoder)
    (copy / "classifier.joblib").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Categorizer.load(copy, text_encoder, image_encoder)


class _BrokenImageEncoder:
    """An image encoder whose forward pass fails for the whole batch."""

    name = "efficientnet-lite0"
    dim = 1280
    input_size = TEST_INPUT_SIZE

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "input_size": self.input_size}

    def load(self) -> None:
        return None

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise RuntimeError("CUDA out of memory (simulated)")


def test_encoder_failure_fails_only_the_listings_that_need_it(
    trained: Trained, text_encoder: TextEncoder
) -> None:
    broken = Categorizer.load(trained.artifacts, text_encoder, _BrokenImageEncoder())
    with_image, text_only = _predict(
        broken,
        [_listing("Beige linen shirt", pid="i"), _listing("Beige linen shirt", pid="t")],
        [_photo("Shirt"), None],
    )
    assert isinstance(with_image, Failure) and with_image.code == ErrorCode.MODEL_FAILED
    assert "out of memory" in with_image.message
    assert _tag(text_only).used_text


def test_misaligned_batch_is_a_programming_error(categorizer: Categorizer) -> None:
    with pytest.raises(ValueError, match="align"):
        categorizer.predict_batch([_listing()], [], idempotency_keys=["k"])


def test_demo_events_are_categorized(categorizer: Categorizer) -> None:
    lines = (REPO / "streams" / "samples" / "product_events.jsonl").read_text().splitlines()
    listings = [ProductListing.from_event(json.loads(line)) for line in lines]
    images = [
        decode_image(base64.b64decode(item.image), GatherLimits()) if item.image else None
        for item in listings
    ]
    results = _predict(categorizer, listings, images)
    failures = [r for r in results if isinstance(r, Failure)]
    assert [f.code for f in failures] == [ErrorCode.NO_USABLE_INPUT]
    tags = {r.product_id: r for r in results if isinstance(r, CategoryTag)}
    assert (tags["DEMO-TEXT-ONLY"].used_text, tags["DEMO-TEXT-ONLY"].used_image) == (True, False)
    image_only = next(t for pid, t in tags.items() if not t.used_text)
    assert image_only.used_image and image_only.tags == ()
    assert tags["FMNIST-T00000"].category == "Ankle boot"
    assert tags["FMNIST-T00002"].category == "Trouser"


def test_image_only_artifacts_categorize_images_and_refuse_bare_text(
    tmp_path: Path, text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> None:
    rows = [dict(r, title="", description="") for r in _sample_rows()[:60]]
    report = train_categorizer(
        _write_csv(tmp_path / "images.csv", rows),
        tmp_path / "art",
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        test_size=0.25,
        progress=False,
    )
    assert set(report.evaluation.heads) == {"image"}
    assert not (tmp_path / "art" / "tfidf.joblib").exists()
    categorizer = Categorizer.load(tmp_path / "art", text_encoder, image_encoder)
    text_only, both = _predict(
        categorizer,
        [_listing("Black leather ankle boots", pid="t"), _listing("Black bag", pid="b")],
        [None, _photo("Bag")],
    )
    assert isinstance(text_only, Failure) and text_only.code == ErrorCode.NO_USABLE_INPUT
    assert "no text head" in text_only.message
    tag = _tag(both)
    assert (tag.used_text, tag.used_image, tag.tags) == (False, True, ())


def test_training_data_errors(
    tmp_path: Path, text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> None:
    url = _write_csv(
        tmp_path / "url.csv",
        [
            {
                "title": "x",
                "description": "",
                "image": "https://cdn.example/x.png",
                "category": "Bag",
            }
        ],
    )
    with pytest.raises(TrainingDataError, match="URL"):
        train_categorizer(
            url, tmp_path / "a", text_encoder=text_encoder, image_encoder=image_encoder
        )
    (tmp_path / "cols.csv").write_text("title,image\nx,y\n")
    with pytest.raises(TrainingDataError, match="lacks columns: category, description"):
        train_categorizer(
            tmp_path / "cols.csv",
            tmp_path / "b",
            text_encoder=text_encoder,
            image_encoder=image_encoder,
        )
