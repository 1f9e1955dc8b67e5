"""Masking-rate samplers: one t per sequence, with its importance weight against U(0, 1).

Contract (SPEC sections 1 and 3.1): a sampler with density p on (0, 1) returns ``weight = 1 / p(t)``, so for
any function f, E_{t~p}[weight * f(t)] = integral_0^1 f(t) dt: the weighted loss estimates the same objective
as uniform t, and only its variance changes. Draws are keyed by (seed, sample index, stream)
(``noise.py``), never by rank. Samplers that adapt (P-POTS) receive per-sequence loss statistics through
``observe`` and keep them in ``state_dict`` for checkpoints.
"""

from __future__ import annotations

import torch

from mdm_scale.diffusion.noise import Stream, keyed_uniform


class TSampler:
    """Base class: uniform t with weight 1. Subclasses override ``sample`` (and the statistics hooks)."""

    name = "uniform"

    def __init__(self, seed: int):
        self.seed = seed

    def sample(self, sample_index: torch.Tensor, stream: int = Stream.T) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weight), both float32 of shape (B,)."""
        return self.transform(self.uniforms(sample_index, stream))

    def uniforms(self, sample_index: torch.Tensor, stream: int = Stream.T) -> torch.Tensor:
        """One U(0, 1) draw per sequence, keyed by its sample index."""
        return keyed_uniform(self.seed, sample_index, stream)

    def transform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map uniforms to (t, weight): t = F^-1(u) for this sampler's distribution F."""
        return u, torch.ones_like(u)

    def observe(self, t: torch.Tensor, sample_loss: torch.Tensor, pair_sq_diff: torch.Tensor | None) -> None:
        """Per-sequence unweighted losses of a training micro-batch (device tensors; no host sync)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"t-sampler '{self.name}' has no state, got keys {sorted(state)}")


UniformT = TSampler

T_SAMPLERS: dict[str, type[TSampler]] = {"uniform": UniformT}


def build_t_sampler(name: str, seed: int) -> TSampler:
    return T_SAMPLERS[name](seed)
