"""Where this process sits in the job: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

``torch.distributed`` reads these from the environment. They come from, in order:

1. a launcher that already set them (``deepspeed``, ``torchrun``): nothing to do;
2. ``srun`` starting one task per GPU: SLURM's step variables (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
   ``SLURM_LOCALID``; the first node of ``SLURM_STEP_NODELIST`` is the master) — no MPI needed;
3. ``mpirun``/``mpiexec`` (or ``srun --mpi=pmi2``): DeepSpeed's ``auto_mpi_discovery`` asks mpi4py, which
   ``init_distributed`` enables when neither of the above applies.

The master port is ``MASTER_PORT`` when set, else derived from the SLURM job id (so concurrent jobs on one
node do not collide, and a requeued job keeps its port), else, for one plain process (no launcher, no srun
step, an MPI world of one), a free port that the operating system picks (so two plain runs on one machine do
not collide; ``init_distributed`` logs it), else DeepSpeed's default 29500 (every ``mpirun`` rank must agree).
"""

from __future__ import annotations

import os
import re
import socket

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what DeepSpeed requires
DEFAULT_PORT = 29500  # DeepSpeed's and torchrun's


def launcher_set_env(environ=os.environ) -> bool:
    return all(name in environ for name in LAUNCHER_VARS)


def first_host(nodelist: str) -> str:
    """First host of a SLURM host list: ``"gpu-[003-005,009],cpu1"`` -> ``"gpu-003"``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", nodelist[:end])


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Entry ``node_id`` of SLURM's compressed ``"2(x3),1"`` (= 2, 2, 2, 1) task counts."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot read SLURM tasks per node {tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id]


def slurm_step_env(environ=os.environ) -> dict[str, str] | None:
    """The torch.distributed variables of an ``srun`` task, or None outside an srun step."""
    if "SLURM_STEP_NUM_TASKS" not in environ or "SLURM_PROCID" not in environ:
        return None  # not inside srun (the batch script itself also has SLURM_PROCID=0)
    node_id = int(environ.get("SLURM_NODEID", "0"))
    port = environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "9500")) % 20000)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(tasks_on_node(environ.get("SLURM_STEP_TASKS_PER_NODE", "1"), node_id)),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(environ["SLURM_STEP_NODELIST"]),
        "MASTER_PORT": port,
    }


def discover(environ=os.environ) -> str:
    """Fill in the variables where a launcher did not; returns how this process was started."""
    if launcher_set_env(environ):
        return "launcher"
    slurm = slurm_step_env(environ)
    if slurm is not None:
        environ.update(slurm)
        return "srun"
    return "mpi"


def master_port(how: str, environ=os.environ) -> tuple[int, bool]:
    """``(port, picked)``: ``MASTER_PORT`` if set; a free port (``picked``) for one plain process, i.e. ``how``
    is ``"mpi"`` and the MPI world has one process; else ``DEFAULT_PORT``."""
    if environ.get("MASTER_PORT"):
        return int(environ["MASTER_PORT"]), False
    if how == "mpi":
        from mpi4py import MPI  # what DeepSpeed's MPI discovery asks next anyway

        if MPI.COMM_WORLD.Get_size() == 1:
            return free_port(), True
    return DEFAULT_PORT, False


def free_port() -> int:
    """A TCP port that no process listens on now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
