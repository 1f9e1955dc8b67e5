"""Coupled masking rates across the sequences of a batch: StraTS (stratified) and SyRM (symmetric pairs).

Both replace only the *uniforms* u that a t-sampler maps to (t, weight) through its inverse CDF
(``TSampler.transform``), so they compose with any sampler, P-POTS included, and with any mask generator
(MIRROR). Each u stays marginally U(0, 1), so each sequence's (t, weight) has the sampler's distribution and the
batch loss stays an unbiased estimate of the same objective; only the joint distribution inside a batch
changes, which lowers the masking-rate noise (B) of the batch mean.

StraTS (docs/spec.md section 3.4). Optimiser step s consumes stream positions [s G, (s+1) G) with G the *global* batch
(micro x accumulation x world, ``data/loader.py``). Position s G + i gets stratum pi_s(i) of a permutation pi_s
of {0..G-1} keyed by (seed, stream, s), and u = (pi_s(i) + v) / G with v ~ U(0, 1) keyed by the position. So
the G rates of one step cover the G strata [k/G, (k+1)/G) exactly once, across all ranks and accumulation
micro-steps, with no communication: every rank computes the same permutation from the step number. (The
prototype stratified per rank only, docs/spec.md section 8.) Marginally, pi_s(i) is uniform on {0..G-1} and v is
uniform, so u ~ U(0, 1).

SyRM (docs/spec.md section 3.7; the paper's definition is unknown, this is our interpretation: symmetric rates).
Rows 2m and 2m+1 of a micro-batch form a pair: u_{2m+1} = 1 - u_{2m} (t paired with 1 - t under uniform t;
antithetic in u under P-POTS). Pairs are formed inside the micro-batch handed to ``sample``, so they never
straddle micro-batches or ranks; an odd last row keeps its own independent u. ``noise.py`` makes u and 1 - u
exactly equally distributed, so the partner's rate is exactly U(0, 1) too.
"""

from __future__ import annotations

import torch

from mdm_scale.core.noise import keyed_generator, keyed_uniform
from mdm_scale.diffusion.t_samplers import TSampler


class CoupledT(TSampler):
    """Base: wraps ``inner`` (any t-sampler) and replaces its uniforms."""

    def __init__(self, inner: TSampler):
        super().__init__(inner.seed)
        self.inner = inner
        self.name = f"{self.coupling}+{inner.name}"

    def transform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.transform(u)

    def quantile(self, t: torch.Tensor) -> torch.Tensor:
        return self.inner.quantile(t)

    def observe(self, micro) -> None:
        self.inner.observe(micro)

    def on_optimizer_step(self, step: int) -> bool:
        return self.inner.on_optimizer_step(step)

    def changes_after(self, step: int) -> bool:
        return self.inner.changes_after(step)

    def log_statistics(self) -> dict:
        return self.inner.log_statistics()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def __getattr__(self, name: str):
        """Everything else (e.g. P-POTS's ``update`` and ``density``) is the wrapped sampler's."""
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def load_rank_states(self, states: list[dict], main: dict) -> None:
        self.inner.load_rank_states(states, main)


class StratifiedT(CoupledT):
    """StraTS over the global batch of ``group`` stream positions per optimiser step."""

    coupling = "strats"

    def __init__(self, inner: TSampler, group: int):
        super().__init__(inner)
        self.group = group
        self._perm: tuple[int, int, torch.Tensor] | None = None

    def uniforms(self, sample_index: torch.Tensor, stream: int) -> torch.Tensor:
        index = sample_index.to(torch.int64)
        step, position = index // self.group, index % self.group
        strata = torch.empty_like(index)
        for s in step.unique().tolist():
            chosen = step == s
            strata[chosen] = self._permutation(int(s), stream)[position[chosen]]
        v = keyed_uniform(self.seed, index, stream)
        return (strata.to(torch.float64) + v.to(torch.float64)).div(self.group).to(torch.float32).clamp(max=1 - 2**-24)

    def _permutation(self, step: int, stream: int) -> torch.Tensor:
        if self._perm is None or self._perm[:2] != (step, stream):
            perm = torch.randperm(self.group, generator=keyed_generator(self.seed, 0x53545241, stream, step))
            self._perm = (step, stream, perm)
        return self._perm[2]


class SymmetricT(CoupledT):
    """SyRM: consecutive rows of a micro-batch share one uniform, as u and 1 - u."""

    coupling = "syrm"

    def uniforms(self, sample_index: torch.Tensor, stream: int) -> torch.Tensor:
        u = keyed_uniform(self.seed, sample_index, stream)
        pairs = len(u) // 2
        u[1:2 * pairs:2] = 1.0 - u[0:2 * pairs:2]
        return u
