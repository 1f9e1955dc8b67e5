"""The repository stands alone: code, configs and docs cite the paper or the project's own docs (docs/spec.md),
never a file outside the repository that users do not have."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ``../shared/fixtures`` is the one exception: the model-format tests read the upstream fixtures from there when a
# checkout has them, and skip (saying why) when it does not.
OUTSIDE = re.compile(r"(/work/|\.\./shared(?!/fixtures)|shared/paper|\bSPEC\.md|ONLINE_VARIANCE|\bSPEC (section|\d))")
CITED = re.compile(r"docs/spec\.md,? (?:sections? )?(\d+(?:\.\d+)?)((?:(?:,| and|-) ?\d+(?:\.\d+)?)*)")
SCANNED = ("mdm_scale", "tools", "tests", "docs", "configs", "launch")


def outside_references(root: Path = REPO) -> list[str]:
    files = [root / "README.md", root / "pyproject.toml"]
    for folder in SCANNED:
        files += [p for p in (root / folder).rglob("*") if p.suffix in (".py", ".md", ".sh", ".yaml", ".toml")]
    found = []
    for path in files:
        if path.resolve() == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_reference_outside_the_repository():
    assert outside_references() == []


def cited_sections(root: Path = REPO) -> dict[str, str]:
    """Every section number that a file cites as ``docs/spec.md section N`` (or ``sections N and M``, ``N-M``),
    with the first place that cites it."""
    cited = {}
    for folder in ("README.md", *SCANNED):
        for path in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else [root / folder]:
            if path.suffix not in (".py", ".md", ".sh", ".yaml"):
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for m in CITED.finditer(line):
                    for section in [m.group(1), *re.findall(r"\d+(?:\.\d+)?", m.group(2))]:
                        cited.setdefault(section, f"{path.relative_to(root)}:{number}")
    return cited


def test_every_cited_section_of_the_spec_exists():
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (REPO / "docs" / "spec.md").read_text(), re.M))
    missing = {section: where for section, where in cited_sections().items() if section not in headings}
    assert missing == {}, f"docs/spec.md has no heading for these cited sections: {missing}"


def test_the_check_sees_a_planted_reference(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("see SPEC section 3.1\n")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "docs" / "x.md").write_text("notes in /work/shared/paper/ONLINE_VARIANCE.md\n")
    assert len(outside_references(tmp_path)) == 2
