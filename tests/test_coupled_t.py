"""StraTS, SyRM, Clipped and ISAD: the properties each one claims, checked statistically with fixed keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.core.noise import Stream
from mdm_scale.diffusion.clipped_t import ClippedT
from mdm_scale.diffusion.coupled_t import StratifiedT, SymmetricT
from mdm_scale.diffusion.masks import BernoulliMasks, MirrorMasks
from mdm_scale.diffusion.t_samplers import UniformT
from mdm_scale.training.trainer import Trainer


def assert_uniform(u: np.ndarray, low: float = 0.0, high: float = 1.0) -> None:
    """Mean and variance of U(low, high) within 4.5 standard errors (the SE of a sample variance of a uniform
    is sqrt((m4 - var^2) / n) with m4 = w^4 / 80)."""
    w, n = high - low, len(u)
    assert ((u >= low) & (u <= high)).all()
    assert abs(u.mean() - (low + high) / 2) < 4.5 * w / np.sqrt(12 * n)
    assert abs(u.var() - w**2 / 12) < 4.5 * np.sqrt((w**4 / 80 - (w**2 / 12) ** 2) / n)


def test_strats_covers_every_stratum_once_per_step_however_the_step_is_split():
    group, sampler = 12, StratifiedT(UniformT(7), 12)
    for step in range(50):
        index = torch.arange(step * group, (step + 1) * group)
        t, weight = sampler.sample(index, Stream.T)
        assert sorted((t * group).floor().long().tolist()) == list(range(group))
        assert (weight == 1).all()
        pieces = torch.randperm(group, generator=torch.Generator().manual_seed(step)).split(5)  # micro-batches
        again = torch.cat([StratifiedT(UniformT(7), group).sample(index[p], Stream.T)[0] for p in pieces])
        assert torch.equal(again, t[torch.cat(pieces)])


def test_strats_and_syrm_keep_every_rate_marginally_uniform():
    positions = torch.arange(3, 40000, 12)  # one fixed position of each step: marginally U(0, 1)
    assert_uniform(StratifiedT(UniformT(1), 12).sample(positions, Stream.T)[0].numpy())
    t = SymmetricT(UniformT(2)).sample(torch.arange(20001), Stream.T)[0]
    assert torch.allclose(t[0:-1:2] + t[1::2], torch.ones(10000), atol=1e-6)  # pairs (t, 1 - t); last row alone
    assert_uniform(t[1::2].numpy())


def test_couplings_compose_with_the_inverse_cdf_of_the_wrapped_sampler():
    clipped = ClippedT(4, 0.3, 0.8)
    t, weight = StratifiedT(clipped, 10).sample(torch.arange(10), Stream.T)
    assert sorted(((t - 0.3) / 0.5 * 10).floor().long().tolist()) == list(range(10)) and (weight == 1).all()
    t, _ = SymmetricT(clipped).sample(torch.arange(4), Stream.T)
    assert torch.allclose(t[0] + t[1], torch.tensor(1.1)) and clipped.sample(torch.arange(4))[0].max() <= 0.8
    assert_uniform(clipped.sample(torch.arange(20000))[0].numpy(), 0.3, 0.8)


@pytest.mark.parametrize("masks_class", [BernoulliMasks, MirrorMasks])
def test_isad_masks_boosted_tokens_at_rate_q_and_weights_them_by_one_over_q(masks_class):
    """Each row masks token i with probability q_i (raised by delta for chosen ids): the mean of M_i / q_i over
    many keyed draws is 1 for every token, the Horvitz-Thompson identity that keeps the token sum unbiased."""
    masks = masks_class(5, 1e-3, boosted_ids=(7, 9), delta=0.2)
    ids = torch.tensor([[7, 3, 9, 4, 7, 5]]).repeat(4000, 1)
    t = torch.tensor([0.1, 0.45, 0.7, 0.95]).repeat(1000)
    draw = masks.draw(torch.arange(4000), t, torch.ones_like(ids, dtype=torch.bool), Stream.MASK, ids)
    q = draw.inclusion
    rows_per_sample = len(draw.row_sample) // len(t)
    boosted = torch.isin(ids, torch.tensor([7, 9])).repeat_interleave(rows_per_sample, 0)
    pi = ((1 - 1e-3) * t + 1e-3).repeat_interleave(rows_per_sample)[:, None]
    assert torch.allclose(q, torch.where(boosted, (pi + 0.2).clamp(max=1), pi.expand_as(q)))
    ht = (draw.masked / q).double()
    for level in t[:4].tolist():
        rows = t.repeat_interleave(rows_per_sample) == level
        per_token = ht[rows]
        se = per_token.std(0, unbiased=True) / np.sqrt(rows.sum().item())
        assert ((per_token.mean(0) - 1).abs() <= 4.5 * se + 1e-12).all(), (level, per_token.mean(0))


def test_training_step_stratifies_the_global_batch_across_accumulation(synth_dir, tmp_path, dist_env):
    """grad_accum 2 x micro 4 (length-grouped micro-batches): the 8 rates of each step cover 8 strata."""
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(
        synth_dir, tmp_path, **{"train.grad_accum": 2, "variance.t_coupling": "stratified", "variance.masks": "mirror",
                                "variance.isad.token_ids": [5, 6], "train.max_steps": 3}))
    trainer = Trainer(cfg, dist_env)
    seen, corrupt = {}, trainer.objective.corrupt

    def recording(batch, *args, **kwargs):  # t by sample index (the trainer corrupts the next step's early)
        noisy = corrupt(batch, *args, **kwargs)
        seen.update(zip(batch.sample_index.tolist(), noisy.t.tolist()))
        return noisy

    trainer.objective.corrupt = recording
    for step in range(3):
        trainer.train_step()
        rates = torch.tensor([seen[index] for index in range(8 * step, 8 * step + 8)])
        assert sorted((rates * 8).floor().long().tolist()) == list(range(8))


def test_strats_wraps_ppots_in_training(synth_dir, tmp_path, dist_env):
    """StraTS over P-POTS: the offline estimate fits the wrapped sampler, and a step draws from its density."""
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(
        synth_dir, tmp_path, **{"variance.t_sampler": {"name": "ppots", "x0": 2, "bins": 8, "masks": 2},
                                "variance.t_coupling": "stratified",
                                "train.max_steps": 1}))
    trainer = Trainer(cfg, dist_env)
    sampler = trainer.objective.t_sampler
    assert isinstance(sampler, StratifiedT) and sampler.inner.refits == 1
    t, weight = sampler.sample(torch.arange(4), Stream.T)
    assert torch.allclose(weight.double(), 1 / sampler.inner.density.pdf(t), rtol=1e-5)
    trainer.train_step()


@pytest.mark.parametrize("item, message", [
    ("variance.t_sampler={name: clipped, low: 0.9}", "variance.t_sampler.low"),
    ("variance.isad.token_ids=5", "variance.isad.token_ids' = 5: expected a list"),
    ("variance.isad.token_ids=[1, x]", r"variance.isad.token_ids\[1\]' = 'x': expected an integer"),
    ("variance.t_coupling=paired", "choose one of"),
])
def test_bad_method_keys_fail_with_the_key_named(item, message):
    from mdm_scale.config.schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [item])
    with pytest.raises(ConfigError, match=r"'variance.ema.bins' = 10: .* needs an unbiased t-sampler \(not clipped\)"):
        load_config(None, ["variance.t_sampler=clipped", "variance.ema.bins=10"])
