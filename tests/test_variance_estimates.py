"""The online variance estimators (``diffusion/variance_estimates.py``) on simulated draws with known answers,
vectorised over many independent runs (the monitor that calls them, ``diffusion/online_variance.py``, is tested on
the analytic model and on a falling loss in ``test_online_variance.py``).

1. The step centring and the item moments equal their definitions computed pair by pair.
2. Units: rows coupled inside a unit never enter the centring, so V stays unbiased with coupled rows.
3. Standard errors of decayed sums: z = (estimate - truth) / SE has spread 1 (plain counts would give ~0.74).
4. Strata: the estimate weights strata by their probabilities, merges strata without enough items, stays
   unbiased and removes the noise of how many draws land in each stratum.
5. The decomposition and MIRROR's gain from the quantities.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mdm_scale.diffusion import variance_estimates as ve
from test_online_variance import falling_loss

Z = 4.5


def test_centring_and_item_moments_equal_their_definitions():
    """One step of 7 rows in units (0, 0 | 1 | 2, 2, 2 | 3), m = 0.7: c is the mean of (L_i - m)(L_j - m) over
    the pairs of rows of different units; V's items are the units' mean (L - m)^2 - c, a pair's (X - m)(Y - m) - c
    and B's (L - m)(L2 - L3), uncentred."""
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(7, generator=g, dtype=torch.float64) * 3
    unit = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    m = 0.7
    cross = [(loss[i] - m) * (loss[j] - m) for i, j in itertools.combinations(range(7), 2) if unit[i] != unit[j]]
    c = float(sum(cross) / len(cross))
    rows = ve.row_sums(loss, unit, 4)[None]
    assert float(ve.centring(rows, torch.tensor([m], dtype=torch.float64))[0]) == pytest.approx(c, rel=1e-12)

    p, s, first = ve.unit_items(loss, unit, 4)
    assert first.tolist() == [0, 2, 3, 6]
    stratum = torch.tensor([0, 1, 1, 0])
    moments = ve.item_moments(ve.item_sums(p, s, stratum, strata=2)[None], torch.tensor([m], dtype=torch.float64),
                              torch.tensor([c], dtype=torch.float64), centred=True)
    z = [float(((loss[unit == u] - m) ** 2).mean() - c) for u in range(4)]
    for j, members in ((0, (0, 3)), (1, (1, 2))):
        values = [z[u] for u in members]
        assert moments[j].tolist() == pytest.approx([2, sum(values), sum(v * v for v in values)], rel=1e-12)

    x, y, y3 = (torch.rand(5, generator=g, dtype=torch.float64) for _ in range(3))
    for (pp, ss), centred, expected in ((ve.pair_items(x, y), True, (x - m) * (y - m) - c),
                                        (ve.difference_items(x, y, y3), False, (x - m) * (y - y3))):
        out = ve.item_moments(ve.item_sums(pp, ss, torch.zeros(5, dtype=torch.int64), strata=1)[None],
                              torch.tensor([m], dtype=torch.float64), torch.tensor([c], dtype=torch.float64), centred)
        assert out[0].tolist() == pytest.approx([5, float(expected.sum()), float((expected**2).sum())], rel=1e-12)

    one_unit = ve.row_sums(loss[:2], unit[:2], 1)[None]  # no two units: no centring, the step's items are left out
    assert math.isnan(float(ve.centring(one_unit, torch.tensor([m], dtype=torch.float64))[0]))
    skipped = ve.item_moments(ve.item_sums(p, s, stratum, strata=2)[None], torch.tensor([m], dtype=torch.float64),
                              torch.tensor([float("nan")], dtype=torch.float64), centred=False)
    assert not skipped.any()
    nonfinite = ve.row_sums(torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64), torch.tensor([0, 1, 2]), 3)
    assert nonfinite.tolist() == [2, 3, 5, 3, 2]  # the NaN row is left out of every column


