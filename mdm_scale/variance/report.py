"""Write the decomposition: ``report.json``, PNG plots and TensorBoard scalars next to it.

- ``<out>``: the JSON report (``{"methods": {name: {"loss": {"A", "B", "C", "total", "direct", ...},
  "grad": {...}, "t_curve": {...}}}, "comparisons": ..., "settings": ...}``);
- ``<stem>_abc_loss.png`` / ``<stem>_abc_grad.png``: stacked A/B/C bars per method, with the directly measured
  total as a marker and 95% intervals;
- ``<stem>_loss_vs_t.png``: mask-mean and mask-variance of the per-sequence loss against t, per method;
- ``<stem>_tensorboard/``: scalars ``variance/<quantity>/<term>/<method>``.
"""

from __future__ import annotations

import json
from pathlib import Path

TERMS = ("A", "B", "C")
COLOURS = {"A": "#4C72B0", "B": "#DD8452", "C": "#55A868"}


def write_report(report: dict, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    written = [out]
    for quantity in ("loss", "grad"):
        if any(quantity in m for m in report["methods"].values()):
            written.append(plot_abc(report, quantity, out.with_name(f"{out.stem}_abc_{quantity}.png")))
    written.append(plot_t_curves(report, out.with_name(f"{out.stem}_loss_vs_t.png")))
    write_tensorboard(report, out.with_name(f"{out.stem}_tensorboard"))
    return written


def markdown_table(report: dict) -> str:
    """One row per (method, quantity): A, B, C, A+B+C, the direct total, and the ratio to standard."""
    lines = ["| method | quantity | A (pattern) | B (rate) | C (data) | A+B+C | direct total | loss mean | "
             "A+B vs standard |", "|---|---|---|---|---|---|---|---|---|"]
    for name, method in report["methods"].items():
        for quantity in ("loss", "grad"):
            if quantity not in method:
                continue
            r = method[quantity]
            ci = r["direct_ci95"]
            ratio = report.get("comparisons", {}).get(quantity, {}).get(name, {}).get("A+B")
            mean = f"{r['mean']:.4g}" if "mean" in r else ""
            lines.append(f"| {name} | {quantity} | {r['A']:.4g} | {r['B']:.4g} | {r['C']:.4g} | {r['total']:.4g} | "
                         f"{r['direct']:.4g} [{ci[0]:.3g}, {ci[1]:.3g}] | {mean} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def plot_abc(report: dict, quantity: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in report["methods"].items() if quantity in m]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 4))
    bottoms = [0.0] * len(names)
    for term in TERMS:
        values = [max(report["methods"][n][quantity][term], 0.0) for n in names]
        ax.bar(names, values, bottom=bottoms, color=COLOURS[term], label=f"({term})")
        bottoms = [b + v for b, v in zip(bottoms, values)]
    direct = [report["methods"][n][quantity]["direct"] for n in names]
    low = [d - report["methods"][n][quantity]["direct_ci95"][0] for n, d in zip(names, direct)]
    high = [report["methods"][n][quantity]["direct_ci95"][1] - d for n, d in zip(names, direct)]
    ax.errorbar(names, direct, yerr=[low, high], fmt="kD", ms=4, capsize=3, label="direct total (95% CI)")
    what = "loss" if quantity == "loss" else f"gradient (sketch d={report['settings']['grad_dim']})"
    ax.set_ylabel("variance per sequence")
    ax.set_title(f"(A) masking pattern, (B) masking rate, (C) data: {what}")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_t_curves(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, method in report["methods"].items():
        curve = method.get("t_curve") or {}
        if curve.get("t"):
            left.plot(curve["t"], curve["loss_mean"], marker="o", ms=3, label=name)
            right.plot(curve["t"], curve["loss_mask_var"], marker="o", ms=3, label=name)
    left.set_xlabel("t")
    left.set_ylabel("mean over masks of l (unweighted)")
    right.set_xlabel("t")
    right.set_ylabel("variance over masks of l")
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_tensorboard(report: dict, directory: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    for name, method in report["methods"].items():
        for quantity in ("loss", "grad"):
            for term in (*TERMS, "total", "direct"):
                if quantity in method:
                    writer.add_scalar(f"variance/{quantity}/{term}/{name}", method[quantity][term], 0)
    writer.close()
