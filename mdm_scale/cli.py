"""``mdm-scale`` command line.

    mdm-scale train --config configs/quickstart.yaml [--config more.yaml] [--set train.lr=1e-4 train.max_steps=10 ...]
    mdm-scale data synth --out data/synth [--train 20000 --eval 500 --seed 0]
    mdm-scale data tokenize --input 'corpus/*.jsonl' --out tokens/corpus [--config c.yaml] [--set data.tokenizer=DIR]
    mdm-scale eval --checkpoint runs/x --data data/synth/eval.jsonl --out runs/x/pred.jsonl
    mdm-scale generate --checkpoint runs/x --prompt "Mia has 3 shells. ..."
    mdm-scale export --checkpoint runs/x --out exports/x
    mdm-scale lm-eval --model mdm_scale --model_args pretrained=exports/x,gen_length=128 --tasks gsm8k
    mdm-scale variance measure --config configs/quickstart.yaml [--checkpoint DIR] --out report.json
    mdm-scale variance summary report.json ...
    mdm-scale variance plot-online runs/x/tensorboard --out abc.png
    mdm-scale experiment run --config task.yaml --methods standard,mirror --seeds 1,2 --eval-data eval.jsonl --out D
    mdm-scale experiment errors --family arith D/runs/*/mb_*/seed_*/pred.jsonl

Each group registers its own subcommands: ``generation/cli.py``, ``variance/cli.py``, ``experiments/cli.py``.

``train`` runs as one plain process or under any launcher that sets RANK/WORLD_SIZE (``deepspeed``,
``torchrun``) or under ``srun``/``mpirun`` (MPI discovery), e.g.

    deepspeed --num_gpus 8 --module mdm_scale.cli train --config configs/pretrain_8b.yaml

Exit status of ``train`` (``docs/operations.md``): 0 finished; 2 bad input (config, data, checkpoint, or a
memory plan that does not fit the machine), with a one-line message; 3 stopped after
``train.max_nonfinite_steps`` non-finite steps in a row (last good state saved); 75 stopped by SIGUSR1/SIGTERM
after saving a checkpoint (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train(args: argparse.Namespace) -> int:
    from mdm_scale.config.loader import load_config

    config = load_config(args.config, args.set)  # fails on bad keys before anything heavy is imported
    from mdm_scale.training.preemption import EXIT_PREEMPTED, ignore, install

    install()  # SIGUSR1/SIGTERM from here on mean "checkpoint and stop at the next step"
    from mdm_scale.training.metrics import quiet_third_party_logs

    quiet_third_party_logs()
    import torch.distributed as dist

    from mdm_scale.distributed.env import shutdown_distributed
    from mdm_scale.training.trainer import train

    starts_the_group = not dist.is_initialized()  # in-process callers (tests, notebooks) may hold one already
    summary = train(config)
    if summary["stopped_by"] is not None:
        ignore()  # the checkpoint is complete; exit 75 even when a launcher now SIGTERMs this rank
    elif starts_the_group:
        shutdown_distributed()  # every rank finished the run (a stopped one leaves as its launcher kills it)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final": summary}), flush=True)
    return 0 if summary["stopped_by"] is None else EXIT_PREEMPTED


def _synth(args: argparse.Namespace) -> int:
    from mdm_scale.data.synthetic import write_synthetic_task

    paths = write_synthetic_task(args.out, train=args.train, eval=args.eval, seed=args.seed, min_ops=args.min_ops,
                                 max_ops=args.max_ops, pretrain=args.pretrain, family=args.family)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    """One source into a token store (``data/store.py``); under a launcher the work is split over the ranks."""
    from pathlib import Path

    from mdm_scale.config.loader import load_config

    config = load_config(args.config, args.set)
    from mdm_scale.data.build import tokenize_source
    from mdm_scale.data.cache import Ranks
    from mdm_scale.distributed.env import launched_or_single

    ranks = Ranks.of(launched_or_single())
    summary = tokenize_source(config.data, config.seed, args.input, Path(args.out), ranks)
    if ranks.rank == 0:
        print(json.dumps(summary), flush=True)
    return 0


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    """``--set a=1 b=2`` and ``--set a=1 --set b=2`` both give ``args.set == ["a=1", "b=2"]``, applied in order."""
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys (several pairs per --set; --set may repeat)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdm-scale", description="Masked diffusion LM training on DeepSpeed.")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model")
    train.add_argument("--config", action="append", required=True, help="YAML file; repeat to merge several")
    _add_overrides(train)
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(func=_train)

    data = commands.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a synthetic reasoning task (train/eval JSONL)")
    synth.add_argument("--out", default="data/synth")
    from mdm_scale.data.synthetic import FAMILIES  # no torch: the parser stays light

    synth.add_argument("--family", default="arith", choices=list(FAMILIES),
                       help="arith: word problems; add: multi-digit +/-; sort: digits; count: a digit's "
                            "occurrences; common: the digits two lists share; missing: the digits a list lacks; "
                            "minmax: a list's smallest and largest digit; lookup: variable chains")
    synth.add_argument("--train", type=int, default=20000)
    synth.add_argument("--eval", type=int, default=500)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--min-ops", type=int, default=1,
                       help="smallest problem size: operations (arith), digits (add), list length (sort, count, "
                            "common, missing, minmax), hops (lookup)")
    synth.add_argument("--max-ops", type=int, default=3, help="largest problem size (see --min-ops)")
    synth.add_argument("--pretrain", type=int, default=0, help="also write this many {text} records")
    synth.set_defaults(func=_synth)
    tokenize = data.add_parser("tokenize", help="tokenize one source (file, glob or directory) into a token store "
                               "that training memory-maps (data.train_files: [{path: OUT}])")
    tokenize.add_argument("--input", required=True, help="a JSONL, parquet or Arrow file, a glob, or a directory")
    tokenize.add_argument("--out", required=True, help="the token store directory to write (must not exist)")
    tokenize.add_argument("--config", action="append", default=[],
                          help="YAML whose data section sets the tokenizer and options (repeat to merge)")
    _add_overrides(tokenize)
    tokenize.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    tokenize.set_defaults(func=_tokenize)
    from mdm_scale.experiments.cli import add_experiment_commands
    from mdm_scale.generation.cli import add_generation_commands
    from mdm_scale.variance.cli import add_variance_commands

    add_generation_commands(commands)
    add_variance_commands(commands, _add_overrides)
    add_experiment_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mdm_scale.variance.cli import with_subcommand

    parser = build_parser()
    args, rest = parser.parse_known_args(with_subcommand(sys.argv[1:] if argv is None else list(argv)))
    if args.command == "lm-eval":  # its arguments are lm-eval's own
        args.harness_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from mdm_scale.config.schema import ConfigError
    from mdm_scale.data.records import DataError
    from mdm_scale.generation.sampler import GenerationError
    from mdm_scale.training.checkpoint import CheckpointError
    from mdm_scale.training.faults import EXIT_NONFINITE, NonFiniteError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, GenerationError, FileNotFoundError, FileExistsError) as err:
        print(f"mdm-scale: error: {err}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteError as err:
        print(f"mdm-scale: error: {err}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE


if __name__ == "__main__":
    sys.exit(main())
