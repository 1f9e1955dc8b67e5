"""The estimators that ``mdm-scale variance`` compares, each as the objective a training run would use.

A method fixes the parts of the ``variance`` config section that define it (t-sampler, coupling, MIRROR,
ISAD) and keeps the rest (eps, clip interval, ISAD ids and delta) from the run's config. Its *unit* is the
group of sequences whose noise it couples: 1 sequence for the i.i.d. methods, a pair for SyRM, the global batch
of one optimiser step for StraTS (``decomposition.py`` compares units per sequence).

| name          | t                          | masks          | unit         | unbiased |
| standard      | U(0, 1)                    | Bernoulli(pi)  | 1            | yes |
| mirror        | U(0, 1)                    | MIRROR pair    | 1            | yes |
| ppots         | p(t), weight 1/p(t)        | Bernoulli      | 1            | yes |
| ppots+mirror  | p(t), weight 1/p(t)        | MIRROR pair    | 1            | yes |
| strats        | stratified over the batch  | Bernoulli      | global batch | yes |
| syrm          | t and 1 - t pairs          | Bernoulli      | 2            | yes |
| isad          | U(0, 1)                    | boosted ids, HT| 1            | for context-free token losses |
| clipped       | U[beta, omega], weight 1   | Bernoulli      | 1            | no (clipped_t.py) |
| arm           | none                       | none           | 1            | (another model: only C) |
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mdm_scale.config.schema import Config, ConfigError
from mdm_scale.core.noise import keyed_generator
from mdm_scale.diffusion.build import masks_for, t_sampler_for
from mdm_scale.diffusion.objective import ARMObjective, MDMObjective
from mdm_scale.diffusion.t_samplers import TSampler

MDM_METHODS = ("standard", "mirror", "ppots", "ppots+mirror", "strats", "syrm", "isad", "clipped")
ALL_METHODS = (*MDM_METHODS, "arm")
# Each method as changes to the run's variance section.
_VARIANCE_OF = {
    "standard": {},
    "mirror": {"mirror": True},
    "ppots": {"t_sampler": "ppots"},
    "ppots+mirror": {"t_sampler": "ppots", "mirror": True},
    "strats": {"t_coupling": "stratified"},
    "syrm": {"t_coupling": "symmetric"},
    "isad": {},
    "clipped": {"t_sampler": "clipped"},
}
_MASK_DRAW_WORD = 0x4D41534B


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
        return self.config.variance.t_sampler == "ppots"

    def objective(self, mask_draw: int, mask_token_id: int | None):
        """The objective whose masks are the ``mask_draw``-th independent draw (t depends only on the sample
        index, so it is shared by every mask draw)."""
        if self.name == "arm":
            return ARMObjective()
        mask_seed = keyed_generator(self.config.seed, _MASK_DRAW_WORD, mask_draw).initial_seed()
        return MDMObjective(self.t_sampler, masks_for(self.config.variance, mask_seed), mask_token_id)


def build_method(name: str, cfg: Config, strats_group: int) -> Method:
    """``strats_group`` is the global batch that StraTS stratifies (sequences per optimiser step)."""
    if name not in ALL_METHODS:
        raise ConfigError(f"--methods: unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")
    if (name == "arm") != (cfg.train.objective == "arm"):
        raise ConfigError(f"--methods: {name!r} needs a model trained with train.objective="
                          f"{'arm' if name == 'arm' else 'mdm'} (this config has {cfg.train.objective!r}); "
                          f"measure ARM and MDM checkpoints in separate runs")
    if name == "arm":
        return Method(name, 1, False, False, cfg)
    if name == "isad" and not cfg.variance.isad_token_ids:
        raise ConfigError("--methods isad: set variance.isad_token_ids (the token ids to mask more often)")
    base = replace(cfg.variance, t_sampler="uniform", mirror=False, mirror_plus_threshold=None,
                   t_coupling="independent", isad_token_ids=cfg.variance.isad_token_ids if name == "isad" else [])
    variance = replace(base, **_VARIANCE_OF[name])
    group = {"strats": strats_group, "syrm": 2}.get(name, 1)
    return Method(name, group, True, True, replace(cfg, variance=variance),
                  t_sampler_for(variance, cfg.seed, group))
