"""Mask generators: which eligible tokens of each sequence are replaced by [MASK] at rate t.

docs/spec.md section 1: pi(t) = (1 - eps) t + eps, and M_i ~ Bernoulli(pi) independently for every eligible position
(response, non-pad); prompt and padding are never masked. A generator may emit several corrupted rows per
sequence (MIRROR emits two); ``row_scale`` is each row's share of its sequence's loss, and ``inclusion`` is the
probability with which each token was masked, so the objective can weight CE_i by 1/inclusion_i
(Horvitz-Thompson) and stay unbiased for any generator.

ISAD (docs/spec.md section 3.6, token-level importance sampling): tokens whose id is in ``boosted_ids`` are masked with
the higher probability q = min(pi + delta, 1) instead of pi; their CE is weighted by 1/q (Horvitz-Thompson), so
E[M_i / q_i] = 1 for every token. Caveat, stated in docs/variance.md: HT makes the *token sum* unbiased when a
token's CE does not depend on which other tokens are masked; for a real bidirectional model raising q also
changes the contexts of the other tokens, so ISAD estimates a slightly different objective (the paper's
prototype did the same). MIRROR composes: its second row masks {u_i > 1 - q_i}.

Each kind of ``variance.masks`` (``config/variance.py``) is built by the generator class declared with
``config=`` that kind's class (``components.py``); ``from_config`` makes one with the run's eps and ISAD ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mdm_scale.config.variance import BernoulliMasksConfig, ISADConfig, MaskConfig, MirrorMasksConfig
from mdm_scale.core.noise import keyed_uniform
from mdm_scale.diffusion.components import Component


def mask_probability(t: torch.Tensor, eps: float) -> torch.Tensor:
    return (1.0 - eps) * t + eps


@dataclass
class MaskDraw:
    """R corrupted rows for B sequences; row r corrupts sequence ``row_sample[r]``."""

    masked: torch.Tensor  # (R, L) bool
    inclusion: torch.Tensor  # (R, L) float32: P(token masked)
    row_sample: torch.Tensor  # (R,) int64
    row_scale: torch.Tensor  # (R,) float32, sums to 1 over the rows of one sequence


class BernoulliMasks(Component, family=True, config=BernoulliMasksConfig):
    """One row per sequence: M_i = [u_i < q_i] with u_i keyed by (seed, sample, position); q_i = pi(t), or
    min(pi(t) + delta, 1) for ISAD-boosted token ids. The base of the mask generators."""

    def __init__(self, seed: int, eps: float, boosted_ids: tuple[int, ...] = (), delta: float = 0.0):
        self.seed, self.eps = seed, eps
        self.boosted_ids = torch.tensor(sorted(boosted_ids), dtype=torch.int64)
        self.delta = delta

    @classmethod
    def from_config(cls, config: MaskConfig, seed: int, eps: float, isad: ISADConfig) -> BernoulliMasks:
        """The generator of kind ``config`` (a subclass with fields overrides this)."""
        return cls(seed, eps, tuple(isad.token_ids), isad.delta)

    def inclusion(self, t: torch.Tensor, token_ids: torch.Tensor | None, width: int) -> torch.Tensor:
        """q (B, L): each token's probability of being masked."""
        pi = mask_probability(t, self.eps)[:, None].expand(len(t), width)
        if len(self.boosted_ids) == 0 or token_ids is None:
            return pi
        boosted = torch.isin(token_ids, self.boosted_ids.to(token_ids.device))
        return torch.where(boosted, (pi + self.delta).clamp(max=1.0), pi)

    def draw(self, sample_index: torch.Tensor, t: torch.Tensor, eligible: torch.Tensor, stream: int,
             token_ids: torch.Tensor | None = None) -> MaskDraw:
        q = self.inclusion(t, token_ids, eligible.shape[1])
        u = keyed_uniform(self.seed, sample_index, stream, eligible.shape[1])
        rows = torch.arange(len(t))
        return MaskDraw(masked=(u < q) & eligible, inclusion=q, row_sample=rows, row_scale=torch.ones(len(t)))


class MirrorMasks(BernoulliMasks, config=MirrorMasksConfig):
    """MIRROR (docs/spec.md section 3.2): two antithetic rows per sequence from one shared uniform per token.

    Row 1 masks {u_i < pi}, row 2 masks {u_i > 1 - pi}. Each row is marginally Bernoulli(pi) (``noise.py``
    makes u and 1 - u equally distributed); per token the indicators have covariance -pi^2 for pi <= 1/2 and
    -(1 - pi)^2 above, so the averaged loss has at most half the masking-pattern variance of one mask:
    Var((l1 + l2) / 2) = (Var l + Cov(l1, l2)) / 2. Both rows share x0, t and the importance weight, sit
    next to each other (rows 2b and 2b + 1) in the same micro-batch, and run in the same forward, so the pairing
    holds for any accumulation and world size.

    ``single_above`` (the paper's "mirror_plus"): sequences with t >= it get their first row (u < pi) only,
    with row share 1. This saves their second row's compute where the anti-correlation is weakest (correlation
    -(1 - pi) / pi -> 0 as pi -> 1) at the price of their full single-mask variance; the estimator stays
    unbiased either way.
    """

    def __init__(self, seed: int, eps: float, single_above: float | None = None, boosted_ids: tuple[int, ...] = (),
                 delta: float = 0.0):
        super().__init__(seed, eps, boosted_ids, delta)
        self.single_above = single_above

    @classmethod
    def from_config(cls, config: MirrorMasksConfig, seed: int, eps: float, isad: ISADConfig) -> MirrorMasks:
        return cls(seed, eps, config.single_above, tuple(isad.token_ids), isad.delta)

    def draw(self, sample_index: torch.Tensor, t: torch.Tensor, eligible: torch.Tensor, stream: int,
             token_ids: torch.Tensor | None = None) -> MaskDraw:
        q = self.inclusion(t, token_ids, eligible.shape[1])
        u = keyed_uniform(self.seed, sample_index, stream, eligible.shape[1])
        masked = torch.stack([(u < q) & eligible, (u > 1.0 - q) & eligible], dim=1).flatten(0, 1)
        paired = torch.ones(len(t), dtype=torch.bool) if self.single_above is None else t < self.single_above
        kept = torch.stack([torch.ones_like(paired), paired], dim=1).flatten().nonzero().squeeze(1)
        row_sample = kept // 2  # rows 2b and 2b + 1 corrupt sequence b
        scale = torch.where(paired, 0.5, 1.0).repeat_interleave(2)
        return MaskDraw(masked=masked.index_select(0, kept), inclusion=q.index_select(0, row_sample),
                        row_sample=row_sample, row_scale=scale.index_select(0, kept))

