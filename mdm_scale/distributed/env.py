"""Process-group set-up and the few collectives the rest of the code needs.

Works the same under the ``deepspeed`` launcher (any number of GPUs and nodes), ``srun`` (SLURM's variables),
``mpirun`` (DeepSpeed's MPI discovery through mpi4py) and as one plain process; ``discovery.py`` says which
applies. Without CUDA it selects DeepSpeed's CPU accelerator and the gloo backend.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mdm_scale.distributed.discovery import discover, master_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def select_accelerator() -> bool:
    """Tell DeepSpeed to use its CPU accelerator when there is no GPU; call before importing deepspeed."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return on_gpu


def init_distributed() -> DistEnv:
    on_gpu = select_accelerator()
    import deepspeed

    port, picked = master_port(discover())
    if picked:
        print(f"mdm-scale: one process without a launcher: rendezvous on free port {port} "
              f"(set MASTER_PORT to choose)", file=sys.stderr, flush=True)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=True,
                               distributed_port=port, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if not on_gpu:
        release_cpu_allreduce_buffer(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if on_gpu:
        local_rank %= torch.cuda.device_count()  # srun --gpus-per-task=1 shows each task only its own GPU
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    return DistEnv(rank, world, local_rank, device)


CPU_ALLREDUCE_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""The shared-memory buffer (~66 MB) that DeepSpeed's CPU accelerator maps for each rank when all ranks share one
host (the ``deepspeed`` launcher sets LOCAL_SIZE); DeepSpeed never unlinks it."""


def release_cpu_allreduce_buffer(rank: int) -> None:
    """Unlink this rank's CPU all-reduce buffer once every rank has mapped its peers' (each has when DeepSpeed's
    set-up returns; the barrier waits for all of them). The mappings stay valid and the memory is freed when the
    processes exit; left linked, every CPU launch would keep its ranks' buffers in RAM (tmpfs) for good."""
    barrier()
    Path(CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                     port=os.environ.get("MASTER_PORT", ""), rank=rank)).unlink(missing_ok=True)


def launched_or_single() -> DistEnv:
    """A process group when launched with several ranks (``init_distributed``); one plain process otherwise, on
    the first GPU if there is one (commands that also run without a launcher: eval, generate, tokenize)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(0, 1, 0, device)


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the process group down: a process that exits with it alive can abort in
    the backend's threads ("terminate called without an active exception") after its work is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


_control_group = None


def control_group():
    """A gloo group over all ranks for small host-side agreements (stop flags, checksums): its collectives
    never wait for the GPU stream. The default group when it already is gloo (CPU runs)."""
    global _control_group
    if _control_group is None:
        _control_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _control_group


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank, over the gloo control group; ``[obj]``
    without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=control_group())
    return gathered


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def check_ranks_agree(what: str, text: str, env: DistEnv) -> None:
    """Fail on every rank if ranks hold different ``text`` (config, data files, ...)."""
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
    mine = torch.tensor([digest], dtype=torch.int64, device=env.device)
    if env.world_size == 1:
        return
    gathered = [torch.zeros_like(mine) for _ in range(env.world_size)]
    dist.all_gather(gathered, mine)
    values = [int(g.item()) for g in gathered]
    if len(set(values)) > 1:
        differing = [r for r, v in enumerate(values) if v != values[0]]
        raise RuntimeError(f"ranks disagree on {what}: ranks {differing} differ from rank 0 "
                           f"(same config files and data on every node?)")


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (in place)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor
