"""The experiment report in the form of the paper's Table 1 (docs/spec.md section 6.1), with the compute each row spent.

One row per method and micro-batch (``harness.py``'s ``Entry``: a run both protocols asked for is one row):

- ``results.md``: the accuracy (%) of every seed, mean, sample standard deviation (n - 1), worst and best run;
  the gain of the mean over Standard at equal batch (Standard's row with the same sequences per micro-batch)
  and at equal compute (Standard's row with the same forward rows per micro-batch: Standard 2x for MIRROR at
  equal batch); the paper's check "the worst run is at least the best run of every baseline row at equal batch
  or equal compute"; and the mean forward rows, non-pad tokens and model FLOPs (``mdm_scale/models/flops.py``)
  a run of the row spent in training (the trainer's final summary);
- ``results.csv``: one line per finished run;
- ``results.png``: accuracy per seed, training loss per step, and the held-out loss (the trainer's periodic
  ``eval/loss``) against training FLOPs, one curve per row: the mean over seeds and a band from the lowest to
  the highest seed. Curves come from the runs' TensorBoard event files, or else from the console lines of
  their ``train.log``.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np

LOG_LINE = re.compile(r"^\[(train|eval|variance) step (\d+)\] (.*)$", re.MULTILINE)
NUMBER = r"-?(?:[0-9.eE+-]+|nan|inf)"
LOG_VALUE = re.compile(rf"(\w+)=({NUMBER})(?: \[({NUMBER}), ({NUMBER})\])?")
"""``key=value``, or ``key=value [lo, hi]`` for an estimate with its interval (``training/metrics.py``)."""
CSV_FIELDS = ["label", "method", "micro_batch", "protocols", "seed", "accuracy", "correct", "total", "no_answer",
              "eval_loss", "steps", "rows", "tokens", "flops", "train_seconds", "wall_seconds"]


def load_results(groups) -> list[tuple[object, dict[int, dict]]]:
    """``[(entry, {seed: result})]`` of the finished runs of each ``(entry, runs)`` group."""
    return [(entry, {run.seed: json.loads(run.result_file.read_text()) for run in runs if run.result_file.is_file()})
            for entry, runs in groups]


def summarize(accuracies: list[float]) -> dict[str, float | None]:
    """Mean, sample sd (None for fewer than 2 runs), worst and best of accuracies in %."""
    if not accuracies:
        return {"mean": None, "sd": None, "worst": None, "best": None}
    return {"mean": statistics.fmean(accuracies),
            "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "worst": min(accuracies), "best": max(accuracies)}


def worst_vs_best(method_acc: list[float], baselines: dict[str, list[float]]) -> str:
    """The paper's check for one row against every baseline row that has runs."""
    if not method_acc or not baselines:
        return "n/a"
    worst = min(method_acc)
    failed = [f"{name} best {max(acc):.2f} > {worst:.2f}" for name, acc in baselines.items() if max(acc) > worst]
    return "yes" if not failed else "no (" + "; ".join(failed) + ")"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _sci(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.3g}" if values else "–"


