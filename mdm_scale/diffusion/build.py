"""The t-sampler and mask generator that a ``variance`` config section describes (docs/spec.md sections 1-3).

Each is found through the component registry (``components.py``) from the kind of ``variance.t_sampler`` or
``variance.masks``, so a new kind needs no edit here.
"""

from __future__ import annotations

from mdm_scale.config.variance import AutoMasksConfig, BernoulliMasksConfig, MaskConfig, VarianceConfig
from mdm_scale.diffusion.coupled_t import StratifiedT, SymmetricT
from mdm_scale.diffusion.masks import BernoulliMasks
from mdm_scale.diffusion.t_samplers import TSampler


def t_sampler_for(v: VarianceConfig, seed: int, global_batch: int) -> TSampler:
    """``v.t_sampler`` (its inverse CDF) with the uniforms coupled as ``v.t_coupling`` says; ``global_batch``
    (sequences per optimiser step) is StraTS's stratum count."""
    base = TSampler.component_for(v.t_sampler).from_config(v.t_sampler, seed)
    if v.t_coupling == "stratified":
        return StratifiedT(base, global_batch)
    if v.t_coupling == "symmetric":
        return SymmetricT(base)
    return base


def masks_for(v: VarianceConfig, seed: int, kind: MaskConfig | None = None) -> BernoulliMasks:
    """The mask generator of ``kind`` (default ``v.masks``) with ``v``'s eps and ISAD ids. ``masks: auto`` starts
    without MIRROR; the trainer switches it (``Trainer._set_mirror``), and the online variance probe builds the
    Bernoulli and MIRROR generators it compares."""
    kind = v.masks if kind is None else kind
    if isinstance(kind, AutoMasksConfig):
        kind = BernoulliMasksConfig()
    return BernoulliMasks.component_for(kind).from_config(kind, seed, v.eps, v.isad)
