"""``variance.masks: auto`` against Standard and MIRROR on several task families, all runs in one pool (issue 26's
re-measurement; docs/results.md).

    python -m tools.experiments.auto_study --out results/auto --families sort,missing,minmax \\
        --seeds 42,731,20231,1,2 --parallel 16 --limit-s 330

Per family (``FAMILIES``: its generator, sizes, training config and generation length) and seed, the runs of
``mdm-scale experiment run --methods standard,"standard 2x",mirror,auto --budget rows,batch --rows R``
(``mdm_scale/experiments/harness.py``; R = the config's micro-batch): at equal rows Standard, auto and MIRROR 0.5x
(R/2 sequences of two rows), then, for the families of ``--equal-batch``, MIRROR at equal batch (R sequences, 2R
rows) and Standard 2x (2R sequences). The runs of all families share one pool of ``--parallel`` workers: every
equal-rows run first, seed by seed, then the equal-batch runs, so that a time limit cuts the equal-batch rows
first. After ``--limit-s`` seconds no further run starts (running ones finish); a later invocation skips
finished runs and resumes interrupted ones.

Writes under ``OUT/<family>/``: the data (``data/``, made once), the runs (``runs/<method>/mb_<sequences>/
seed_<seed>/``, each with its training directory ``train/`` holding its final checkpoint and TensorBoard files),
the harness's report (``results.md``, ``.csv``, ``.png``: accuracy per seed, held-out NELBO ``eval_loss``,
compute), and from the auto runs' TensorBoard files:

- ``auto_decisions.csv``: one line per pooling of every auto run: seed, step, ``mirror`` (the setting from the
  next step on), and every ``variance/*`` estimate with its 95% interval (``_lo``, ``_hi``) and standard error
  (``_se``), among them the rule's sides ``pair_half_sq`` (E[(L1 - L2)^2] / 2) and ``rule_right`` (V, + cov_syrm
  under SyRM) and their difference ``gain``;
- ``auto_summary.md``: per seed the poolings, how many left MIRROR on, the first step with MIRROR, and the last
  pooling's gain with its SE;
- ``online_abc.png``: ``mdm-scale variance plot-online`` of the first seed's auto run.

A study directory is what ``python -m tools.bench.decode_accuracy --study OUT/<family>`` reads (its
``data/eval.jsonl`` and ``runs/standard/mb_*/seed_*/train``).
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

from mdm_scale.cli import build_parser
from mdm_scale.config.schema import ConfigError
from mdm_scale.data.synthetic import write_synthetic_task
from mdm_scale.diffusion.variance_estimates import Z95
from mdm_scale.experiments.harness import Run, execute, pending, plan, resolve_arguments
from mdm_scale.experiments.methods import BASELINES
from mdm_scale.experiments.report import run_scalars, write_report

CONFIGS = Path(__file__).resolve().parent / "configs"
METHODS = ("standard", "standard 2x", "mirror", "auto")
RULE = ("pair_half_sq", "rule_right", "gain")
"""The rule's sides and their difference: the decisions table gives each a standard error."""


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
"""The from-scratch studies of docs/results.md (``sort``, ``missing``) and ``minmax`` (a list's smallest and
largest digit)."""


def family_args(name: str, out: Path, options: argparse.Namespace) -> argparse.Namespace:
    """``mdm-scale experiment run``'s parsed and checked arguments for one family (its data made first if
    absent); equal rows are ``--rows`` or the family's micro-batch."""
    family, data = FAMILIES[name], out / name / "data"
    if not (data / "eval.jsonl").is_file():
        write_synthetic_task(data, train=options.synth_train, eval=options.synth_eval, seed=0,
                             min_ops=family.min_size, max_ops=family.max_size, family=family.generator)
    argv = ["experiment", "run", "--config", str(family.config), "--methods", ",".join(METHODS),
            "--seeds", options.seeds, "--eval-data", str(data / "eval.jsonl"), "--out", str(out / name),
            "--budget", "rows,batch" if name in options.equal_batch else "rows",
            f"--eval-arg=--gen-length={family.gen_length}", f"--eval-arg=--steps={family.gen_length}",
            f"--eval-arg=--batch-size={options.eval_batch}",
            "--set", f"data.train_file={data / 'train.jsonl'}", "--set", f"data.eval_file={data / 'eval.jsonl'}"]
    if options.rows is not None:
        argv += ["--rows", str(options.rows)]
    for item in options.set:
        argv += ["--set", item]
    args = resolve_arguments(build_parser().parse_args(argv))
    if options.rows is None:
        args.rows = args.micro  # equal rows: the config's micro-batch of one-row sequences
    return args


def decisions(run: Run) -> list[dict]:
    """Every pooling of one auto run: its step and every ``variance/*`` value logged there, with the SE of the
    rule's sides and gain from their 95% intervals."""
    if not run.result_file.is_file():
        return []
    scalars = run_scalars(json.loads(run.result_file.read_text()), run.directory)
    tags = sorted(tag for tag in scalars if tag.startswith("variance/"))
    rows = []
    for step in sorted({step for tag in tags for step in scalars[tag]}):
        row = {"seed": run.seed, "step": step, **{tag.removeprefix("variance/"): scalars[tag].get(step)
                                                   for tag in tags}}
        for name in RULE:
            if row.get(f"{name}_lo") is not None and row.get(f"{name}_hi") is not None:
                row[f"{name}_se"] = (row[f"{name}_hi"] - row[f"{name}_lo"]) / (2 * Z95)
        rows.append(row)
    return rows


