"""Encoders: shapes, determinism, preprocessing, truncation and load-time errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from processors.categorization import (
    EncoderLoadError,
    ImageEncoderSettings,
    ResNet50Encoder,
    TextEncoder,
    TextEncoderSettings,
    build_image_encoder,
)
from processors.categorization.encoders import (
    TEXT_MODEL_MAX_CHARS,
    EfficientNetLite0Encoder,
    ImageEncoder,
    compose_text,
    square_resize,
)

from .conftest import SAMPLE_DIR


def _loaded(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
    return image


def _photos() -> list[Image.Image]:
    paths = sorted((SAMPLE_DIR / "images").glob("*.png"))[:3]
    grey = [_loaded(p) for p in paths]
    wide = Image.new("RGBA", (60, 20), (255, 255, 255, 255))
    wide.paste((200, 10, 10, 255), (20, 5, 40, 15))
    return [*grey, wide]


def test_text_embeddings_have_384_dims_are_normalized_and_repeatable(
    text_encoder: TextEncoder,
) -> None:
    texts = ["Black leather ankle boots", "", "Navy cotton t-shirt. Machine washable."]
    first = text_encoder.encode(texts)
    second = text_encoder.encode(list(reversed(texts)))[::-1]
    assert first.shape == (3, 384) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.allclose(first, second, atol=1e-6)
    assert np.array_equal(first, text_encoder.encode(texts))
    similar = float(first[0] @ text_encoder.encode(["brown suede chelsea boots"])[0])
    unrelated = float(first[2] @ text_encoder.encode(["brown suede chelsea boots"])[0])
    assert similar > unrelated


def test_huge_text_is_cut_before_tokenizing(text_encoder: TextEncoder) -> None:
    huge = "Soft wool pullover with ribbed cuffs. " * 30_000  # about 1 MB
    started = time.perf_counter()
    embedding = text_encoder.encode([huge])
    assert time.perf_counter() - started < 10
    assert np.array_equal(embedding, text_encoder.encode([huge[:TEXT_MODEL_MAX_CHARS]]))


def test_compose_text_joins_and_strips() -> None:
    assert compose_text("  Red dress ", " Summer  ") == "Red dress Summer"
    assert compose_text("", "  ") == ""


def test_image_features_shape_and_determinism(image_encoder: ImageEncoder) -> None:
    photos = _photos()
    features = image_encoder.encode(photos)
    assert features.shape == (4, 1280) and features.dtype == np.float32
    assert np.array_equal(features, image_encoder.encode(photos))
    single = image_encoder.encode(photos[:1])
    assert np.allclose(single[0], features[0], atol=1e-4)
    assert not np.allclose(features[0], features[1])


def test_efficientnet_uses_tf_scaling_not_imagenet() -> None:
    encoder = EfficientNetLite0Encoder(ImageEncoderSettings(input_size=32))
    grey = encoder.preprocess(
        [Image.new("L", (8, 8), 127), Image.new("RGB", (8, 8), (255, 0, 255))]
    )
    assert grey.shape == (2, 3, 32, 32) and grey.dtype == np.float32
    assert np.all(grey[0] == 0.0)
    assert np.allclose(grey[1, 0], 128 / 128) and np.allclose(grey[1, 1], -127 / 128)


def test_square_resize_pads_with_the_corner_colour() -> None:
    image = Image.new("RGB", (40, 10), (250, 250, 250))
    image.paste((0, 0, 0), (10, 2, 30, 8))
    out = square_resize(image, 32)
    assert out.size == (32, 32) and out.mode == "RGB"
    assert out.getpixel((0, 0)) == (250, 250, 250)
    assert out.getpixel((16, 16)) == (0, 0, 0)
    assert out.getpixel((16, 2)) == (250, 250, 250)  # padding above the item


def test_encode_before_load_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="load"):
        EfficientNetLite0Encoder().encode([Image.new("RGB", (8, 8))])
    with pytest.raises(RuntimeError, match="load"):
        TextEncoder().encode(["x"])


def test_resnet50_without_weights_fails_clearly_at_load() -> None:
    encoder = build_image_encoder(ImageEncoderSettings(name="resnet50"))
    assert (encoder.name, encoder.dim) == ("resnet50", 2048)
    with pytest.raises(EncoderLoadError, match="local weights file"):
        encoder.load()
    missing = ResNet50Encoder(ImageEncoderSettings(name="resnet50", weights_path=Path("/nope.pt")))
    with pytest.raises(EncoderLoadError, match="not found"):
        missing.load()


def test_resnet50_loads_a_local_state_dict(tmp_path: Path) -> None:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    path = tmp_path / "resnet50.pt"
    torch.save(resnet50(weights=None).state_dict(), path)
    encoder = ResNet50Encoder(
        ImageEncoderSettings(name="resnet50", weights_path=path, input_size=64)
    )
    encoder.load()
    features = encoder.encode(_photos()[:2])
    assert features.shape == (2, 2048)
    assert np.array_equal(features, encoder.encode(_photos()[:2]))


def test_resnet50_rejects_a_wrong_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    encoder = ResNet50Encoder(ImageEncoderSettings(name="resnet50", weights_path=path))
    with pytest.raises(EncoderLoadError, match="cannot load resnet50"):
        encoder.load()


def test_unknown_image_encoder_and_bad_text_model_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown image encoder"):
        build_image_encoder(ImageEncoderSettings(name="vit"))
    with pytest.raises(EncoderLoadError, match="no sentence-transformers model"):
        TextEncoder(TextEncoderSettings(model_path=tmp_path)).load()
