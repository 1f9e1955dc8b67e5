"""The experiment report in the form of the paper's Table 1 (SPEC section 6.1), a plot and the raw numbers.

- ``results.md``: per method, the accuracy (%) of every seed, the mean, the sample standard deviation (n - 1)
  and the range (max - min) over seeds, the gain of the mean over Standard, and the paper's check "the worst
  run of the method is at least the best run of each baseline" (Standard, Clipped: whichever ran);
- ``results.csv``: one row per finished run (method, seed, accuracy, correct, total, ...);
- ``results.png``: accuracy per seed and method, and the training loss curves of every run (read from the runs'
  TensorBoard event files).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

LOG_LOSS = re.compile(r"\[train step (\d+)\] loss=([0-9.eE+-]+)")
CSV_FIELDS = ["method", "seed", "accuracy", "correct", "total", "no_answer", "eval_loss", "train_seconds",
              "wall_seconds"]


def load_results(runs) -> dict[str, dict[int, dict]]:
    """``{method: {seed: result}}`` of the finished runs, in the runs' order."""
    table: dict[str, dict[int, dict]] = {}
    for run in runs:
        table.setdefault(run.method, {})
        if run.result_file.is_file():
            table[run.method][run.seed] = json.loads(run.result_file.read_text())
    return table


def summarize(accuracies: list[float]) -> dict[str, float | None]:
    """Mean, sample sd (None for fewer than 2 runs) and range of accuracies in %."""
    if not accuracies:
        return {"mean": None, "sd": None, "range": None}
    return {"mean": statistics.fmean(accuracies),
            "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "range": max(accuracies) - min(accuracies)}


def worst_vs_best(method_acc: list[float], baselines: dict[str, list[float]]) -> str:
    """The paper's check for one method against every baseline that has runs."""
    if not method_acc or not baselines:
        return "n/a"
    worst = min(method_acc)
    failed = [f"{name} best {max(acc):.2f} > {worst:.2f}" for name, acc in baselines.items() if max(acc) > worst]
    return "yes" if not failed else "no (" + "; ".join(failed) + ")"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(table: dict[str, dict[int, dict]], seeds: list[int], baselines: list[str],
                   unavailable: dict[str, str]) -> str:
    acc = {m: [100 * r[s]["accuracy"] for s in seeds if s in r] for m, r in table.items()}
    base_runs = {b: acc[b] for b in baselines if acc.get(b)}
    reference = summarize(acc.get("Standard", []))["mean"]
    header = ["Method", *(f"seed {s}" for s in seeds), "mean", "sd", "range", "Δ mean vs Standard",
              "worst run ≥ best baseline run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, results in table.items():
        stats = summarize(acc[method])
        gain = None if reference is None or stats["mean"] is None else stats["mean"] - reference
        check = "(baseline)" if method in base_runs else worst_vs_best(acc[method], base_runs)
        cells = [method, *(_fmt(100 * results[s]["accuracy"]) if s in results else "–" for s in seeds),
                 _fmt(stats["mean"]), _fmt(stats["sd"]), _fmt(stats["range"]),
                 "–" if gain is None else f"{gain:+.2f}", check]
        lines.append("| " + " | ".join(cells) + " |")
    text = "Exact-match accuracy (%) per training seed; sd is the sample standard deviation over seeds.\n\n"
    text += "\n".join(lines) + "\n"
    missing = [f"- {m} seed {s}: not finished" for m, r in table.items() for s in seeds if s not in r]
    if missing:
        text += "\nIncomplete:\n" + "\n".join(missing) + "\n"
    if unavailable:
        text += "\nNot available in this build:\n" + "\n".join(f"- {m}: {why}" for m, why in unavailable.items())
        text += "\n"
    return text


def write_csv(path: Path, table: dict[str, dict[int, dict]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for results in table.values():
            for result in results.values():
                writer.writerow(result)


def loss_curve(result: dict, run_dir: Path) -> tuple[list[int], list[float]]:
    """``train/loss`` of one run from its TensorBoard event files, or else from the console lines of its log."""
    tensorboard_dir = result.get("tensorboard_dir")
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        tensorboard_dir = None
    if tensorboard_dir and Path(tensorboard_dir).is_dir():
        acc = EventAccumulator(str(tensorboard_dir))
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            events = acc.Scalars("train/loss")
            return [e.step for e in events], [e.value for e in events]
    log = run_dir / "train.log"
    points = LOG_LOSS.findall(log.read_text()) if log.is_file() else []
    return [int(step) for step, _ in points], [float(loss) for _, loss in points]


def write_plot(path: Path, table: dict[str, dict[int, dict]], run_dirs: dict[tuple[str, int], Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, results) in enumerate(table.items()):
        colour = colours[i % len(colours)]
        values = [100 * r["accuracy"] for r in results.values()]
        left.scatter([i] * len(values), values, color=colour, alpha=0.8)
        if values:
            left.hlines(statistics.fmean(values), i - 0.3, i + 0.3, color=colour)
        for j, (seed, result) in enumerate(results.items()):
            steps, losses = loss_curve(result, run_dirs[method, seed])
            right.plot(steps, losses, color=colour, alpha=0.6, lw=1, label=method if j == 0 else None)
    left.set_xticks(range(len(table)), list(table), rotation=20)
    left.set_ylabel("exact-match accuracy (%)")
    left.set_title("accuracy per seed (bar: mean)")
    right.set_xlabel("step")
    right.set_ylabel("training loss")
    right.set_title("training loss per run")
    if right.lines:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, runs, seeds: list[int], baselines: list[str], unavailable: dict[str, str]
                 ) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = load_results(runs)
    paths = [out / "results.md", out / "results.csv", out / "results.png"]
    paths[0].write_text(markdown_table(table, seeds, baselines, unavailable))
    write_csv(paths[1], table)
    try:
        write_plot(paths[2], table, {(r.method, r.seed): r.directory for r in runs})
    except ImportError as err:  # a machine without matplotlib still gets the table and the CSV
        print(f"no plot: {err}")
        paths.pop()
    return paths
