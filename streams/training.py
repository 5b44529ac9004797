"""Builds the categorizer's encoders from settings; used by the CLI, the demo and the worker."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from streams.settings import SAMPLES_DIR, Settings

SAMPLE_TRAINING_CSV = SAMPLES_DIR / "categorization" / "listings.csv"


def build_encoders(settings: Settings, image_encoder: str | None = None) -> tuple[Any, Any]:
    """The text and image encoders the settings name (not loaded yet)."""
    from processors.categorization import (
        ImageEncoderSettings,
        TextEncoder,
        build_image_encoder,
    )

    image = build_image_encoder(
        ImageEncoderSettings(
            name=image_encoder or settings.image_encoder,
            weights_path=settings.resnet50_weights,
            input_size=settings.image_input_size,
        )
    )
    return TextEncoder(), image


def load_categorizer(settings: Settings) -> Any:
    """Load and check the artifacts; raises with a clear message on any mismatch."""
    from processors.categorization import Categorizer

    assert settings.categorizer_artifacts is not None
    text, image = build_encoders(settings)
    return Categorizer.load(settings.categorizer_artifacts, text, image)


def train(
    settings: Settings,
    data_csv: Path,
    out_dir: Path,
    *,
    test_csv: Path | None = None,
    image_encoder: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate; returns the training report as plain data."""
    from processors.categorization import train_categorizer

    text, image = build_encoders(settings, image_encoder)
    report = train_categorizer(
        data_csv, out_dir, text_encoder=text, image_encoder=image, test_csv=test_csv
    )
    return asdict(report) if is_dataclass(report) and not isinstance(report, type) else dict(report)
