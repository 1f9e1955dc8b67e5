"""The Clipped baseline (docs/spec.md section 3; Table 1 in section 6.1): t ~ U[beta, omega], after Arriola et
al. 2025 (BD3-LM).

The loss weight stays 1 (not 1/p(t) = omega - beta), as in BD3-LM's clipped schedule, so the estimator is
*biased* for the standard objective: with f(t) = E_{x0, M}[l | t] its expectation is

    E[l] = (1 / (omega - beta)) * integral_beta^omega f(t) dt      instead of      integral_0^1 f(t) dt,

i.e. it trains on the average per-token loss over the clipped rates only, dropping the nearly-clean (t < beta)
and nearly-fully-masked (t > omega) ends. ``mdm-scale variance`` reports each method's mean loss, which shows
this bias next to the variance it removes (the 1/pi(t) weights of small t are the largest source of (A)).
"""

from __future__ import annotations

import torch

from mdm_scale.config.variance import ClippedTConfig
from mdm_scale.diffusion.t_samplers import TSampler


class ClippedT(TSampler, config=ClippedTConfig):
    name = "clipped"

    def __init__(self, seed: int, low: float, high: float):
        super().__init__(seed)
        self.low, self.high = low, high

    @classmethod
    def from_config(cls, config: ClippedTConfig, seed: int) -> ClippedT:
        return cls(seed, config.low, config.high)

    def transform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.low + (self.high - self.low) * u, torch.ones_like(u)

    def quantile(self, t: torch.Tensor) -> torch.Tensor:
        return ((t.to(torch.float64) - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
