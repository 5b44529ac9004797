"""Settings of the review loop (docs/review.md), read with the rest by `Settings.from_env`.

| variable | default | meaning |
| --- | --- | --- |
| `VS_REVIEW_COPIES` | `true` | the inference worker produces review copies of the images |
| `VS_REVIEW_IMAGE_MAX_SIDE` | `512` | long side of a copy, px |
| `VS_REVIEW_IMAGE_MAX_BYTES` | `120000` | bytes per copy (JPEG quality steps down to fit, else none) |
| `VS_REVIEW_RETENTION_DAYS` | `30` | the sink keeps copies this many days |
| `VS_REVIEW_STORE_MAX_MB` | `2048` | size budget of the stored copies; the oldest go first |
| `VS_REVIEW_USERS` | unset | `name:password,name2:password2`: who may use the review page |

Without `VS_REVIEW_USERS` the review page is off (there is no default password). The
passwords never appear in `repr()`, `public()` or logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from processors.review.images import CopyLimits


class ReviewSettingsError(ValueError):
    """A review variable has an unusable value; the message names it (never a password)."""


@dataclass(frozen=True, slots=True)
class ReviewSettings:
    """The review loop's settings; `users` holds (name, password) pairs."""

    copies: bool = True
    copy_limits: CopyLimits = field(default_factory=CopyLimits)
    retention_days: int = 30
    store_max_bytes: int = 2048 * 1024 * 1024
    users: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def page_enabled(self) -> bool:
        """Whether the review page is served: at least one reviewer is configured."""
        return bool(self.users)

    def public(self) -> dict[str, Any]:
        """For the info page: reviewer names, never passwords."""
        return {
            "copies": self.copies,
            "image_max_side": self.copy_limits.max_side,
            "image_max_bytes": self.copy_limits.max_bytes,
            "retention_days": self.retention_days,
            "store_max_bytes": self.store_max_bytes,
            "reviewers": [name for name, _ in self.users],
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReviewSettings:
        """Read the `VS_REVIEW_*` variables; raises `ReviewSettingsError` naming a bad one."""
        default = cls()

        def integer(name: str, fallback: int, low: int) -> int:
            raw = env.get(name, "")
            if not raw:
                return fallback
            try:
                value = int(raw)
            except ValueError:
                raise ReviewSettingsError(f"{name} must be an integer, got {raw!r}") from None
            if value < low:
                raise ReviewSettingsError(f"{name} must be at least {low}, got {value}")
            return value

        copies_raw = env.get("VS_REVIEW_COPIES", "").strip().lower()
        if copies_raw not in {"", "1", "0", "true", "false", "yes", "no", "on", "off"}:
            raise ReviewSettingsError(f"VS_REVIEW_COPIES must be true or false, got {copies_raw!r}")
        try:
            limits = CopyLimits(
                max_side=integer("VS_REVIEW_IMAGE_MAX_SIDE", default.copy_limits.max_side, 16),
                max_bytes=integer("VS_REVIEW_IMAGE_MAX_BYTES", default.copy_limits.max_bytes, 1024),
            )
        except ValueError as exc:
            raise ReviewSettingsError(f"VS_REVIEW_IMAGE_*: {exc}") from None
        return cls(
            copies=copies_raw in {"", "1", "true", "yes", "on"},
            copy_limits=limits,
            retention_days=integer("VS_REVIEW_RETENTION_DAYS", default.retention_days, 1),
            store_max_bytes=integer("VS_REVIEW_STORE_MAX_MB", 2048, 1) * 1024 * 1024,
            users=parse_users(env.get("VS_REVIEW_USERS", "")),
        )


def parse_users(raw: str) -> tuple[tuple[str, str], ...]:
    """`name:password` pairs separated by commas; raises `ReviewSettingsError` (no secrets)."""
    users: list[tuple[str, str]] = []
    for number, part in enumerate(filter(None, (p.strip() for p in raw.split(","))), start=1):
        name, sep, password = part.partition(":")
        name = name.strip()
        if not sep or not name or not password:
            raise ReviewSettingsError(f"VS_REVIEW_USERS: entry {number} is not name:password")
        if not all(c.isalnum() or c in "._-@" for c in name) or len(name) > 64:
            raise ReviewSettingsError(f"VS_REVIEW_USERS: entry {number} has an unusable name")
        if len(password) < 8:
            raise ReviewSettingsError(
                f"VS_REVIEW_USERS: the password of {name!r} is shorter than 8 characters"
            )
        users.append((name, password))
    return tuple(users)
