"""Preemption: SIGUSR1 or SIGTERM asks the run to stop; all ranks stop together at the next step boundary.

Cluster schedulers warn a job before they kill it: SLURM sends ``--signal=USR1@120`` two minutes before the
time limit and SIGTERM (then SIGKILL after ``GraceTime``/``KillWait``) when it preempts or cancels the job. The
signal may reach only some ranks (e.g. a node-local signal), so each rank only records it, and at every step
boundary the ranks take the maximum of their flags over a CPU (gloo) group: when any rank has been signalled,
every rank sees it at the same step, the trainer writes a checkpoint with all ranks and the process exits with
:data:`EXIT_PREEMPTED`. A launcher script then requeues the job (``launch/slurm/train.sbatch``), and the next
run resumes from that checkpoint (``train.resume=auto``).

The handlers are installed as early as possible (``install`` in ``cli.py``, before heavy imports); the launch
scripts start the ranks with SIGUSR1 ignored, so a signal that arrives even earlier is dropped rather than
killing the process (USR1's default action).
"""

from __future__ import annotations

import signal
import sys

import torch

from mdm_scale.distributed.env import DistEnv, control_group

EXIT_PREEMPTED = 75
"""Exit status after a signal-triggered checkpoint (``EX_TEMPFAIL``: run the same command again to resume)."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []


def _record(signum, frame) -> None:
    if not _received:
        print(f"mdm-scale: received {signal.Signals(signum).name}; will checkpoint and stop at the next step "
              f"boundary", file=sys.stderr, flush=True)
    _received.append(signum)


def install() -> None:
    """Record SIGUSR1/SIGTERM instead of dying (main thread only; a no-op elsewhere)."""
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _record)
    except ValueError:  # not the main thread (e.g. an embedding application): leave its handlers alone
        pass


def ignore() -> None:
    """After the stop checkpoint: ignore further stop signals. The first rank to exit with status 75 makes
    ``srun --kill-on-bad-exit`` or the deepspeed launcher SIGTERM the others, and Python's shutdown puts back
    the default action for signals it handled (which would turn their exit 75 into a kill), not for ignored
    ones."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """``should_stop()`` is the same on every rank: True once any rank has received a stop signal."""

    def __init__(self, env: DistEnv):
        install()
        self.env = env
        self.group = control_group() if env.world_size > 1 else None

    def should_stop(self) -> bool:
        flag = torch.tensor([1 if _received else 0], dtype=torch.int32)
        if self.group is not None:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def acknowledge(self) -> str:
        """The stop is being honoured: clear the record and say what asked for it."""
        name = signal.Signals(_received[0]).name if _received else "a stop signal on another rank"
        _received.clear()
        return name

