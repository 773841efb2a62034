"""Imports run one way: semantic IDs -> models -> decoding -> alignment -> RecBole glue.

A module may import from its own layer and the layers below it, never from a layer above. The
package root (`atspeed_rec/__init__.py`) is the entry point and may import anything.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "atspeed_rec"
# low -> high; the top-level modules are the base everything may use
LAYERS = [("errors", "atomic", "compat"), ("semantic_ids",), ("models",), ("decoding",), ("alignment",),
          ("recbole_glue",)]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit_of(module: str) -> str | None:
    """`atspeed_rec.models.lm` -> `models`; None for what is not ours."""
    parts = module.split(".")
    return parts[1] if parts[0] == "atspeed_rec" and len(parts) > 1 else None


def imported_units(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            unit = unit_of(name)
            if unit is not None:
                yield node.lineno, name, unit


def test_every_unit_of_the_package_has_a_layer():
    units = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | \
            {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert units == set(RANK), "add new modules or subpackages to LAYERS"


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_higher_layer(path):
    rel = path.relative_to(PACKAGE)
    own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    upward = [f"line {line}: {name}" for line, name, unit in imported_units(path) if RANK[unit] > RANK[own]]
    assert not upward, f"{rel} ({own}) imports from a higher layer: {upward}"


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from atspeed_rec.recbole_glue.runner import run\n")
    assert [unit for _, _, unit in imported_units(bad)] == ["recbole_glue"]
