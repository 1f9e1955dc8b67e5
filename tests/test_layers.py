"""Imports point down the layers: config -> data/diffusion/distributed/models -> training -> variance/generation
-> cli. A module may import its own layer or a lower one, never a higher one (checked on every import
statement of every module, including imports inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mdm_scale"
RANK = {"config": 0, "data": 1, "diffusion": 1, "distributed": 1, "models": 1, "training": 2, "variance": 3,
        "generation": 3, "cli": 4}


def layer(module: str) -> str:
    """``mdm_scale.models.loading`` -> ``models``; ``mdm_scale.cli`` -> ``cli``."""
    return module.split(".")[1]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every mdm_scale import in the file (relative ones resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
    return [(line, name) for line, name in found if name.startswith("mdm_scale.")]


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module in ("mdm_scale.__init__", "mdm_scale.__main__"):
            continue
        assert layer(module) in RANK, f"{path}: add its package to RANK in {__file__}"
        for line, name in imported_modules(path):
            if RANK[layer(name)] > RANK[layer(module)]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {layer(module)} imports {name} "
                                f"(layer {layer(name)} is above it)")
    return problems


def test_every_import_points_down_the_layers():
    assert upward_imports() == []


def test_relative_imports_are_resolved():
    names = [name for _, name in imported_modules(PACKAGE / "models" / "modeling_mdm.py")]
    assert "mdm_scale.models.configuration_mdm" in names and "mdm_scale.models.masked_head" in names
