"""Elastic resume of the noise services' per-rank state (``training/checkpoint.py``, ``load_rank_parts``).

A checkpoint written by W ranks holds each rank's state: the pooled statistics (the same on every rank) and the
sums pending since the last pooling (each rank's own). Resumed on W' ranks, the next pooling must sum every old
rank's pending sums exactly once: new ranks start with none, and the ranks that remain take over the dropped ones'.
The services here are the real ones (P-POTS, the online variance monitor, the EMA baseline), their state written
as the trainer writes it (``rank_state<r>.pt`` and the manifest's world size)."""

from __future__ import annotations

import json

import pytest
import torch

from mdm_scale.config.variance import PPOTSConfig
from mdm_scale.diffusion.ema_baseline import EMABaseline
from mdm_scale.diffusion.online_variance import STEP_COLUMNS, MonitorSettings, VarianceMonitor
from mdm_scale.diffusion.ppots import STAT_COLUMNS, PPOTSSampler
from mdm_scale.training.checkpoint import MANIFEST, load_rank_parts

BINS, EVERY = 4, 3


def services() -> dict:
    return {"t_sampler": PPOTSSampler(1, PPOTSConfig(bins=BINS, refit_every=EVERY)),
            "variance_monitor": VarianceMonitor(MonitorSettings(every=EVERY)),
            "ema": EMABaseline(2, 0.1, torch.device("cpu"))}


def pending(parts: dict) -> dict[str, torch.Tensor]:
    return {"t_sampler": parts["t_sampler"].sums.pending_sums.host(),
            "variance_monitor": parts["variance_monitor"].pending.host()}


def write_checkpoint(path, world: int) -> list[dict]:
    """Old ranks with the same pooled state and their own integer-valued pending sums (sums of them are exact)."""
    g = torch.Generator().manual_seed(world)
    shared = torch.randint(0, 50, (BINS, STAT_COLUMNS), generator=g).double()
    pooled = torch.randint(0, 50, VarianceMonitor(MonitorSettings(every=EVERY)).pooled.shape, generator=g).double()
    old = []
    for rank in range(world):
        parts = services()
        parts["t_sampler"].sums.statistics = shared.clone()
        parts["t_sampler"].sums.add(torch.randint(0, 9, (BINS, STAT_COLUMNS), generator=g).double())
        monitor = parts["variance_monitor"]
        monitor.pooled, monitor.previous_mean, monitor.position = pooled.clone(), 2.5, 2
        for slot in range(2):
            monitor.pending.add(torch.randint(0, 9, (STEP_COLUMNS,), generator=g).double(), at=slot)
        parts["ema"].baseline = torch.tensor([float(rank), 10.0 + rank])
        state = {name: part.state_dict() for name, part in parts.items()}
        torch.save(state, path / f"rank_state{rank}.pt")
        old.append(state)
    (path / MANIFEST).write_text(json.dumps({"step": 8, "world_size": world}))
    return old


@pytest.mark.parametrize("old_world, new_world", [(2, 4), (4, 2), (3, 2), (2, 2)])
def test_pending_sums_are_pooled_exactly_once_after_a_change_of_the_world_size(tmp_path, old_world, new_world):
    """W -> 2W: the new ranks start empty (rank 0's pending sums are not counted again); 2W -> W and 3 -> 2: rank
    r takes over the old ranks r, r + W', ...; in every case the pending sums of the new ranks add up exactly to
    those of the old ranks, and the pooled parts are rank 0's on every rank. The EMA baseline (no pooled sums)
    takes its old rank's state, or rank 0's on a new rank. (Planted: every rank taking its own old state or rank
    0's, as before issue 26, fails W -> 2W (rank 0's counted twice) and 2W -> W (the dropped ranks' lost).)"""
    old = write_checkpoint(tmp_path, old_world)
    new = []
    for rank in range(new_world):
        parts = services()
        load_rank_parts(parts, tmp_path, rank, new_world)
        new.append(parts)
    for name in ("t_sampler", "variance_monitor"):
        before = sum(state[name]["pending"] for state in old)
        after = sum(pending(parts)[name] for parts in new)
        assert torch.equal(after, before), name
    for rank, parts in enumerate(new):
        assert torch.equal(parts["t_sampler"].sums.statistics, old[0]["t_sampler"]["statistics"])
        monitor = parts["variance_monitor"]
        assert torch.equal(monitor.pooled, old[0]["variance_monitor"]["pooled"])
        assert (monitor.previous_mean, monitor.position) == (2.5, 2)
        taken = rank if rank < old_world else 0
        assert parts["ema"].baseline.tolist() == [float(taken), 10.0 + taken]
        if rank >= old_world:
            assert not pending(parts)["t_sampler"].any() and not pending(parts)["variance_monitor"].any()
