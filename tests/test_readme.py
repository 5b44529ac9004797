"""The README matches the code: error codes, settings and report names."""

from __future__ import annotations

import re
from pathlib import Path

from processors.analytics.reports import list_reports
from processors.errors import ErrorCode

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
SETTINGS_SOURCE = (Path(__file__).resolve().parents[1] / "streams" / "settings.py").read_text()


def test_error_code_table_matches_the_enum() -> None:
    rows = re.findall(r"^\| (\d{4}) \| ([A-Z0-9_]+) \|", README, flags=re.MULTILINE)
    assert {int(code): name for code, name in rows} == {int(c): c.name for c in ErrorCode}


def test_every_setting_is_documented() -> None:
    variables = set(re.findall(r'"(VS_[A-Z0-9_]+)"', SETTINGS_SOURCE))
    variables |= {f"VS_TOPIC_{name}" for name in ["PICKUP_COMPLETED", "DEAD_LETTER"]}
    missing = sorted(v for v in variables if v not in README)
    assert not missing, f"settings missing from the README: {missing}"


def test_every_report_is_documented() -> None:
    missing = [name for name in list_reports() if f"`{name}`" not in README]
    assert not missing


def test_no_placeholder_is_left() -> None:
    assert "PENDING" not in README
