"""Statistics summed on each rank's device and pooled over ranks at a fixed cadence, with decay.

P-POTS's per-t-bin loss sums (``ppots.py``) and the online variance monitor's sums (``online_variance.py``) are
both kept this way. Between poolings, ``add`` sums a micro-batch's statistics into this rank's *pending* tensor on
the device (no host synchronisation). After every ``every``-th optimiser step, ``pool`` sums the pending tensors
of all ranks with one all-reduce, empties them, and accumulates

    pooled <- decay * pooled + (sum over ranks of the pending sums),     decay = 0.5^(every / half_life)

on the host, identical on every rank: a sum in which the statistics of k poolings ago count decay^k.

State (``state_dict``): ``statistics`` (the pooled sums, the same on every rank) and ``pending`` (this rank's own
sums since the last pooling), kept apart so that a resume may treat them differently.
"""

from __future__ import annotations

import torch

from mdm_scale.distributed.env import all_reduce_sum


def collective_device() -> torch.device:
    """Where this process runs its collectives: the current GPU, else the host."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class PooledSums:
    def __init__(self, shape: tuple[int, ...], every: int, decay: float):
        self.shape, self.every, self.decay = tuple(shape), every, decay
        self.statistics = torch.zeros(self.shape, dtype=torch.float64)
        self.pending: torch.Tensor | None = None  # on the device of the first ``add``

    def due(self, step: int) -> bool:
        """Whether optimiser step ``step`` (1-based) ends with a pooling."""
        return self.every > 0 and step % self.every == 0

    def add(self, sums: torch.Tensor) -> None:
        """Add one micro-batch's float64 sums (of ``shape``) to this rank's pending sums, on their device."""
        if self.pending is None:
            self.pending = torch.zeros_like(sums)
        elif self.pending.device != sums.device:  # restored from a checkpoint on the host
            self.pending = self.pending.to(sums.device)
        self.pending += sums

    def pool(self) -> torch.Tensor:
        """All ranks' pending sums (one all-reduce; every rank calls this at the same steps), accumulated into
        ``statistics``; returns the sums of this pooling (host)."""
        if self.pending is None:
            self.pending = torch.zeros(self.shape, dtype=torch.float64, device=collective_device())
        reduced = all_reduce_sum(self.pending.clone()).cpu()
        self.pending.zero_()
        self.accumulate(reduced)
        return reduced

    def accumulate(self, new: torch.Tensor) -> None:
        """``statistics <- decay * statistics + new`` (``new`` the same on every rank, e.g. already pooled)."""
        self.statistics = self.decay * self.statistics + new.to(torch.float64)

    def state_dict(self) -> dict:
        pending = self.pending.cpu().clone() if self.pending is not None else torch.zeros(self.shape,
                                                                                          dtype=torch.float64)
        return {"statistics": self.statistics.clone(), "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        self.statistics = state["statistics"].to(torch.float64, copy=True)
        self.pending = state["pending"].to(torch.float64, copy=True)
