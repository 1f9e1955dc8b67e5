"""Every command the documentation, the scripts and the docstrings show exists as shown: ``mdm-scale`` subcommands
that the parser knows, modules that import (``python -m tools.bench.throughput``), script files that are there;
and what stays in ``tools/`` runs without editing ``sys.path`` (it imports ``tools.*`` as modules)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
from pathlib import Path

from conftest import REPO

CLI = re.compile(r"(?:mdm-scale|-m mdm_scale\.cli|--module mdm_scale\.cli)((?:\s+[a-z][\w-]*){1,2})")
MODULE = re.compile(r"(?:python3?\s+-m|--module)\s+([\w.]+)")
FILE = re.compile(r"(?<![\w/.-])((?:tools|launch|mdm_scale|configs|docs|tests)/[\w/.-]*\w\.(?:py|sh|md|yaml))")
SCRIPT = re.compile(r"python3?\s+(tools/[\w/.-]+\.py)")
PUTS_MUTANTS_FIRST = Path("tools/mutation/check_tests.py")
"""Runs the tests against mutmut's mutated copy of the package: putting that copy first on sys.path is its job."""


def code_of(path: Path) -> list[str]:
    """The code in a file: of a markdown page, fenced and indented blocks and inline code spans; of a Python
    module, the indented (example) lines of its docstrings; of a shell script, its commands and the indented
    (usage) lines of its comments."""
    text = path.read_text()
    if path.suffix == ".py":
        docstrings = [ast.get_docstring(node, clean=False) or "" for node in ast.walk(ast.parse(text))
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        return [line for doc in docstrings for line in doc.splitlines() if line.startswith("    ")]
    if path.suffix == ".sh":
        return [line for line in text.splitlines() if not line.lstrip().startswith("#") or line.startswith("#  ")]
    code, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            code.append(line)
        else:
            code += re.findall(r"`([^`]+)`", line)
    return code


def documents() -> list[Path]:
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "launch").rglob("*.sh")]
    return files + [p for top in ("tools", "mdm_scale") for p in (REPO / top).rglob("*") if p.suffix in (".sh", ".py")]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices if actions else {}


def problems_in(lines: list[str], where: str) -> list[str]:
    from mdm_scale.cli import build_parser

    commands = subcommands(build_parser())
    found = []
    for line in lines:
        for words in CLI.findall(line):
            command, *rest = words.split()
            if command not in commands:
                found.append(f"{where}: mdm-scale {command}: no such command ({line.strip()})")
            elif rest and subcommands(commands[command]) and rest[0] not in subcommands(commands[command]):
                found.append(f"{where}: mdm-scale {command} {rest[0]}: no such subcommand ({line.strip()})")
        for module in MODULE.findall(line):
            if module.startswith(("tools.", "mdm_scale")) and importlib.util.find_spec(module) is None:
                found.append(f"{where}: python -m {module}: no such module")
        found += [f"{where}: {name}: no such file" for name in FILE.findall(line) if not (REPO / name).is_file()]
        for script in SCRIPT.findall(line):
            if (REPO / script).is_file() and "from tools." in (REPO / script).read_text():
                found.append(f"{where}: {script} imports tools.*: run it as python -m {script[:-3].replace('/', '.')}")
    return found


def test_every_shown_command_exists():
    problems = [p for path in documents() for p in problems_in(code_of(path), str(path.relative_to(REPO)))]
    assert problems == []


def sys_path_edits(path: Path) -> list[int]:
    """Lines that change ``sys.path`` (an assignment, an augmented assignment or a method call on it)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        targets = [target] if target is not None else getattr(node, "targets", []) + [getattr(node, "target", None)]
        for t in targets:
            t = t.value if isinstance(t, ast.Subscript) else t
            if isinstance(t, ast.Attribute) and t.attr == "path" and getattr(t.value, "id", None) == "sys":
                lines.append(node.lineno)
    return sorted(lines)


def test_tools_run_without_editing_sys_path():
    edits = [f"{p.relative_to(REPO)}:{line}" for p in sorted((REPO / "tools").rglob("*.py"))
             if p.relative_to(REPO) != PUTS_MUTANTS_FIRST for line in sys_path_edits(p)]
    assert edits == []


def test_the_checks_see_a_missing_command_module_script_and_a_sys_path_edit(tmp_path):
    """Power: each kind of stale reference, and each way of editing sys.path, is found."""
    shown = ["mdm-scale variance summary r.json", "python -m mdm_scale.cli experiment run --out x",
             "mdm-scale nonsense --out x", "mdm-scale experiment walk", "python -m tools.bench.nothing",
             "python tools/experiments/run.py --config c", "python3 tools/bench/throughput.py --gpus 1"]
    assert problems_in(shown, "doc") == [
        "doc: mdm-scale nonsense: no such command (mdm-scale nonsense --out x)",
        "doc: mdm-scale experiment walk: no such subcommand (mdm-scale experiment walk)",
        "doc: python -m tools.bench.nothing: no such module",
        "doc: tools/experiments/run.py: no such file",
        "doc: tools/bench/throughput.py imports tools.*: run it as python -m tools.bench.throughput"]
    script = tmp_path / "s.py"
    script.write_text("import sys\nsys.path.insert(0, 'x')\nsys.path[:0] = ['y']\nsys.path += ['z']\nprint(sys.path)\n")
    assert sys_path_edits(script) == [2, 3, 4]
    page = tmp_path / "p.md"
    page.write_text("Prose: mdm-scale variance reports.\n\n```bash\nmdm-scale a b\n```\n    mdm-scale c\n"
                    "see `mdm-scale d`\n")
    assert code_of(page) == ["mdm-scale a b", "    mdm-scale c", "mdm-scale d"]
    module = tmp_path / "m.py"
    module.write_text('"""mdm-scale runs this:\n\n    mdm-scale a b\n"""\nX = "mdm-scale c"\n')
    assert code_of(module) == ["    mdm-scale a b"]
    shell = tmp_path / "s.sh"
    shell.write_text("# mdm-scale runs this:\n#   mdm-scale a b\nmdm-scale c  # mdm-scale d\n")
    assert code_of(shell) == ["#   mdm-scale a b", "mdm-scale c  # mdm-scale d"]
