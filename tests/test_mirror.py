"""MIRROR (docs/spec.md section 3.2): antithetic mask pairs from one shared uniform per token. Statistical tests with
fixed keys; tolerances are 5 standard errors of the sample size."""

from __future__ import annotations

import math

import pytest
import torch

from mdm_scale.core.batch import Batch
from mdm_scale.core.noise import Stream
from mdm_scale.diffusion.masks import BernoulliMasks, MirrorMasks, mask_probability
from mdm_scale.diffusion.objective import MDMObjective
from mdm_scale.diffusion.t_samplers import TSampler
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

EPS = 1e-3


class ConstantT(TSampler):
    """Every sequence at the same rate t (weight 1): isolates the masking-pattern noise."""

    def __init__(self, t: float):
        super().__init__(seed=0)
        self.t = t

    def transform(self, u):
        return torch.full_like(u, self.t), torch.ones_like(u)


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.7, 0.95])
def test_each_mirror_mask_is_bernoulli_and_the_pair_has_the_antithetic_covariance(t):
    sequences, width = 2000, 100  # 200k tokens
    eligible = torch.ones(sequences, width, dtype=torch.bool)
    draw = MirrorMasks(seed=5, eps=EPS).draw(torch.arange(sequences), torch.full((sequences,), t), eligible,
                                             Stream.MASK)
    assert torch.equal(draw.row_sample, torch.arange(sequences).repeat_interleave(2))
    assert torch.equal(draw.row_scale, torch.full((2 * sequences,), 0.5))
    first, second = draw.masked[0::2].flatten().double(), draw.masked[1::2].flatten().double()
    n = first.numel()
    pi = float(mask_probability(torch.tensor(t), EPS))
    for mask in (first, second):
        assert abs(float(mask.mean()) - pi) < 5 * math.sqrt(pi * (1 - pi) / n)
    expected_cov = -pi**2 if pi <= 0.5 else -((1 - pi) ** 2)
    centred = (first - first.mean()) * (second - second.mean())
    assert abs(float(centred.mean()) - expected_cov) < 5 * float(centred.std()) / math.sqrt(n) + 1e-12
    assert float((first * second).mean()) == pytest.approx(max(0.0, 2 * pi - 1), abs=5 * math.sqrt(pi / n))


def test_mirror_plus_uses_one_mask_at_and_above_the_threshold():
    t = torch.tensor([0.2, 0.9, 0.95, 0.5])
    eligible = torch.ones(4, 16, dtype=torch.bool)
    draw = MirrorMasks(seed=1, eps=EPS, single_above=0.9).draw(torch.arange(4), t, eligible, Stream.MASK)
    assert draw.row_sample.tolist() == [0, 0, 1, 2, 3, 3]
    assert draw.row_scale.tolist() == [0.5, 0.5, 1.0, 1.0, 0.5, 0.5]
    full = MirrorMasks(seed=1, eps=EPS).draw(torch.arange(4), t, eligible, Stream.MASK)
    assert torch.equal(draw.masked, full.masked[[0, 1, 2, 4, 6, 7]])  # row 1 of every sequence is unchanged


def long_batch(copies: int, seed: int = 0) -> Batch:
    """``copies`` of one random 64-token sequence with a 16-token prompt, each with its own noise key."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 32, (1, 64), generator=gen).repeat(copies, 1)
    loss_mask = torch.ones(copies, 64, dtype=torch.bool)
    loss_mask[:, :16] = False
    return Batch(input_ids=ids, loss_mask=loss_mask, sample_index=torch.arange(copies))


@torch.no_grad()
@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_mirror_loss_has_at_most_half_the_masking_pattern_variance(t):
    """Fixed model, x0 and t: Var of the MIRROR pair mean vs Var of one Bernoulli mask's loss, from K mask draws
    each. The ratio is (1 + rho) / 2 with rho = corr(l1, l2) <= 0; its sampling error is about 2 / sqrt(K)
    relative (two independent sample variances)."""
    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(MDMConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2)).eval()
    draws = 2000
    batch = long_batch(draws)
    variances = {}
    for name, masks in (("single", BernoulliMasks(seed=3, eps=EPS)), ("mirror", MirrorMasks(seed=4, eps=EPS))):
        noisy = MDMObjective(ConstantT(t), masks, mask_token_id=3).corrupt(batch)
        losses = noisy.sample_losses(noisy.row_losses(model(**noisy.model_inputs()).token_ce)).double()
        variances[name] = float(losses.var())
    ratio = variances["mirror"] / variances["single"]
    assert ratio <= 0.5 * (1 + 5 * 2 / math.sqrt(draws)), variances
    if t <= 0.5:  # disjoint masks: strongly anti-correlated, clearly below the independent-pair value 1/2
        assert ratio < 0.5 * (1 - 5 * 2 / math.sqrt(draws)), variances


def test_pair_sq_diff_is_the_squared_difference_of_the_two_rows():
    batch = long_batch(4)
    noisy = MDMObjective(ConstantT(0.95), MirrorMasks(seed=0, eps=EPS, single_above=0.9), 3).corrupt(batch)
    assert noisy.pair_sq_diff(torch.zeros(noisy.rows)) is None  # every sequence has one row
    noisy = MDMObjective(ConstantT(0.4), MirrorMasks(seed=0, eps=EPS), 3).corrupt(batch)
    row_loss = torch.arange(8, dtype=torch.float32) ** 2
    expected = (row_loss[0::2] - row_loss[1::2]) ** 2
    assert torch.equal(noisy.pair_sq_diff(row_loss), expected)
    assert torch.equal(noisy.sample_losses(row_loss), (row_loss[0::2] + row_loss[1::2]) / 2)
