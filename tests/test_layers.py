"""Imports point down the layers (docs/architecture.md): config and core (keyed noise, ``Batch``) on the ground
floor, then data / distributed / models, then diffusion, training, variance / generation / experiments, and cli on
top. A module may import its own layer or a lower one, never a higher one (checked on every import statement of
every module, including imports inside functions), and no two modules import each other, directly or through
others."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mdm_scale"
RANK = {"config": 0, "core": 0, "data": 1, "distributed": 1, "models": 1, "diffusion": 2, "training": 3,
        "variance": 4, "generation": 4, "experiments": 4, "cli": 5}


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


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def import_cycles() -> list[list[str]]:
    """Cycles of the module graph (an edge for every mdm_scale import, also inside functions), each once."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    graph = {m: sorted({name for _, name in imported_modules(p) if name in modules and name != m})
             for m, p in modules.items()}
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in path:
                cycle = path[path.index(nxt):]
                start = cycle.index(min(cycle))
                cycle = cycle[start:] + cycle[:start]
                if cycle not in cycles:
                    cycles.append(cycle)
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return cycles


def test_no_import_cycles():
    assert import_cycles() == []


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """Power: a data module importing diffusion, and two data modules importing each other, are both found."""
    import shutil
    import sys

    copy = tmp_path / "mdm_scale"
    shutil.copytree(PACKAGE, copy)
    planted = "from mdm_scale.data.b import f\nfrom mdm_scale.diffusion.objective import take\n"
    (copy / "data" / "a.py").write_text(planted)
    (copy / "data" / "b.py").write_text("def f():\n    from mdm_scale.data.a import take\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    assert any("data imports mdm_scale.diffusion" in p for p in upward_imports())
    assert ["mdm_scale.data.a", "mdm_scale.data.b"] in import_cycles()


def test_relative_imports_are_resolved():
    names = [name for _, name in imported_modules(PACKAGE / "models" / "modeling_mdm.py")]
    assert "mdm_scale.models.configuration_mdm" in names and "mdm_scale.models.masked_head" in names


def documented_floors(page: Path) -> dict[str, int]:
    """``{package: floor}`` from the floors table of ``page`` (rows ``| N | `a`, `b` | ...``)."""
    rows = re.findall(r"^\| (\d) \| ([^|]+) \|", page.read_text(), re.M)
    return {name: int(floor) for floor, names in rows for name in re.findall(r"`(\w+)`", names)}


def test_the_architecture_page_shows_these_floors_and_readme_links_it(tmp_path):
    docs = PACKAGE.parent / "docs" / "architecture.md"
    assert documented_floors(docs) == RANK
    concepts = (PACKAGE.parent / "README.md").read_text().split("## Concepts")[1].split("\n## ")[0]
    assert "(docs/architecture.md)" in concepts
    moved = tmp_path / "page.md"
    moved.write_text(docs.read_text().replace("| 3 | `training` |", "| 2 | `training` |"))
    assert documented_floors(moved) != RANK  # power: a package on the wrong floor is seen
