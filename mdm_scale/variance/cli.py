"""The ``variance`` subcommands of ``mdm-scale`` (registered by ``mdm_scale/cli.py``), docs/variance.md:

    mdm-scale variance measure --config run.yaml [--checkpoint DIR] --out report.json   the A/B/C decomposition
    mdm-scale variance summary report.json ...                  shares, the MIRROR rule, variance ratios (markdown)
    mdm-scale variance plot-online RUN/tensorboard --out abc.png   a training run's online A/B/C along training

``mdm-scale variance --config ...`` without a subcommand is ``variance measure`` (the spelling before the
subcommands existed). ``measure`` runs under a launcher (``deepspeed --num_gpus N --module mdm_scale.cli variance
measure ...``); rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SUBCOMMANDS = ("measure", "summary", "plot-online")


def _measure(args: argparse.Namespace) -> int:
    from mdm_scale.config.loader import load_config
    from mdm_scale.variance.runner import ToolSettings

    config = load_config(args.config, args.set)
    settings = ToolSettings(methods=args.methods.split(","), num_x0=args.x0, num_t=args.t_draws,
                            num_masks=args.masks, grad_dim=args.grad_dim, strats_batch=args.strats_batch)
    from mdm_scale.training.metrics import quiet_third_party_logs

    quiet_third_party_logs()
    from mdm_scale.variance.runner import run_variance

    run_variance(config, settings, Path(args.out), args.checkpoint)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"variance report: {args.out}", flush=True)
    return 0


def _summary(args: argparse.Namespace) -> int:
    from mdm_scale.variance.summary import summary_table

    print(summary_table(args.reports))
    return 0


def _plot_online(args: argparse.Namespace) -> int:
    from mdm_scale.variance.online_plot import plot_online_abc

    print(f"wrote {plot_online_abc(args.tensorboard_dir, args.out, args.title)}")
    return 0


def add_variance_commands(commands, add_overrides) -> None:
    """``add_overrides(parser)`` adds ``--set`` (``mdm_scale/cli.py``)."""
    from mdm_scale.config.methods import VARIANCE_DEFAULT, methods_help

    variance = commands.add_parser("variance", help="variance of the training loss and gradient (docs/variance.md)")
    sub = variance.add_subparsers(dest="variance_command", required=True)

    measure = sub.add_parser("measure", help="measure the A/B/C variance decomposition of each method")
    measure.add_argument("--config", action="append", required=True, help="YAML file; repeat to merge several")
    add_overrides(measure)
    measure.add_argument("--checkpoint", default=None,
                         help="the weights to measure: a run's output directory, a checkpoints/step_* directory or "
                              "an export")
    measure.add_argument("--out", required=True, help="report JSON path; plots and TensorBoard go next to it")
    measure.add_argument("--methods", default=",".join(VARIANCE_DEFAULT), help=methods_help(measurable_only=True))
    measure.add_argument("--x0", type=int, default=64, help="sequences of data")
    measure.add_argument("--t-draws", type=int, default=8, help="masking-rate draws per unit of data")
    measure.add_argument("--masks", type=int, default=4, help="mask draws per (data, rate)")
    measure.add_argument("--grad-dim", type=int, default=1021, help="gradient sketch dimension; 0 = loss only")
    measure.add_argument("--strats-batch", type=int, default=16, help="global batch that StraTS stratifies")
    measure.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    measure.set_defaults(func=_measure)

    summary = sub.add_parser("summary", help="A/B/C shares, whether MIRROR pays, variance ratios (markdown)")
    summary.add_argument("reports", nargs="+", type=Path, help="JSON reports of mdm-scale variance measure")
    summary.set_defaults(func=_summary)

    plot = sub.add_parser("plot-online", help="plot a training run's online A/B/C from its TensorBoard logs")
    plot.add_argument("tensorboard_dir", type=Path, help="the run's TensorBoard directory")
    plot.add_argument("--out", type=Path, required=True, help="PNG to write")
    plot.add_argument("--title", default="online A/B/C")
    plot.set_defaults(func=_plot_online)


def with_subcommand(argv: list[str]) -> list[str]:
    """``argv`` with ``measure`` after ``variance`` when no subcommand follows it (``mdm-scale variance --config
    ...``, the spelling before the subcommands)."""
    positions = [i for i, arg in enumerate(argv) if not arg.startswith("-")]
    if positions and argv[positions[0]] == "variance":
        at = positions[0] + 1
        if at == len(argv) or argv[at] not in (*SUBCOMMANDS, "-h", "--help"):
            return [*argv[:at], "measure", *argv[at:]]
    return argv
