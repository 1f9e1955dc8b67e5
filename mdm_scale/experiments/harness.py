"""``mdm-scale experiment run``: methods x seeds on one task: train every run, evaluate its accuracy, write a
Table-1-style report.

    mdm-scale experiment run --config tools/experiments/configs/synth_finetune.yaml \\
        --methods standard,"standard 2x",mirror,ppots,ppots+mirror --seeds 42,731,20231,1,2 \\
        --eval-data data/synth/eval.jsonl --out results/synth --parallel 6 --budget batch,rows \\
        [--init exports/pretrained] [--set train.max_steps=300] [--eval-arg=--gen-length=64]

Two protocols (``--budget``, one or both), with B the configuration's ``train.micro_batch_size``:

- ``batch`` (the paper's): every method at B sequences per micro-batch (MIRROR then runs 2B forward rows);
  ``Standard 2x`` is Standard at 2B, the same forward rows as MIRROR;
- ``rows``: every method at R forward rows per micro-batch (``--rows``, default 2B): MIRROR-family methods at
  R/2 sequences, the others (and ``auto``, which halves its sequences itself while MIRROR is on) at R.

A run is named by what defines it, ``OUT/runs/<method>/mb_<sequences per micro-batch>/seed_<seed>/``, so a
run that both protocols ask for is trained once: with R = 2B, Standard at ``rows`` is ``Standard 2x`` at
``batch`` (``runs/standard/mb_2B``) and MIRROR is the same run under both. Each run directory holds ``train/``
(the training output directory), ``train.log``, ``eval.log``, ``pred.jsonl`` and ``result.json`` (accuracy,
and the forward rows, non-pad tokens and model FLOPs that training spent). A run with ``result.json`` is
finished and skipped when the command is repeated; an interrupted one continues from its newest checkpoint
(``train.resume=auto``). Runs are independent single-rank processes (``python -m mdm_scale.cli train`` and
``eval``, in the current directory, so relative paths mean the same to them); ``--parallel K`` runs K at once,
sharing the machine's GPU (several small runs fit on one). ``--init DIR`` starts every run from a pretrained
Hugging Face directory (an ``mdm-scale export``): ``model.path`` and ``data.tokenizer`` are set to it.

Methods map to configuration overrides (``methods.py``); one whose keys the current schema does not have is
reported as not available and skipped. The report (``report.py``) is rewritten at the end of every
invocation from whatever runs have finished: ``results.md``, ``results.csv``, ``results.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError
from mdm_scale.distributed.discovery import free_port
from mdm_scale.experiments.methods import DOUBLED, availability, display, known, overrides, rows_per_sequence, slug
from mdm_scale.experiments.report import write_report
from mdm_scale.training.checkpoint import write_atomic
from mdm_scale.training.run_reader import is_hf_dir, read_run

BUDGETS = ("batch", "rows")


@dataclass
class Run:
    method: str  # a name of the method table (mdm_scale/config/methods.py)
    micro: int  # sequences per micro-batch
    seed: int
    directory: Path

    @property
    def result_file(self) -> Path:
        return self.directory / "result.json"


@dataclass
class Entry:
    """A row of the report: one method at one micro-batch, asked for by one or both protocols."""

    label: str  # e.g. "MIRROR", "Standard 2x", "P-POTS 2x" (x: sequences per step over the configuration's)
    method: str  # a name of the method table (mdm_scale/config/methods.py)
    micro: int  # sequences per micro-batch
    rows: int  # nominal forward rows per micro-batch
    protocols: list[str]

    def runs(self, out: Path, seeds: list[int]) -> list[Run]:
        where = out / "runs" / slug(self.method) / f"mb_{self.micro}"
        return [Run(self.method, self.micro, s, where / f"seed_{s}") for s in seeds]


def plan(methods: list[str], budgets: list[str], micro: int, rows: int) -> list[Entry]:
    """The report's rows for ``methods`` under ``budgets``, each (method, micro-batch) once, in request order.

    ``batch``: every method at ``micro`` sequences, a ``DOUBLED`` one at twice that. ``rows``: every method at
    ``rows`` forward rows (``rows / rows_per_sequence`` sequences); ``DOUBLED`` methods are the equal-batch
    protocol's and sit this one out (under ``rows`` plain Standard is the equal-compute baseline).
    """
    entries: dict[tuple[str, int], Entry] = {}
    for budget in budgets:
        for name in methods:
            method = DOUBLED.get(name, name)
            if budget == "batch":
                size = 2 * micro if name in DOUBLED else micro
            elif name in DOUBLED:
                continue
            else:
                size = rows // rows_per_sequence(method)
            label = f"{display(method)} {size / micro:g}x" if size != micro else display(method)
            entry = entries.setdefault((method, size), Entry(label, method, size, size * rows_per_sequence(method),
                                                             []))
            entry.protocols.append(budget)
    return list(entries.values())


def pending(runs: list[Run], seeds: list[int]) -> list[Run]:
    """The unfinished runs, seed-major (every row's first seed, then every row's second, ...): an invocation cut
    short by a time limit leaves every row with some seeds rather than some rows with none."""
    return sorted((r for r in runs if not r.result_file.is_file()), key=lambda r: seeds.index(r.seed))


def run_env(threads: int) -> dict[str, str]:
    """A one-rank world with its own rendezvous port, so that concurrent runs never meet."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _call(cmd: list[str], log: Path, threads: int) -> str:
    """Run ``cmd`` with output to ``log``; return its stdout's last JSON line, or raise with the log's tail."""
    with log.open("w") as out:
        done = subprocess.run(cmd, env=run_env(threads), stdout=subprocess.PIPE, stderr=out, text=True)
        out.write(done.stdout)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[2:5])} failed (exit {done.returncode}); {log}:\n{tail}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"no result line in {log}")
    return lines[-1]