def within_step_v(losses: torch.Tensor, refit_every: int, decay: float, unit_rows: int = 2) -> ve.Estimate:
    """V of each run (leading dimension) through the module: units of ``unit_rows`` rows, one stratum, a refit
    every ``refit_every`` steps. Returns (value, se) tensors of shape (runs,)."""
    runs, steps, rows = losses.shape
    unit = torch.arange(rows) // unit_rows
    units = rows // unit_rows
    pooled = torch.zeros(runs, 1, ve.POOLED_COLUMNS, dtype=torch.float64)
    previous = torch.zeros(runs, dtype=torch.float64)
    for start in range(0, steps, refit_every):
        block = losses[:, start:start + refit_every]
        p, s, _ = ve.unit_items(block, unit, units)
        items = ve.item_sums(p, s, torch.zeros_like(p, dtype=torch.int64), strata=1)
        moments, previous = ve.block_moments(ve.row_sums(block, unit, units), {"V": items}, previous)
        pooled = ve.pool(pooled, moments["V"], decay)
    value, se, _ = ve.stratified_means(pooled)
    return value, se


def test_within_step_v_is_unbiased_without_drift_with_coupled_rows():
    """No drift, 4 units of two rows per step with covariance 0.8 inside a unit: the unit-aware centring keeps V
    unbiased (a centring over all pairs of rows, coupled ones included, would give V - 0.8 x 4 / 28)."""
    losses = falling_loss(runs=100, steps=100, units=4, slope=0.0, seed=2, shared=0.8)
    values, _ = within_step_v(losses, 25, 0.8)
    assert abs(float(values.mean()) - 1.0) <= Z * float(values.std()) / len(values) ** 0.5


def test_standard_errors_of_decayed_sums_mean_what_they_say():
    """i.i.d. normal items, 12 blocks of 40, decay 0.84 (n_eff > sum w): over 3000 repetitions the z-statistic
    (estimate - truth) / SE has standard deviation 1 within 4.5 of its own standard error (1 / sqrt(2 x 3000))
    plus 0.02 for the SE's own noise; treating sum w as the count would give about 1 / 1.36 = 0.74."""
    g = torch.Generator().manual_seed(3)
    reps, blocks, per_block, decay = 3000, 12, 40, 0.5 ** (50 / 200)
    items = torch.randn(reps, blocks, per_block, generator=g, dtype=torch.float64) * 2 + 5
    pooled = torch.zeros(reps, 1, ve.POOLED_COLUMNS, dtype=torch.float64)
    for b in range(blocks):
        block = items[:, b]
        moments = torch.stack([torch.full((reps,), float(per_block), dtype=torch.float64), block.sum(1),
                               (block**2).sum(1)], dim=-1)
        pooled = ve.pool(pooled, moments[:, None], decay)
    value, se, _ = ve.stratified_means(pooled)
    z = (value - 5.0) / se
    spread = float(z.std())
    assert abs(spread - 1.0) <= Z / (2 * reps) ** 0.5 + 0.02, spread


def test_v_standard_error_has_unit_z_spread():
    """V's SE (items: rows, centred on the previous step's mean), 1500 runs of 100 steps x 64 normal rows,
    refits every 10 steps with decay 0.5 (n_eff = 1.5 sum w): z-spread 1 within 4.5 of its standard error plus
    0.03 for the centring's ignored noise (~4 / 64 of the variance); plain counts would give 0.82."""
    g = torch.Generator().manual_seed(4)
    losses = torch.randn(1500, 100, 64, generator=g, dtype=torch.float64) + 2.0
    value, se = within_step_v(losses, refit_every=10, decay=0.5, unit_rows=1)
    z = (value - 1.0) / se
    assert abs(float(z.std()) - 1.0) <= Z / (2 * len(z)) ** 0.5 + 0.03, float(z.std())


