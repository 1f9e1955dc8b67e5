"""The t-sampler and mask generator that a ``variance`` config section describes (docs/spec.md sections 1-3)."""

from __future__ import annotations

from mdm_scale.config.schema import VarianceConfig
from mdm_scale.diffusion.clipped_t import ClippedT
from mdm_scale.diffusion.coupled_t import StratifiedT, SymmetricT
from mdm_scale.diffusion.masks import BernoulliMasks, build_masks
from mdm_scale.diffusion.ppots import PPOTSSampler, PPOTSSettings
from mdm_scale.diffusion.t_samplers import TSampler, UniformT


def t_sampler_for(v: VarianceConfig, seed: int, global_batch: int) -> TSampler:
    """``v.t_sampler`` (its inverse CDF) with the uniforms coupled as ``v.t_coupling`` says; ``global_batch``
    (sequences per optimiser step) is StraTS's stratum count."""
    if v.t_sampler == "ppots":
        base = PPOTSSampler(seed, PPOTSSettings.from_config(v))
    elif v.t_sampler == "clipped":
        base = ClippedT(seed, v.clip_low, v.clip_high)
    else:
        base = UniformT(seed)
    if v.t_coupling == "stratified":
        return StratifiedT(base, global_batch)
    if v.t_coupling == "symmetric":
        return SymmetricT(base)
    return base


def masks_for(v: VarianceConfig, seed: int, mirror: bool | None = None) -> BernoulliMasks:
    """The mask generator of ``v``; ``mirror`` overrides ``v.mirror`` (``mirror: auto`` builds both kinds, and
    starts without MIRROR; the online variance probe uses both)."""
    mirror = (v.mirror is True) if mirror is None else mirror
    return build_masks(mirror, seed, v.eps, single_above=v.mirror_plus_threshold if mirror else None,
                       boosted_ids=tuple(v.isad_token_ids), delta=v.isad_delta)
