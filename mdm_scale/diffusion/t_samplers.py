"""Masking-rate samplers: one t per sequence, with its importance weight against U(0, 1).

Contract (docs/spec.md sections 1 and 3.1): a sampler with density p on (0, 1) returns ``weight = 1 / p(t)``, so for
any function f, E_{t~p}[weight * f(t)] = integral_0^1 f(t) dt: the weighted loss estimates the same objective
as uniform t, and only its variance changes.

Every sampler is two steps, ``sample = transform(uniforms(...))``:

- ``uniforms(sample_index, stream) -> u``: one U(0, 1) number per sequence, keyed by (seed, global sample
  index, stream) (``noise.py``), never by rank or draw order. A stratified sampler replaces only this step.
- ``transform(u) -> (t, weight)``: the inverse CDF of p and 1 / p(t) at the t it returns (uniform: identity and
  weight 1; P-POTS: ``ppots.py``). The weight therefore always belongs to the density t was drawn from.

Adaptive samplers (P-POTS) also use the statistics hooks: ``observe`` receives each training micro-batch's
unweighted per-sequence losses as device tensors (accumulate on the device, never synchronise there),
``on_optimizer_step`` runs after every optimiser step on every rank and may run collectives (all-reduce,
refit), ``state_dict`` / ``load_state_dict`` hold everything needed to resume (saved per rank), and
``log_statistics`` returns what TensorBoard shows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mdm_scale.core.noise import Stream, keyed_uniform

# ``log_statistics`` values: a float is a scalar, a 1-D tensor a histogram, a callable returns a matplotlib
# figure (called only where it is written, so other ranks pay nothing for plotting).
LogValue = float | torch.Tensor | Callable[[], Any]


class TSampler:
    """Base class: uniform t with weight 1, no state. Subclasses override ``transform`` and the hooks."""

    name = "uniform"

    def __init__(self, seed: int):
        self.seed = seed

    # ---- drawing --------------------------------------------------------------------------------------------
    def uniforms(self, sample_index: torch.Tensor, stream: int = Stream.T) -> torch.Tensor:
        """u ~ U(0, 1) per sequence, float32 (B,), keyed by (seed, sample index, stream)."""
        return keyed_uniform(self.seed, sample_index, stream)

    def transform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weight) from u: t = F^-1(u) and weight = 1 / p(t), float32 (B,). Uniform: (u, 1)."""
        return u, torch.ones_like(u)

    def sample(self, sample_index: torch.Tensor, stream: int = Stream.T) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weight), both float32 of shape (B,)."""
        return self.transform(self.uniforms(sample_index, stream))

    # ---- statistics hooks (no-ops for fixed samplers) -------------------------------------------------------
    def observe(self, t: torch.Tensor, sample_loss: torch.Tensor, pair_sq_diff: torch.Tensor | None) -> None:
        """One training micro-batch: t (B,), the unweighted per-sequence loss (B,) and, with MIRROR, the squared
        difference of the two rows' losses (B,; NaN where a sequence has one row). Device tensors; no sync."""

    def on_optimizer_step(self, step: int) -> bool:
        """Called on every rank after optimiser step ``step`` (1-based). Returns True if p(t) changed."""
        return False

    def changes_after(self, step: int) -> bool:
        """Whether ``on_optimizer_step(step)`` may change p(t); until then draws are fixed by their keys, so the
        trainer may corrupt the next step's first micro-batch early."""
        return False

    def log_statistics(self) -> dict[str, LogValue]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"t-sampler '{self.name}' has no state, got keys {sorted(state)}")


UniformT = TSampler