def test_stratified_mean_weights_strata_by_probability_and_merges_thin_ones():
    """Strata (pooled by hand, no decay): 0 has items (1, 3), 1 has one item (10), 2 has (5, 7, 9), 3 has none.
    Stratum 1 is merged into 2 and stratum 3 into that group: (1/4) 2 + (3/4) mean(10, 5, 7, 9)."""
    def moments(values):
        v = torch.tensor(values, dtype=torch.float64)
        return torch.tensor([len(v), len(v), v.sum(), (v * v).sum()], dtype=torch.float64)

    pooled = torch.stack([moments([1.0, 3.0]), moments([10.0]), moments([5.0, 7.0, 9.0]), moments([])])
    est = ve.stratified_mean(pooled)
    assert est.value == pytest.approx(0.25 * 2.0 + 0.75 * 7.75)
    var0, var1 = 2.0 / 2, torch.tensor([10.0, 5.0, 7.0, 9.0], dtype=torch.float64).var().item() / 4
    assert est.se == pytest.approx((0.25**2 * var0 + 0.75**2 * var1) ** 0.5)
    assert est.n_eff == 6
    weighted = ve.stratified_mean(pooled[:1], torch.tensor([1.0], dtype=torch.float64))
    assert (weighted.value, weighted.n_eff) == (2.0, 2.0)
    lone = ve.stratified_mean(pooled[1:2])  # one item: a value without an SE
    assert lone.value == 10.0 and math.isnan(lone.se)
    assert math.isnan(ve.stratified_mean(pooled[3:]).value)


def test_strata_remove_the_noise_of_where_draws_land_and_stay_unbiased():
    """Items z = g(u) + noise with g(u) = 1 / (u + 0.05) (large at small u, as the weight 1/pi(t)) and u uniform:
    over 4000 samples of 200 items the stratified estimate (8 strata) is unbiased within 4.5 SE and its
    spread is below 0.8 of the plain mean's (the between-strata variance it removes is about half here)."""
    g = torch.Generator().manual_seed(5)
    reps, n = 4000, 200
    u = torch.rand(reps, n, generator=g, dtype=torch.float64)
    z = 1.0 / (u + 0.05) + torch.randn(reps, n, generator=g, dtype=torch.float64) * 2
    truth = math.log(1.05 / 0.05)
    stratum = ve.strata_of(u)
    sums = ve.item_sums(z, torch.zeros_like(z), stratum)
    block = torch.stack([sums[..., ve.ITEM_N], sums[..., ve.ITEM_P], sums[..., ve.ITEM_PP]], dim=-1)
    stratified, _, _ = ve.stratified_means(ve.pool(torch.zeros(reps, ve.STRATA, 4, dtype=torch.float64), block, 1.0))
    plain = z.mean(1)
    assert abs(float(stratified.mean()) - truth) <= Z * float(stratified.std()) / reps**0.5
    assert abs(float(plain.mean()) - truth) <= Z * float(plain.std()) / reps**0.5
    assert float(stratified.std()) < 0.8 * float(plain.std()), (float(stratified.std()), float(plain.std()))


def test_shares_and_the_rule_from_the_quantities():
    """A = V - cov_mask, C = cov_rate, shares summing to 1, MIRROR's pair statistic V - cov_pair and its gain
    -(cov_pair + cov_syrm), from pooled moments of given item values (one stratum, no decay)."""
    def pooled(values):
        v = torch.tensor(values, dtype=torch.float64)
        return torch.tensor([[len(v), len(v), v.sum(), (v * v).sum()]], dtype=torch.float64)

    quantities = {"V": pooled([2.0, 4.0]), "cov_mask": pooled([1.0, 2.0]), "cov_rate": pooled([0.5, 0.5]),
                  "B": pooled([0.5, 1.5]), "cov_pair": pooled([-1.0, 0.0])}
    r = ve.decomposition(quantities)
    assert (r["V"].value, r["A"].value, r["B"].value, r["C"].value) == (3.0, 1.5, 1.0, 0.5)
    assert r["A"].se == pytest.approx(math.hypot(1.0, 0.5))  # V's and cov_mask's SEs: 1 and 0.5
    assert r["A_share"].value + r["B_share"].value + r["C_share"].value == pytest.approx(1.0)
    assert r["C_share"].se == pytest.approx(math.hypot(0.0, (0.5 / 3) * 1.0) / 3)
    assert (r["pair_half_sq"].value, r["gain"].value, r["gain"].se) == (3.5, 0.5, 0.5)
    with_syrm = ve.decomposition({**quantities, "cov_syrm": pooled([-0.25, -0.75])})
    assert with_syrm["gain"].value == pytest.approx(1.0) and with_syrm["rule_right"].value == pytest.approx(2.5)
    assert math.isnan(ve.decomposition({})["A"].value)