def execute(run: Run, args: argparse.Namespace, threads: int) -> dict:
    """Train (unless already trained) and evaluate one run; write and return its ``result.json``."""
    run.directory.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "mdm_scale.cli"]
    train_file = run.directory / "train.json"
    start = time.perf_counter()
    if not train_file.is_file():
        sets = [*base_overrides(args), *overrides(run.method), f"seed={run.seed}",
                f"train.micro_batch_size={run.micro}", f"train.global_batch_size={run.micro * args.grad_accum}",
                f"train.output_dir={run.directory / 'train'}"]
        cmd = [*cli, "train", *[a for c in args.config for a in ("--config", c)], *[a for s in sets
                                                                                    for a in ("--set", s)]]
        train_file.write_text(json.dumps(json.loads(_call(cmd, run.directory / "train.log", threads))["final"]))
    trained = json.loads(train_file.read_text())
    cmd = [*cli, "eval", "--checkpoint", str(run.directory / "train"), "--data", args.eval_data,
           "--out", str(run.directory / "pred.jsonl"), *args.eval_arg]
    scored = json.loads(_call(cmd, run.directory / "eval.log", threads))
    result = {"method": run.method, "micro_batch": run.micro, "seed": run.seed, "accuracy": scored["accuracy"],
              "correct": scored["correct"], "total": scored["total"], "no_answer": scored["no_answer"],
              "eval_loss": trained.get("eval_loss"), "steps": trained.get("step"), "rows": trained.get("rows"),
              "tokens": trained.get("tokens"), "flops": trained.get("flops"), "train_seconds": trained.get("seconds"),
              "wall_seconds": time.perf_counter() - start, "tensorboard_dir": trained.get("tensorboard_dir")}
    write_atomic(run.result_file, json.dumps(result, indent=2))
    return result


def init_conflict(method: str, init: str | None) -> str | None:
    """ARM rows need a causal starting model: a bidirectional one would see the tokens it predicts."""
    if init is None or "train.objective=arm" not in overrides(method):
        return None
    if not read_run(init).causal:
        return f"--init {init} holds a bidirectional model; ARM needs a causal one (train it without --init)"
    return None


def base_overrides(args: argparse.Namespace) -> list[str]:
    init = [f"model.path={args.init}", f"data.tokenizer={args.init}"] if args.init else []
    return [*init, *args.set]


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Parse and check ``mdm-scale experiment run``'s flags (``experiments/cli.py``) before any run starts; a
    ``ConfigError`` names the flag. Adds the configuration's micro-batch and gradient accumulation."""
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if args.parallel < 1:
        raise ConfigError("--parallel must be >= 1")
    if not Path(args.eval_data).is_file():
        raise ConfigError(f"--eval-data {args.eval_data}: file not found")
    if args.init and not is_hf_dir(Path(args.init)):
        raise ConfigError(f"--init {args.init}: not a Hugging Face directory (config.json and weights); give a "
                          f"pretrained model or the mdm-scale export of a training run")
    args.budget = [b.strip() for b in args.budget.split(",") if b.strip()]
    if not args.budget or set(args.budget) - set(BUDGETS):
        raise ConfigError(f"--budget {','.join(args.budget)!r}: expected one or both of {', '.join(BUDGETS)}")
    train = load_config(args.config, base_overrides(args)).train
    args.micro, args.grad_accum = train.micro_batch_size, train.grad_accum
    args.rows = 2 * args.micro if args.rows is None else args.rows
    halved = [m for m in args.methods if known(m) and rows_per_sequence(m) == 2]
    if "rows" in args.budget and (args.rows < 2 or (halved and args.rows % 2)):
        raise ConfigError(f"--rows {args.rows}: MIRROR-family methods ({', '.join(halved) or 'none'}) need an even "
                          f"number of rows >= 2")
    return args


def run_experiment(args: argparse.Namespace) -> int:
    """Every unfinished run of the plan, then the report; 1 if a run failed (it is retried next time), else 0."""
    args = resolve_arguments(args)
    out = Path(args.out)
    unavailable = {m: why for m in args.methods
                   if (why := availability(m, args.config, base_overrides(args)) or init_conflict(m, args.init))}
    for method, why in unavailable.items():
        print(f"{method}: not available ({why})", flush=True)
    entries = plan([m for m in args.methods if m not in unavailable], args.budget, args.micro, args.rows)
    runs = [run for entry in entries for run in entry.runs(out, args.seeds)]
    todo = pending(runs, args.seeds)
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to do "
          f"({args.parallel} at a time)", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    failures = []

    def one(run: Run) -> None:
        try:
            result = execute(run, args, threads)
            print(f"{run.method} mb {run.micro} seed {run.seed}: accuracy {100 * result['accuracy']:.2f}% "
                  f"({result['wall_seconds']:.0f} s)", flush=True)
        except Exception as err:  # one failed run must not stop the others; it is reported and retried next time
            failures.append(run)
            print(f"{run.method} mb {run.micro} seed {run.seed}: FAILED: {err}", flush=True)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(one, todo))
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    paths = write_report(out, [(entry, entry.runs(out, args.seeds)) for entry in entries], args.seeds, baselines,
                         unavailable)
    print("report: " + ", ".join(str(p) for p in paths), flush=True)
    return 1 if failures else 0
