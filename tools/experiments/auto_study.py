"""``variance.mirror: auto`` against Standard and MIRROR on several task families, all runs in one pool.

    python tools/experiments/auto_study.py --out results/auto --families sort,missing,minmax \\
        --equal-batch minmax --seeds 42,731,20231,1,2 --parallel 16 --limit-s 420

Per family (``FAMILIES``: its generator, sizes, training config and generation length) and seed: Standard,
auto and MIRROR 0.5x at R forward rows per micro-batch (``run.py --budget rows --rows R``: equal rows), and for
the families of ``--equal-batch`` also MIRROR at R sequences (2R rows) and Standard 2x (2R sequences)
(``--budget batch,rows`` with Standard 2x: the equal-batch protocol). The runs of all families share one pool of
``--parallel`` workers, seed by seed and the longest (2R rows) first within a seed, so that no worker idles at
the end of a family. After ``--limit-s`` seconds no further run is started (running ones finish); a later
invocation skips finished runs and resumes interrupted ones (``run.py``).

Writes under ``OUT/<family>/``: the data (``data/``, made once by ``mdm-scale data synth``), the runs
(``runs/``), ``run.py``'s report (``results.md``, ``.csv``, ``.png``: accuracy per seed, held-out NELBO
``eval_loss``, compute) and, from the TensorBoard files of the auto runs, ``auto_decisions.csv``: one line per
refit of every auto run with every ``variance/*`` value logged there (``mirror`` = the setting from the next
step on; the rule's two sides and the gain with their standard errors), and ``auto_summary.md``: per seed how
many refits had MIRROR on, the first step MIRROR was on, and the last refit's numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

import run as study  # noqa: E402
from methods import BASELINES, rows_per_sequence  # noqa: E402
from report import run_scalars, write_report  # noqa: E402

from mdm_scale.data.synthetic import write_synthetic_task  # noqa: E402

CONFIGS = HERE / "configs"
METHODS = ["Standard", "Standard 2x", "MIRROR", "auto"]
EQUAL_ROWS = ["Standard", "MIRROR", "auto"]  # under --budget rows alone: Standard, MIRROR 0.5x, auto


@dataclass(frozen=True)
class Family:
    generator: str
    min_size: int
    max_size: int
    config: Path
    gen_length: int


FAMILIES = {
    "sort": Family("sort", 1, 8, CONFIGS / "family_sort.yaml", 18),
    "missing": Family("missing", 1, 6, CONFIGS / "family_missing.yaml", 18),
    "minmax": Family("minmax", 2, 8, CONFIGS / "family_minmax.yaml", 18),
}
"""The studies of docs/results.md (``sort`` and ``missing``, from scratch) and ``minmax`` (a list's smallest and
largest digit)."""


def family_args(name: str, out: Path, options: argparse.Namespace) -> argparse.Namespace:
    """``run.py``'s arguments for one family (its data made first if absent); ``args.methods`` are the family's
    (module docstring)."""
    family, data = FAMILIES[name], out / name / "data"
    if not (data / "eval.jsonl").is_file():
        write_synthetic_task(data, train=options.synth_train, eval=options.synth_eval, seed=0,
                             min_ops=family.min_size, max_ops=family.max_size, family=family.generator)
    equal_batch = name in options.equal_batch
    argv = ["--config", str(family.config), "--methods", ",".join(METHODS if equal_batch else EQUAL_ROWS),
            "--seeds", options.seeds, "--eval-data", str(data / "eval.jsonl"), "--out", str(out / name),
            "--budget", "batch,rows" if equal_batch else "rows",
            "--rows", str(options.rows), f"--eval-arg=--gen-length={family.gen_length}",
            f"--eval-arg=--steps={family.gen_length}", f"--eval-arg=--batch-size={options.eval_batch}",
            "--set", f"data.train_file={data / 'train.jsonl'}", "--set", f"data.eval_file={data / 'eval.jsonl'}"]
    for item in options.set:
        argv += ["--set", item]
    return study.parse_args(argv)


def decisions(run: study.Run) -> list[dict]:
    """Every refit of one auto run: its step and every ``variance/*`` value logged there."""
    if not run.result_file.is_file():
        return []
    scalars = run_scalars(json.loads(run.result_file.read_text()), run.directory)
    tags = sorted(tag for tag in scalars if tag.startswith("variance/"))
    steps = sorted({step for tag in tags for step in scalars[tag]})
    return [{"seed": run.seed, "step": step, **{tag.removeprefix("variance/"): scalars[tag].get(step) for tag in tags}}
            for step in steps]


def write_decisions(out: Path, runs: list[study.Run]) -> list[Path]:
    """``auto_decisions.csv`` and ``auto_summary.md`` of a family's auto runs."""
    rows = [row for run in runs for row in decisions(run)]
    fields = ["seed", "step", *sorted({key for row in rows for key in row} - {"seed", "step"})]
    with (out / "auto_decisions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| seed | refits | with MIRROR on | first step with MIRROR | last refit: "
             + ", ".join(f for f in fields[2:] if f != "mirror") + " |", "|---|---|---|---|---|"]
    for run in runs:
        mine = [row for row in rows if row["seed"] == run.seed]
        if not mine:
            lines.append(f"| {run.seed} | not finished | | | |")
            continue
        on = [row["step"] for row in mine if row.get("mirror") == 1.0]
        last = ", ".join(_number(mine[-1].get(f)) for f in fields[2:] if f != "mirror")
        lines.append(f"| {run.seed} | {len(mine)} | {len(on)} | {on[0] + 1 if on else 'never'} | {last} |")
    (out / "auto_summary.md").write_text("\n".join(lines) + "\n")
    return [out / "auto_decisions.csv", out / "auto_summary.md"]


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="study directory (re-run to resume)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--equal-batch", default="minmax",
                        help="families that also run MIRROR at equal batch and Standard 2x (comma-separated)")
    parser.add_argument("--seeds", default="42,731,20231,1,2")
    parser.add_argument("--rows", type=int, default=64, help="forward rows per micro-batch of the equal-rows runs")
    parser.add_argument("--parallel", type=int, default=16, help="runs at once, over all families")
    parser.add_argument("--limit-s", type=float, default=None, help="start no run after this many seconds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--synth-train", type=int, default=20000, help="training problems per family")
    parser.add_argument("--synth-eval", type=int, default=500, help="held-out problems per family")
    parser.add_argument("--eval-batch", type=int, default=500, help="problems per generation batch")
    options = parser.parse_args(argv)
    names = [n.strip() for n in options.families.split(",") if n.strip()]
    options.equal_batch = [n.strip() for n in options.equal_batch.split(",") if n.strip()]
    unknown = [n for n in [*names, *options.equal_batch] if n not in FAMILIES]
    if unknown:
        parser.error(f"--families / --equal-batch: unknown {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    start = time.perf_counter()
    plans = {name: family_args(name, options.out, options) for name in names}
    entries = {name: study.plan(args.methods, args.budget, args.micro, args.rows) for name, args in plans.items()}
    seeds = plans[names[0]].seeds
    todo = [(run, plans[name]) for name in names for entry in entries[name]
            for run in study.pending(entry.runs(options.out / name, seeds), seeds)]
    todo.sort(key=lambda job: (seeds.index(job[0].seed), -job[0].micro * rows_per_sequence(job[0].method)))
    print(f"{len(todo)} runs to do over {', '.join(names)} ({options.parallel} at a time)", flush=True)
    threads = max(1, (os.cpu_count() or 1) // options.parallel)
    failures, skipped = [], []

    def one(job: tuple[study.Run, argparse.Namespace]) -> None:
        run, args = job
        label = f"{run.directory.relative_to(options.out)}"
        if options.limit_s is not None and time.perf_counter() - start > options.limit_s:
            skipped.append(run)
            return
        try:
            result = study.execute(run, args, threads)
            print(f"{label}: accuracy {100 * result['accuracy']:.2f}%, eval loss {result['eval_loss']} "
                  f"({result['wall_seconds']:.0f} s)", flush=True)
        except Exception as err:  # one failed run must not stop the others; reported and retried next time
            failures.append(run)
            print(f"{label}: FAILED: {err}", flush=True)

    with ThreadPoolExecutor(max_workers=options.parallel) as pool:
        list(pool.map(one, todo))
    for name in names:
        out = options.out / name
        groups = [(entry, entry.runs(out, seeds)) for entry in entries[name]]
        paths = write_report(out, groups, seeds, list(BASELINES), {})
        auto = [run for entry, runs in groups if entry.method == "auto" for run in runs]
        paths += write_decisions(out, auto)
        print(f"{name}: " + ", ".join(str(p) for p in paths), flush=True)
    print(f"{len(todo) - len(failures) - len(skipped)} runs done, {len(failures)} failed, {len(skipped)} not started "
          f"(time limit) in {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failures or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
