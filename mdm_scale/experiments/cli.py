"""The ``experiment`` subcommands of ``mdm-scale`` (registered by ``mdm_scale/cli.py``), docs/results.md:

    mdm-scale experiment run --config task.yaml --methods standard,mirror --seeds 1,2 --eval-data eval.jsonl --out D
    mdm-scale experiment errors --family sort D/runs/*/mb_*/seed_*/pred.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from mdm_scale.experiments.harness import run_experiment

    return run_experiment(args)


def _errors(args: argparse.Namespace) -> int:
    from mdm_scale.experiments.answer_errors import error_table

    print(error_table(args.family, args.predictions))
    return 0


def add_experiment_commands(commands) -> None:
    from mdm_scale.config.methods import methods_help
    from mdm_scale.experiments.methods import BASELINES

    experiment = commands.add_parser("experiment", help="methods x seeds studies (docs/results.md)")
    sub = experiment.add_subparsers(dest="experiment_command", required=True)

    run = sub.add_parser("run", help="train and evaluate every method x seed, write a Table-1-style report")
    run.add_argument("--config", action="append", required=True, help="training YAML; repeat to merge")
    run.add_argument("--methods", required=True, help=f"{methods_help()}, or standard 2x")
    run.add_argument("--seeds", required=True, help="comma-separated training seeds, e.g. 42,731,20231")
    run.add_argument("--eval-data", required=True, help="JSONL of {prompt, answer or response}")
    run.add_argument("--out", required=True, help="experiment directory (re-run to resume)")
    run.add_argument("--init", default=None, help="pretrained Hugging Face dir to start from (model.path)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    run.add_argument("--eval-arg", action="append", default=[], metavar="ARG",
                     help="argument for `mdm-scale eval`, e.g. --eval-arg=--gen-length=64 (repeatable)")
    run.add_argument("--budget", default="batch",
                     help="protocols, comma-separated: batch (equal sequences per step), rows (equal forward rows)")
    run.add_argument("--rows", type=int, default=None,
                     help="forward rows per micro-batch under --budget rows (default: 2 x train.micro_batch_size)")
    run.add_argument("--parallel", type=int, default=1, help="runs at once (they share the machine)")
    run.add_argument("--baselines", default=",".join(BASELINES),
                     help="methods whose best run the others' worst run is compared with")
    run.set_defaults(func=_run)

    errors = sub.add_parser("errors", help="where the answers of `mdm-scale eval` predictions go wrong (markdown)")
    errors.add_argument("--family", required=True, help="the task's family (--family of mdm-scale data synth)")
    errors.add_argument("predictions", nargs="+", type=Path, help="PRED.jsonl files of mdm-scale eval")
    errors.set_defaults(func=_errors)