def markdown_table(results: list[tuple[object, dict[int, dict]]], seeds: list[int], baselines: list[str],
                   unavailable: dict[str, str]) -> str:
    acc = {entry.label: [100 * r[s]["accuracy"] for s in seeds if s in r] for entry, r in results}
    mean = {label: summarize(values)["mean"] for label, values in acc.items()}

    def standard(entry, field: str) -> float | None:
        """The mean accuracy of the other Standard row with the entry's ``micro`` (equal batch) or ``rows``."""
        return next((mean[e.label] for e, _ in results if e.method == "standard" and e is not entry
                     and getattr(e, field) == getattr(entry, field)), None)

    header = ["Method", "protocols", "sequences / micro", "rows / micro", *(f"seed {s}" for s in seeds), "mean",
              "sd", "worst", "best", "Δ vs Standard, equal batch", "Δ vs Standard, equal compute",
              "worst run ≥ best baseline run", "rows / run", "tokens / run", "FLOPs / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry, runs in results:
        stats = summarize(acc[entry.label])
        gains = [None if ref is None or stats["mean"] is None else stats["mean"] - ref
                 for ref in (standard(entry, "micro"), standard(entry, "rows"))]
        peers = {e.label: acc[e.label] for e, _ in results if e.method in baselines and e is not entry
                 and acc[e.label] and (e.micro == entry.micro or e.rows == entry.rows)}
        check = "(baseline)" if entry.method in baselines else worst_vs_best(acc[entry.label], peers)
        cells = [entry.label, ", ".join(entry.protocols), str(entry.micro), str(entry.rows),
                 *(_fmt(100 * runs[s]["accuracy"]) if s in runs else "–" for s in seeds),
                 *(_fmt(stats[k]) for k in ("mean", "sd", "worst", "best")),
                 *("–" if g is None else f"{g:+.2f}" for g in gains), check,
                 *(_sci([r.get(k) for r in runs.values()]) for k in ("rows", "tokens", "flops"))]
        lines.append("| " + " | ".join(cells) + " |")
    text = ("Exact-match accuracy (%) per training seed; sd is the sample standard deviation over seeds. Equal "
            "batch: Standard with the same sequences per micro-batch; equal compute: Standard with the same forward "
            "rows per micro-batch. Rows, tokens (non-pad, both MIRROR rows) and model FLOPs (6N + 12 l d T per "
            "token) are a run's training totals, mean over seeds.\n\n")
    text += "\n".join(lines) + "\n"
    missing = [f"- {e.label} seed {s}: not finished" for e, r in results for s in seeds if s not in r]
    if missing:
        text += "\nIncomplete:\n" + "\n".join(missing) + "\n"
    if unavailable:
        text += "\nNot available in this build:\n" + "\n".join(f"- {m}: {why}" for m, why in unavailable.items())
        text += "\n"
    return text


def write_csv(path: Path, results: list[tuple[object, dict[int, dict]]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for entry, runs in results:
            for result in runs.values():
                writer.writerow({**result, "label": entry.label, "micro_batch": entry.micro,
                                 "protocols": "+".join(entry.protocols)})


def run_scalars(result: dict, run_dir: Path) -> dict[str, dict[int, float]]:
    """``{"train/loss": {step: value}, "eval/loss": ..., ...}`` of one run, from its TensorBoard event files or
    else from the console lines of its ``train.log`` (a resumed run's repeated steps keep the last value)."""
    tensorboard_dir = result.get("tensorboard_dir")
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        tensorboard_dir = None
    if tensorboard_dir and Path(tensorboard_dir).is_dir():
        acc = EventAccumulator(str(tensorboard_dir))
        acc.Reload()
        return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags().get("scalars", [])}
    log = run_dir / "train.log"
    scalars: dict[str, dict[int, float]] = {}
    for prefix, step, values in LOG_LINE.findall(log.read_text() if log.is_file() else ""):
        for name, value, low, high in LOG_VALUE.findall(values):
            items = [(name, value), *(((f"{name}_lo", low), (f"{name}_hi", high)) if low else ())]
            for key, number in items:
                scalars.setdefault(f"{prefix}/{key}", {})[int(step)] = float(number)
    return scalars


def eval_loss_by_flops(result: dict, scalars: dict[str, dict[int, float]]) -> dict[int, tuple[float, float]]:
    """``{eval step: (training FLOPs so far, held-out loss)}``; FLOPs from the cumulative ``train/tokens_seen``
    (linear between logged steps) times the run's FLOPs per token. Empty without those numbers."""
    evals, seen = scalars.get("eval/loss", {}), scalars.get("train/tokens_seen", {})
    if not evals or not seen or not result.get("flops") or not result.get("tokens"):
        return {}
    per_token = result["flops"] / result["tokens"]
    steps = sorted(seen)
    tokens = np.interp(sorted(evals), [0, *steps], [0.0, *(seen[s] for s in steps)])
    return {step: (per_token * n, evals[step]) for step, n in zip(sorted(evals), tokens)}


def write_plot(path: Path, results: list[tuple[object, dict[int, dict]]], run_dirs: dict[tuple[str, int], Path]
               ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (entry, runs) in enumerate(results):
        colour = colours[i % len(colours)]
        values = [100 * r["accuracy"] for r in runs.values()]
        left.scatter([i] * len(values), values, color=colour, alpha=0.8)
        if values:
            left.hlines(statistics.fmean(values), i - 0.3, i + 0.3, color=colour)
        curves = []
        for j, (seed, result) in enumerate(runs.items()):
            scalars = run_scalars(result, run_dirs[entry.label, seed])
            train_loss = scalars.get("train/loss", {})
            middle.plot(list(train_loss), list(train_loss.values()), color=colour, alpha=0.6, lw=1,
                        label=entry.label if j == 0 else None)
            curves.append(eval_loss_by_flops(result, scalars))
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if common:
            flops = [statistics.fmean(c[s][0] for c in curves) for s in common]
            losses = np.array([[c[s][1] for c in curves] for s in common])
            right.plot(flops, losses.mean(1), color=colour, label=f"{entry.label} ({len(curves)} seeds)")
            right.fill_between(flops, losses.min(1), losses.max(1), color=colour, alpha=0.2)
    left.set_xticks(range(len(results)), [entry.label for entry, _ in results], rotation=20)
    left.set_ylabel("exact-match accuracy (%)")
    left.set_title("accuracy per seed (bar: mean)")
    middle.set_xlabel("step")
    middle.set_ylabel("training loss")
    middle.set_title("training loss per run")
    right.set_xlabel("training FLOPs")
    right.set_ylabel("held-out loss")
    right.set_title("held-out loss vs compute (mean, band: min-max over seeds)")
    for axes in (middle, right):
        if axes.lines:
            axes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, groups, seeds: list[int], baselines: list[str], unavailable: dict[str, str]
                 ) -> list[Path]:
    """``groups``: ``[(entry, runs)]``, one per report row (``harness.py``)."""
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(groups)
    paths = [out / "results.md", out / "results.csv", out / "results.png"]
    paths[0].write_text(markdown_table(results, seeds, baselines, unavailable))
    write_csv(paths[1], results)
    try:
        write_plot(paths[2], results, {(entry.label, run.seed): run.directory for entry, runs in groups
                                       for run in runs})
    except ImportError as err:  # a machine without matplotlib still gets the table and the CSV
        print(f"no plot: {err}")
        paths.pop()
    return paths
