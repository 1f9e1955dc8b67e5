"""The estimators that ``mdm-scale variance`` compares, each as the objective a training run would use.

Methods are the method table's (``config/methods.py``: ``standard``, ``mirror``, ``ppots+mirror``, ...). A method
applied to the run's config sets the keys that define methods (t-sampler, coupling, masks, ISAD ids) and keeps
the rest (eps, a kind's own fields such as the clip interval or P-POTS's bins, the ISAD delta). Its *unit* is the
group of sequences whose noise it couples: 1 sequence for the i.i.d. methods, a pair for SyRM, the global batch
of one optimiser step for StraTS (``decomposition.py`` compares units per sequence). Methods that act only
during training (``auto``, ``ema``) have no fixed estimator to measure and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from mdm_scale.config.methods import method
from mdm_scale.config.schema import Config, ConfigError
from mdm_scale.config.variance import PPOTSConfig
from mdm_scale.core.noise import keyed_generator
from mdm_scale.diffusion.build import masks_for, t_sampler_for
from mdm_scale.diffusion.objective import ARMObjective, MDMObjective
from mdm_scale.diffusion.t_samplers import TSampler

_MASK_DRAW_WORD = 0x4D41534B
_UNIT = {"stratified": None, "symmetric": 2, "independent": 1}  # None: StraTS's global batch


@dataclass
class Method:
    name: str
    group: int
    random_t: bool
    random_masks: bool
    config: Config
    t_sampler: TSampler | None = None  # shared by every mask draw (P-POTS is fitted once, by the runner)

    @property
    def uses_ppots(self) -> bool:
        return isinstance(self.config.variance.t_sampler, PPOTSConfig)

    def objective(self, mask_draw: int, mask_token_id: int | None):
        """The objective whose masks are the ``mask_draw``-th independent draw (t depends only on the sample
        index, so it is shared by every mask draw)."""
        if self.name == "arm":
            return ARMObjective()
        mask_seed = keyed_generator(self.config.seed, _MASK_DRAW_WORD, mask_draw).initial_seed()
        return MDMObjective(self.t_sampler, masks_for(self.config.variance, mask_seed), mask_token_id)


def build_method(name: str, cfg: Config, strats_group: int) -> Method:
    """``strats_group`` is the global batch that StraTS stratifies (sequences per optimiser step)."""
    try:
        spec = method(name)
    except ConfigError as err:
        raise ConfigError(f"--methods: {err}") from None
    if not spec.measurable:
        raise ConfigError(f"--methods {name}: acts only during training (it has no fixed estimator to measure)")
    arm = spec.changes.get("train.objective") == "arm"
    if arm != (cfg.train.objective == "arm"):
        raise ConfigError(f"--methods: {name!r} needs a model trained with train.objective="
                          f"{'arm' if arm else 'mdm'} (this config has {cfg.train.objective!r}); "
                          f"measure ARM and MDM checkpoints in separate runs")
    if arm:
        return Method(name, 1, False, False, cfg)
    if spec.keeps and not cfg.variance.isad.token_ids:
        raise ConfigError(f"--methods {name}: set variance.isad.token_ids (the token ids to mask more often)")
    config = spec.apply(cfg)
    config.check()
    group = _UNIT[config.variance.t_coupling] or strats_group
    return Method(name, group, True, True, config, t_sampler_for(config.variance, cfg.seed, group))
