"""The package's import graph: layered inside, one public surface outside.

Parsed with `ast` (no import runs). Inside `processors/internvl/` a module imports only
the modules below it in `LAYERS`; everywhere else (`processors`, `streams`, `bench`,
`tests`) code imports `processors.internvl` itself, never a submodule, so the
`__all__` of `processors/internvl/__init__.py` is the whole public surface.
"""

from __future__ import annotations

import ast
from pathlib import Path

import processors.internvl

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "processors" / "internvl"
LAYERS = (
    "config",
    "cuda",
    "decode_attention_kernels",
    "decode_attention",
    "chat",
    "checkpoint",
    "convert",
    "vision",
    "fused",
    "decoder",
    "base",
    "engines",
)


def internvl_imports(path: Path) -> set[str]:
    """Every `processors.internvl...` module that `path` imports (absolute imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name for name in names if name.startswith("processors.internvl"))
    return found


def test_every_module_is_layered() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)


def test_modules_import_only_lower_layers() -> None:
    bad: list[str] = []
    for rank, name in enumerate(LAYERS):
        allowed = {f"processors.internvl.{lower}" for lower in LAYERS[:rank]}
        imported = internvl_imports(PACKAGE / f"{name}.py")
        bad.extend(f"{name} imports {target}" for target in sorted(imported - allowed))
    assert bad == []


def test_outside_code_imports_the_public_surface_only() -> None:
    bad: list[str] = []
    for root in ("processors", "streams", "bench", "tests"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path.is_relative_to(PACKAGE):
                continue
            for target in sorted(internvl_imports(path) - {"processors.internvl"}):
                bad.append(f"{path.relative_to(REPO)} imports {target}")
    assert bad == []


def test_the_public_surface_resolves() -> None:
    surface = processors.internvl.__all__
    assert len(surface) == len(set(surface))
    missing = [name for name in surface if not hasattr(processors.internvl, name)]
    assert missing == []
    assert "NativeInternVLEngine" in surface and "StaticGreedyDecoder" in surface


def test_a_planted_submodule_import_is_found(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("from processors.internvl.engines import create_engine\n")
    assert internvl_imports(planted) == {"processors.internvl.engines"}
