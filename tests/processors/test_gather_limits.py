"""`GatherLimits` refuses limits that could never be met."""

from __future__ import annotations

import pytest

from processors.gather_limits import DEFAULT_IMAGE_FORMATS, GatherLimits


@pytest.mark.parametrize(
    "field", ["max_image_bytes", "connect_timeout_s", "total_timeout_s", "max_pixels"]
)
def test_a_limit_that_is_not_positive_is_refused_by_name(field: str) -> None:
    with pytest.raises(ValueError, match=f"GatherLimits.{field} must be positive"):
        GatherLimits(**{field: 0})  # type: ignore[arg-type]


def test_negative_retries_and_an_empty_format_list_are_refused() -> None:
    with pytest.raises(ValueError, match="retries"):
        GatherLimits(retries=-1)
    with pytest.raises(ValueError, match="image_formats"):
        GatherLimits(image_formats=())
    assert GatherLimits().image_formats == DEFAULT_IMAGE_FORMATS