def write_decisions(out: Path, runs: list[Run]) -> list[Path]:
    """``auto_decisions.csv`` and ``auto_summary.md`` of a family's auto runs (module docstring)."""
    rows = [row for run in runs for row in decisions(run)]
    fields = ["seed", "step", *sorted({key for row in rows for key in row} - {"seed", "step"})]
    with (out / "auto_decisions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| seed | poolings | with MIRROR on after | first step with MIRROR | last pooling: gain (SE), "
             "E[(L1-L2)^2]/2, V (+ cov_syrm) |", "|---|---|---|---|---|"]
    for run in runs:
        mine = [row for row in rows if row["seed"] == run.seed]
        if not mine:
            lines.append(f"| {run.seed} | not finished | | | |")
            continue
        on = [row["step"] for row in mine if row.get("mirror") == 1.0]
        last = mine[-1]
        lines.append(f"| {run.seed} | {len(mine)} | {len(on)} | {on[0] + 1 if on else 'never'} | "
                     f"{_number(last.get('gain'))} ({_number(last.get('gain_se'))}), "
                     f"{_number(last.get('pair_half_sq'))}, {_number(last.get('rule_right'))} |")
    (out / "auto_summary.md").write_text("\n".join(lines) + "\n")
    return [out / "auto_decisions.csv", out / "auto_summary.md"]


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def plot_first_auto_run(out: Path, runs: list[Run], title: str) -> list[Path]:
    """``online_abc.png`` of the first finished auto run with TensorBoard files (none: nothing)."""
    from mdm_scale.data.records import DataError
    from mdm_scale.variance.online_plot import plot_online_abc

    for run in (run for run in runs if run.result_file.is_file()):
        tensorboard = json.loads(run.result_file.read_text()).get("tensorboard_dir")
        if tensorboard and Path(tensorboard).is_dir():
            try:
                return [plot_online_abc(tensorboard, out / "online_abc.png", f"{title}, seed {run.seed}")]
            except (DataError, ImportError) as err:
                print(f"no online A/B/C plot: {err}", flush=True)
    return []


def study_jobs(plans: dict[str, argparse.Namespace], out: Path, seeds: list[int]
               ) -> tuple[dict[str, list], list[tuple[Run, argparse.Namespace, bool]]]:
    """Each family's planned rows (``plans``: its arguments) and the runs still to do, in order: equal-rows runs
    before equal-batch-only ones, then seed by seed, then the most rows first (a job: the run, its family's
    arguments, whether only the equal-batch protocol asks for it)."""
    entries = {name: plan(args.methods, args.budget, args.micro, args.rows) for name, args in plans.items()}
    jobs = [(run, plans[name], "rows" not in entry.protocols) for name in plans for entry in entries[name]
            for run in pending(entry.runs(out / name, seeds), seeds)]
    return entries, sorted(jobs, key=lambda job: (job[2], seeds.index(job[0].seed), -job[0].micro))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="study directory (re-run to resume)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--equal-batch", default=",".join(FAMILIES),
                        help="families that also run MIRROR at equal batch and Standard 2x (comma-separated; '' none)")
    parser.add_argument("--seeds", default="42,731,20231,1,2")
    parser.add_argument("--rows", type=int, default=None,
                        help="forward rows per micro-batch at equal rows (default: the config's micro-batch)")
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
    try:
        plans = {name: family_args(name, options.out, options) for name in names}
    except ConfigError as err:  # a bad --set or config: one line, before any run
        parser.error(str(err))
    seeds = plans[names[0]].seeds
    entries, todo = study_jobs(plans, options.out, seeds)
    print(f"{len(todo)} runs to do over {', '.join(names)} ({options.parallel} at a time)", flush=True)
    threads = max(1, (os.cpu_count() or 1) // options.parallel)
    failures, skipped = [], []

    def one(job: tuple[Run, argparse.Namespace, bool]) -> None:
        run, args, _ = job
        label = f"{run.directory.relative_to(options.out)}"
        if options.limit_s is not None and time.perf_counter() - start > options.limit_s:
            skipped.append(run)
            return
        try:
            result = execute(run, args, threads)
            print(f"{label}: accuracy {100 * result['accuracy']:.2f}%, eval loss {result['eval_loss']} "
                  f"({result['wall_seconds']:.0f} s)", flush=True)
        except Exception as err:  # noqa: BLE001 -- one failed run must not stop the others; reported, retried
            failures.append(run)
            print(f"{label}: FAILED: {err}", flush=True)

    with ThreadPoolExecutor(max_workers=options.parallel) as pool:
        list(pool.map(one, todo))
    for name in names:
        out = options.out / name
        groups = [(entry, entry.runs(out, seeds)) for entry in entries[name]]
        paths = write_report(out, groups, seeds, list(BASELINES), {})
        auto = [run for entry, runs in groups if entry.method == "auto" for run in runs]
        paths += write_decisions(out, auto) + plot_first_auto_run(out, auto, f"{name}: variance.masks auto")
        print(f"{name}: " + ", ".join(str(p) for p in paths), flush=True)
    print(f"{len(todo) - len(failures) - len(skipped)} runs done, {len(failures)} failed, {len(skipped)} not started "
          f"(time limit) in {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failures or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
