"""Encoders loaded once per test session (loading MiniLM and EfficientNet takes seconds).

The image encoder runs at 112x112 in these tests: the code path is the production one
(only the resize target differs) and embedding is four times cheaper on CI's 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.categorization import (
    ImageEncoderSettings,
    TextEncoder,
    build_image_encoder,
)
from processors.categorization.encoders import ImageEncoder

SAMPLE_DIR = Path(__file__).resolve().parents[3] / "streams" / "samples" / "categorization"
SAMPLE_CSV = SAMPLE_DIR / "listings.csv"
TEST_INPUT_SIZE = 112


@pytest.fixture(scope="session")
def text_encoder() -> TextEncoder:
    encoder = TextEncoder()
    encoder.load()
    return encoder


@pytest.fixture(scope="session")
def image_encoder() -> ImageEncoder:
    encoder = build_image_encoder(ImageEncoderSettings(input_size=TEST_INPUT_SIZE, batch_size=64))
    encoder.load()
    return encoder
