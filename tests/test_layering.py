"""The import graph points one way: `streams` -> `processors` -> `schemas`.

Parsed from the source with `ast` (no import runs), so a violation is found even in a
module that no test imports. `processors` and `schemas` never import faust or the
Faust app; `bench` may use `processors` but not `streams` (the CLI's `bench-vlm` command
runs it, so `streams` may import `bench`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("streams", "processors", "schemas", "bench")

#: For each package, the first-party packages (and third-party roots) it must not import.
FORBIDDEN: dict[str, set[str]] = {
    "streams": set(),
    "processors": {"streams", "bench", "faust", "mode"},
    "schemas": {"streams", "processors", "bench", "faust", "mode"},
    "bench": {"streams", "faust"},
}


def imported_roots(path: Path) -> set[tuple[str, int]]:
    """Top-level names of every absolute import in `path`, with the line of each."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def violations(package: str) -> list[str]:
    """`file:line imports X` for every forbidden import under `package`."""
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for root, line in sorted(imported_roots(path)):
            if root in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {root}")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package: str) -> None:
    assert (REPO / package / "__init__.py").is_file()
    assert violations(package) == []


def test_a_planted_upward_import_is_found(tmp_path: Path) -> None:
    planted = tmp_path / "upward.py"
    planted.write_text("import os\nfrom streams.settings import Settings\nimport faust.types\n")
    roots = {root for root, _ in imported_roots(planted)}
    assert {"streams", "faust"} <= roots
    assert not roots & {"processors", "schemas"}
    assert roots & FORBIDDEN["processors"] == {"streams", "faust"}


def analytics_imports(path: Path) -> set[str]:
    """The `processors.analytics` modules `path` imports from, by their last name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "processors.analytics":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "processors.analytics."
        ):
            found.add(str(node.module).rsplit(".", 1)[1])
    return found


def test_reports_use_only_the_client_and_the_migrations_of_the_analytics_package() -> None:
    assert analytics_imports(REPO / "processors" / "analytics" / "reports.py") == {
        "client",
        "migrations",
    }


def test_topics_map_to_contracts_in_one_module() -> None:
    defining = sorted(
        str(path.relative_to(REPO))
        for package in ("streams", "processors")
        for path in (REPO / package).rglob("*.py")
        if "def schema_of(" in path.read_text(encoding="utf-8")
    )
    assert defining == ["processors/contracts.py"]
