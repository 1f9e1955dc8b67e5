"""A new t-sampler and a new mask generator through the registries alone (``config/choice.py``,
``diffusion/components.py``): each is one config class and one component class, defined in this file with no
edit to the package; they load from ``--set`` keys with their own checked fields, build, join the method table
and train in-process. (``docs/extending.md`` walks through the same example.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from conftest import tiny_overrides
from mdm_scale.config.errors import ConfigError, require
from mdm_scale.config.loader import load_config
from mdm_scale.config.methods import method, parts
from mdm_scale.config.variance import MaskConfig, TSamplerConfig
from mdm_scale.core.noise import Stream, keyed_uniform
from mdm_scale.diffusion.build import masks_for, t_sampler_for
from mdm_scale.diffusion.masks import BernoulliMasks, MaskDraw
from mdm_scale.diffusion.t_samplers import TSampler


@pytest.fixture
def toy_kinds():
    """Registers the toy kinds and their components for one test, then removes them again."""

    @dataclass
    class PowerTConfig(TSamplerConfig):
        """t with density p(t) = k t^(k - 1) on (0, 1), weight 1 / p(t)."""

        name: str = "power_test"
        display: ClassVar[str] = "Power"
        k: float = 0.5

        def check(self, config) -> None:
            require(self.k > 0, self.key("k"), self.k, "must be > 0")

    class PowerT(TSampler, config=PowerTConfig):
        name = "power_test"

        def __init__(self, seed: int, k: float):
            super().__init__(seed)
            self.k = k

        @classmethod
        def from_config(cls, config: PowerTConfig, seed: int) -> PowerT:
            return cls(seed, config.k)

        def transform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = u ** (1.0 / self.k)  # the inverse CDF of t^k
            return t, 1.0 / (self.k * t ** (self.k - 1.0))

    @dataclass
    class FlippedMasksConfig(MaskConfig):
        """One row per sequence masking {u > 1 - q}: marginally Bernoulli(q), other draws than ``bernoulli``."""

        name: str = "flipped_test"

    class FlippedMasks(BernoulliMasks, config=FlippedMasksConfig):
        def draw(self, sample_index, t, eligible, stream, token_ids=None) -> MaskDraw:
            q = self.inclusion(t, token_ids, eligible.shape[1])
            u = keyed_uniform(self.seed, sample_index, stream, eligible.shape[1])
            return MaskDraw(masked=(u > 1.0 - q) & eligible, inclusion=q, row_sample=torch.arange(len(t)),
                            row_scale=torch.ones(len(t)))

    yield PowerT, FlippedMasks
    for config, component in ((PowerTConfig, PowerT), (FlippedMasksConfig, FlippedMasks)):
        del config.kinds[config.name], component.built_from[config]


def test_a_new_sampler_and_mask_generator_load_build_and_join_the_method_table(toy_kinds):
    power_t, flipped = toy_kinds
    cfg = load_config(["configs/quickstart.yaml"], ["variance.t_sampler=power_test", "variance.t_sampler.k=0.25",
                                                    "variance.masks=flipped_test"])
    sampler, masks = t_sampler_for(cfg.variance, 7, global_batch=8), masks_for(cfg.variance, 7)
    assert type(sampler) is power_t and sampler.k == 0.25 and type(masks) is flipped
    t, weight = sampler.sample(torch.arange(200_000), Stream.T)
    estimate = weight.double() * t.double()  # E_p[w f(t)] = integral of f = 1/2 for f(t) = t
    assert abs(estimate.mean() - 0.5) <= 4.5 * estimate.std() / len(estimate) ** 0.5
    with pytest.raises(ConfigError, match=r"'variance.t_sampler.k' = -1.0: must be > 0"):
        load_config(None, ["variance.t_sampler={name: power_test, k: -1}"])
    with pytest.raises(ConfigError, match=r"'variance.t_sampler.name' = 'powr_test': choose one of .*'power_test'"):
        load_config(None, ["variance.t_sampler=powr_test"])
    assert {"power_test", "flipped_test"} <= set(parts())
    assert method("power_test+flipped_test").display == "Power+flipped_test"
    assert method("power_test+mirror").overrides() == ["variance.t_sampler.name=power_test",
                                                        "variance.masks.name=mirror"]


def test_a_new_sampler_and_mask_generator_train(toy_kinds, synth_dir, tmp_path, dist_env):
    from mdm_scale.training.trainer import Trainer

    power_t, flipped = toy_kinds
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path, **{
        "variance.t_sampler": {"name": "power_test", "k": 0.5}, "variance.masks": "flipped_test",
        "train.max_steps": 2}))
    trainer = Trainer(cfg, dist_env)
    assert type(trainer.objective.t_sampler) is power_t and type(trainer.objective.masks) is flipped
    summary = trainer.fit()
    assert summary["step"] == 2 and summary["eval_loss"] > 0


def test_a_kind_without_a_component_fails_naming_its_key():
    @dataclass
    class OrphanTConfig(TSamplerConfig):
        name: str = "orphan_test"

    try:
        cfg = load_config(None, ["variance.t_sampler=orphan_test"])
        with pytest.raises(ConfigError, match=r"'variance.t_sampler.name' = 'orphan_test': no TSampler is built from "
                                              r"OrphanTConfig; declare `class ...\(TSampler, config=OrphanTConfig\)`"):
            t_sampler_for(cfg.variance, 0, 8)
    finally:
        del TSamplerConfig.kinds["orphan_test"]
