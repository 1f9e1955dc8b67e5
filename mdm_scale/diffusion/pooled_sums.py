"""Statistics summed on each rank's device and pooled over ranks at a fixed cadence.

P-POTS's per-t-bin loss sums (``ppots.py``) and the online variance monitor's per-step sums (``online_variance.py``)
are both kept this way. Between poolings, ``add`` sums a micro-batch's statistics into this rank's *pending*
tensor on the device (no host synchronisation). At a pooling, ``reduce`` sums the pending tensors of all ranks
with one all-reduce and empties them. :class:`PendingSums` is that part alone (the monitor turns each reduction
into its own decayed moments); :class:`PooledSums` also accumulates the reductions, after every ``every``-th
optimiser step (``pool``),

    pooled <- decay * pooled + (sum over ranks of the pending sums),     decay = 0.5^(every / half_life)

on the host, identical on every rank: a sum in which the statistics of k poolings ago count decay^k.

State: the pooled sums (``statistics``, the same on every rank) and this rank's ``pending`` sums are kept apart,
because an elastic resume treats them differently (``load_state_dict``): the pooled part comes from any rank, the
pending parts of the old ranks are summed into the ranks that take them over, so that after a change of the world
size the next pooling sums exactly what the old ranks had pending, each once (``training/checkpoint.py``).
"""

from __future__ import annotations

import torch

from mdm_scale.distributed.env import all_reduce_sum


def collective_device() -> torch.device:
    """Where this process runs its collectives: the current GPU, else the host."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def due(step: int, every: int) -> bool:
    """Whether optimiser step ``step`` (1-based) ends with a pooling every ``every`` steps (0: never)."""
    return every > 0 and step % every == 0


class PendingSums:
    """This rank's float64 sums of ``shape`` since the last ``reduce``, on the device of the first ``add``."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.tensor: torch.Tensor | None = None

    def add(self, sums: torch.Tensor, at: int | None = None) -> None:
        """Add float64 ``sums`` of ``shape`` (or, with ``at``, of ``shape[1:]`` into row ``at``) on their device."""
        if self.tensor is None:
            self.tensor = torch.zeros(self.shape, dtype=torch.float64, device=sums.device)
        elif self.tensor.device != sums.device:  # restored from a checkpoint on the host
            self.tensor = self.tensor.to(sums.device)
        if at is None:
            self.tensor += sums
        else:
            self.tensor[at] += sums

    @property
    def device(self) -> torch.device:
        """Where the sums live (where this rank's collectives run before the first ``add``)."""
        return self.tensor.device if self.tensor is not None else collective_device()

    def reduce(self) -> torch.Tensor:
        """The sum over ranks of the pending sums (one all-reduce; every rank calls this at the same steps), on
        the host; the pending sums are emptied."""
        if self.tensor is None:
            self.tensor = torch.zeros(self.shape, dtype=torch.float64, device=collective_device())
        reduced = all_reduce_sum(self.tensor.clone()).cpu()
        self.tensor.zero_()
        return reduced

    def host(self) -> torch.Tensor:
        """A host copy (zeros before the first ``add``)."""
        if self.tensor is None:
            return torch.zeros(self.shape, dtype=torch.float64)
        return self.tensor.cpu().clone()

    def load(self, parts: list[torch.Tensor]) -> None:
        """Pending sums restored as the sum of ``parts`` (the pending sums of the old ranks this rank takes over;
        none: empty), on the host until the next ``add``."""
        total = torch.zeros(self.shape, dtype=torch.float64)
        for part in parts:
            if tuple(part.shape) != self.shape:
                raise ValueError(f"pending sums of shape {tuple(part.shape)} in the checkpoint, {self.shape} here")
            total += part.to(torch.float64)
        self.tensor = total


class PooledSums:
    """Pending sums of ``shape`` per rank, pooled every ``every`` steps into decayed ``statistics`` (module
    docstring)."""

    def __init__(self, shape: tuple[int, ...], every: int, decay: float):
        self.shape, self.every, self.decay = tuple(shape), every, decay
        self.statistics = torch.zeros(self.shape, dtype=torch.float64)
        self.pending_sums = PendingSums(self.shape)

    @property
    def pending(self) -> torch.Tensor | None:
        """This rank's pending sums (None before the first ``add``)."""
        return self.pending_sums.tensor

    def due(self, step: int) -> bool:
        """Whether optimiser step ``step`` (1-based) ends with a pooling."""
        return due(step, self.every)

    def add(self, sums: torch.Tensor) -> None:
        """Add one micro-batch's float64 sums (of ``shape``) to this rank's pending sums, on their device."""
        self.pending_sums.add(sums)

    def pool(self) -> torch.Tensor:
        """All ranks' pending sums (one all-reduce; every rank calls this at the same steps), accumulated into
        ``statistics``; returns the sums of this pooling (host)."""
        reduced = self.pending_sums.reduce()
        self.accumulate(reduced)
        return reduced

    def accumulate(self, new: torch.Tensor) -> None:
        """``statistics <- decay * statistics + new`` (``new`` the same on every rank, e.g. already pooled)."""
        self.statistics = self.decay * self.statistics + new.to(torch.float64)

    def state_dict(self) -> dict:
        return {"statistics": self.statistics.clone(), "pending": self.pending_sums.host()}

    def load_state_dict(self, state: dict, pending_from: list[dict] | None = None) -> None:
        """The pooled statistics of ``state``; the pending sums of ``state`` itself, or, on an elastic resume,
        the sum of those of ``pending_from`` (the states of the old ranks this rank takes over; [] on a new
        rank)."""
        self.statistics = state["statistics"].to(torch.float64, copy=True)
        self.pending_sums.load([s["pending"] for s in (pending_from if pending_from is not None else [state])])
