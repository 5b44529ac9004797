"""The review loop's settings: reviewers from VS_REVIEW_USERS, limits, and no secret leaks."""

from __future__ import annotations

import pytest

from streams.settings import Settings, SettingsError


def test_reviewers_are_read_and_passwords_never_shown() -> None:
    settings = Settings.from_env(
        {
            "VS_REVIEW_USERS": "alice:first-secret, bob:second-secret",
            "VS_REVIEW_RETENTION_DAYS": "7",
        }
    )
    assert settings.review.users == (("alice", "first-secret"), ("bob", "second-secret"))
    assert settings.review.page_enabled and settings.review.retention_days == 7
    shown = repr(settings) + repr(settings.review) + str(settings.public())
    assert "first-secret" not in shown and "second-secret" not in shown
    assert settings.public()["review"]["reviewers"] == ["alice", "bob"]


def test_no_reviewers_no_page_and_copies_by_default() -> None:
    review = Settings.from_env({}).review
    assert not review.page_enabled and review.users == ()
    assert review.copies and review.copy_limits.max_side == 512 and review.retention_days == 30
    assert not Settings.from_env({"VS_REVIEW_COPIES": "off"}).review.copies


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VS_REVIEW_USERS": "alice"}, "entry 1 is not name:password"),
        ({"VS_REVIEW_USERS": "alice:short"}, "shorter than 8"),
        ({"VS_REVIEW_USERS": "a b:long-enough-pw"}, "unusable name"),
        ({"VS_REVIEW_RETENTION_DAYS": "0"}, "VS_REVIEW_RETENTION_DAYS must be at least 1"),
        ({"VS_REVIEW_IMAGE_MAX_SIDE": "big"}, "VS_REVIEW_IMAGE_MAX_SIDE must be an integer"),
        ({"VS_REVIEW_COPIES": "maybe"}, "VS_REVIEW_COPIES must be true or false"),
    ],
)
def test_bad_values_name_the_variable_and_hide_the_password(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message) as raised:
        Settings.from_env(env)
    assert "long-enough-pw" not in str(raised.value)
