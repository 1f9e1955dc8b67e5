"""Masking-rate samplers: one t per sequence, with its importance weight against U(0, 1).

Contract (docs/spec.md sections 1 and 3.1): a sampler with density p on (0, 1) returns ``weight = 1 / p(t)``, so for
any function f, E_{t~p}[weight * f(t)] = integral_0^1 f(t) dt: the weighted loss estimates the same objective
as uniform t, and only its variance changes.

Every sampler is two steps, ``sample = transform(uniforms(...))``:

- ``uniforms(sample_index, stream) -> u``: one U(0, 1) number per sequence, keyed by (seed, global sample
  index, stream) (``noise.py``), never by rank or draw order. A stratified sampler replaces only this step.
- ``transform(u) -> (t, weight)``: the inverse CDF of p and 1 / p(t) at the t it returns (uniform: identity and
  weight 1; P-POTS: ``ppots.py``). The weight therefore always belongs to the density t was drawn from.

A t-sampler is a noise service (``service.py``): an adaptive one (P-POTS) observes each training micro-batch,
refits at optimiser steps (``on_optimizer_step``, collectives allowed), says when the next step's draws change
(``changes_after``), logs its statistics and checkpoints its state. Each kind of ``variance.t_sampler``
(``config/variance.py``) is built by the sampler class declared with ``config=`` that kind's class
(``components.py``); ``from_config`` makes one.
"""

from __future__ import annotations

import torch

from mdm_scale.config.variance import TSamplerConfig, UniformTConfig
from mdm_scale.core.noise import Stream, keyed_uniform
from mdm_scale.diffusion.components import Component
from mdm_scale.diffusion.service import LogValue, NoiseService


class TSampler(NoiseService, Component, family=True, config=UniformTConfig):
    """Base class: uniform t with weight 1, no state. Subclasses override ``transform`` and the hooks."""

    name = "uniform"
    state_key = "t_sampler"
    log_prefix = "t_sampler"

    def __init__(self, seed: int):
        self.seed = seed

    @classmethod
    def from_config(cls, config: TSamplerConfig, seed: int) -> TSampler:
        """The sampler of kind ``config`` (a subclass with fields overrides this)."""
        return cls(seed)

    # ---- drawing --------------------------------------------------------------------------------------------
    def uniforms(self, sample_index: torch.Tensor, stream: int = Stream.T) -> torch.Tensor:
        """u ~ U(0, 1) per sequence, float32 (B,), keyed by (seed, sample index, stream)."""
        return keyed_uniform(self.seed, sample_index, stream)

    def transform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weight) from u: t = F^-1(u) and weight = 1 / p(t), float32 (B,). Uniform: (u, 1)."""
        return u, torch.ones_like(u)

    def quantile(self, t: torch.Tensor) -> torch.Tensor:
        """u = F(t), the inverse of ``transform``'s t (float64): where t lies in the distribution it was drawn
        from (the online variance monitor's strata of equal probability). Uniform: t itself."""
        return t.to(torch.float64)

    def sample(self, sample_index: torch.Tensor, stream: int = Stream.T) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weight), both float32 of shape (B,)."""
        return self.transform(self.uniforms(sample_index, stream))

    # ---- the service (no-ops for fixed samplers) ------------------------------------------------------------
    def log(self, step: int, interval: bool) -> dict[str, LogValue]:
        return self.log_statistics() if interval else {}

    def log_statistics(self) -> dict[str, LogValue]:
        """What TensorBoard shows under ``t_sampler/`` at each log interval."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"t-sampler '{self.name}' has no state, got keys {sorted(state)}")


UniformT = TSampler
