"""``mdm-scale variance summary``: A/B/C variance shares of ``mdm-scale variance measure`` reports, and whether
MIRROR and P-POTS pay (docs/results.md).

    mdm-scale variance summary results/families/sort/variance/step_*.json

Per report and quantity (loss; gradient sketch, squared norms) one markdown row, from the ``standard`` and
``mirror`` / ``ppots`` entries (docs/spec.md sections 2 and 2.2):

- V = A + B + C of one standard row, and the shares A/V (mask), B/V (rate), C/V (data);
- MIRROR's pair mean has mask variance (A + K)/2 (the tool's ``mirror`` A), so the antithetic covariance is
  K = 2 A_mirror - A and the pair's half squared difference is E[(L1 - L2)^2]/2 = A - K;
- **MIRROR pays at equal rows** iff A - K > V (two rows of one sequence beat two independent sequences); the
  ratios give the variance of a step against Standard: ``mirror / standard`` at equal batch (same sequences,
  twice the rows) and ``2 x mirror / standard`` at equal rows (half the sequences);
- ``ppots / standard``: P-POTS's variance at no extra compute (below 1: it pays).
"""

from __future__ import annotations

import json
from pathlib import Path


def rule(report: dict, quantity: str) -> dict[str, float] | None:
    """The row's numbers for one quantity, or None when the report lacks standard or mirror."""
    methods = report["methods"]
    if quantity not in methods.get("standard", {}) or quantity not in methods.get("mirror", {}):
        return None
    std, mirror = methods["standard"][quantity], methods["mirror"][quantity]
    v = std["total"]
    k = 2 * mirror["A"] - std["A"]
    row = {"V": v, "A/V": std["A"] / v, "B/V": std["B"] / v, "C/V": std["C"] / v, "A-K": std["A"] - k,
           "mirror/std, equal batch": mirror["total"] / v, "mirror/std, equal rows": 2 * mirror["total"] / v}
    if quantity in methods.get("ppots", {}):
        row["ppots/std"] = methods["ppots"][quantity]["total"] / v
    return row


def summary_table(paths: list[Path]) -> str:
    """One markdown row per report and quantity that has both a standard and a mirror entry."""
    lines = ["| report | quantity | V | A/V | B/V | C/V | E[(L1-L2)^2]/2 | MIRROR pays at equal rows "
             "| MIRROR/Standard, equal batch | MIRROR/Standard, equal rows | P-POTS/Standard |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        report = json.loads(path.read_text())
        for quantity in ("loss", "grad"):
            r = rule(report, quantity)
            if r is None:
                continue
            pays = "yes" if r["A-K"] > r["V"] else "no"
            ppots = f"{r['ppots/std']:.2f}" if "ppots/std" in r else "–"
            lines.append(f"| {path} | {quantity} | {r['V']:.4g} | {r['A/V']:.2f} | {r['B/V']:.2f} | {r['C/V']:.2f} | "
                         f"{r['A-K']:.4g} | {pays} | {r['mirror/std, equal batch']:.2f} | "
                         f"{r['mirror/std, equal rows']:.2f} | {ppots} |")
    return "\n".join(lines)
