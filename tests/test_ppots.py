"""P-POTS (docs/spec.md section 3.1): the EPR fit, the exactly normalised sampled density, unbiased weights, and the
statistics service on one rank. Tolerances are derived from the number of draws (4-5 standard errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import REPO
from mdm_scale.config.variance import PPOTSConfig
from mdm_scale.core.batch import Batch
from mdm_scale.core.noise import Stream
from mdm_scale.diffusion.epr import fit_epr, log_w
from mdm_scale.diffusion.masks import BernoulliMasks
from mdm_scale.diffusion.objective import MDMObjective
from mdm_scale.diffusion.ppots import (
    COUNT,
    PAIR_SQ,
    PAIRS,
    SUM,
    SUMSQ,
    PiecewiseLinearDensity,
    PPOTSSampler,
    bin_centres,
    bin_statistics,
    epr_density,
)
from mdm_scale.diffusion.t_samplers import UniformT
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

# A strongly non-uniform EPR shape: small near t = 0, rising steeply towards t = 1 (like the paper's fits).
Z_KNOWN = np.array([0.5, -1.0, 0.2, 1.0, 0.3, 1.5, 0.8])
GRID = bin_centres(64)


def exact_cdf(density: PiecewiseLinearDensity, t: torch.Tensor) -> torch.Tensor:
    k = (t / density.h).floor().clamp(max=density.cells - 1).long()
    x = t - k.double() * density.h
    p_k, p_next = density.values[k], density.values[k + 1]
    return density.cdf[k] + p_k * x + 0.5 * (p_next - p_k) / density.h * x * x


def test_epr_fit_recovers_a_known_density_exactly():
    fit = fit_epr(GRID, np.exp(log_w(Z_KNOWN, GRID)))
    assert abs(fit.kl) < 1e-10
    fitted, known = epr_density(fit.z).values, epr_density(Z_KNOWN).values
    assert ((fitted - known).abs() / known).max() < 1e-4


def test_epr_fit_recovers_a_known_density_from_sampled_losses():
    """Losses l = w(t_j) x with x ~ N(0, 1) give E[l^2 | t_j] = w(t_j)^2; from n draws per bin the target
    sqrt(mean l^2) has relative standard error sqrt(2) / (2 sqrt(n)) per bin."""
    n = 4000
    gen = torch.Generator().manual_seed(0)
    w = np.exp(log_w(Z_KNOWN, GRID))
    losses = torch.from_numpy(w)[:, None] * torch.randn(len(GRID), n, generator=gen, dtype=torch.float64)
    target = losses.pow(2).mean(1).sqrt().numpy()
    fitted, known = epr_density(fit_epr(GRID, target).z).values, epr_density(Z_KNOWN).values
    per_bin_rel_se = math.sqrt(2) / (2 * math.sqrt(n))
    assert ((fitted - known).abs() / known).max() < 5 * per_bin_rel_se


def test_fit_rejects_bad_targets():
    with pytest.raises(ValueError, match="non-negative"):
        fit_epr(GRID, -np.ones_like(GRID))
    with pytest.raises(ValueError, match="increasing"):
        fit_epr(GRID[::-1], np.ones_like(GRID))


def test_log_w_is_the_epr_formula_and_its_jacobian_matches_finite_differences():
    """log w = 0.5 log(a t^r + b (1 - t)^q + A^2 exp(2 k t^m)) with the softplus maps of the module docstring,
    written out here (z0 = -20 makes a ~ 2e-9, where the 1e-9 floor matters); t is clipped to [1e-6, 1 - 1e-6].
    The analytic Jacobian agrees with central differences."""
    from mdm_scale.diffusion.epr import _log_w_and_jacobian

    z = np.array([-20.0, 0.4, -1.0, 0.3, 0.2, -0.2, 0.2])
    sp = np.log1p(np.exp(z))
    a, b, big_a = sp[:3] + 1e-9
    r, q, k, m = 1 + sp[3], 1 + sp[4], sp[5], 1 + sp[6]
    t = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    tc = np.clip(t, 1e-6, 1 - 1e-6)
    expected = 0.5 * np.log(a * tc**r + b * (1 - tc) ** q + big_a**2 * np.exp(2 * k * tc**m))
    np.testing.assert_allclose(log_w(z, t), expected, rtol=1e-12)
    h = 1e-6
    for point in (z, np.r_[-20.0, -20.0, -20.0, z[3:]]):  # a, b, A all near the floor: every share of order 1
        _, jac = _log_w_and_jacobian(point, t)
        numeric = np.stack([(log_w(point + h * e, t) - log_w(point - h * e, t)) / (2 * h) for e in np.eye(7)], 1)
        np.testing.assert_allclose(jac, numeric, rtol=1e-5, atol=1e-8)


def test_trapezoid_weights_integrate_on_an_uneven_grid():
    from mdm_scale.diffusion.epr import _trapezoid_weights

    t, y = np.array([0.0, 0.1, 0.4, 0.5, 1.0]), np.array([1.0, 3.0, -2.0, 5.0, 0.5])
    assert _trapezoid_weights(t) @ y == pytest.approx(np.sum(np.diff(t) * (y[1:] + y[:-1]) / 2), rel=1e-12)


def test_fit_epr_checks_its_input_exactly_and_is_deterministic():
    """Two points and zero targets are allowed; equal points, mismatched shapes, NaN, negative or all-zero
    targets are not. A cold fit is a pure function of its inputs (every rank gets the same z)."""
    two = fit_epr(np.array([0.25, 0.75]), np.array([0.5, 0.0]))
    assert np.all(np.isfinite(two.z))
    for t, w in ((np.array([0.1, 0.1, 0.5]), np.ones(3)), (GRID, np.ones(3)), (GRID[:, None], np.ones((64, 1)))):
        with pytest.raises(ValueError, match="increasing grid points"):
            fit_epr(t, w)
    for w in (np.r_[np.ones(63), np.nan], np.r_[np.ones(63), -0.5], np.zeros(64)):
        with pytest.raises(ValueError, match="^fit_epr needs finite, non-negative targets, not all zero$"):
            fit_epr(GRID, w)
    target = np.exp(log_w(Z_KNOWN, GRID))
    assert np.array_equal(fit_epr(GRID, target, restarts=3).z, fit_epr(GRID, target, restarts=3).z)


def test_piecewise_density_checks_nodes_and_evaluates_by_hand():
    """Nodes (1, 2, 4, 3) on 3 cells have area 8/3, so p = (3/8) (1, 2, 4, 3). pdf is linear inside a cell and
    clamped to [0, 1] outside; inverse_cdf inverts the exact CDF also where p < 1; the last CDF node is 1."""
    two = PiecewiseLinearDensity(torch.tensor([1.0, 3.0]))
    assert two.values.tolist() == [0.5, 1.5]
    message = "^a piecewise-linear density needs >= 2 finite, positive node values$"
    for bad in (torch.ones(2, 2), torch.ones(1), torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 0.0]),
                torch.tensor([1.0, -1.0])):
        with pytest.raises(ValueError, match=message):
            PiecewiseLinearDensity(bad)
    density = PiecewiseLinearDensity(torch.tensor([1.0, 2.0, 4.0, 3.0]))
    assert density.cdf[-1].item() == 1.0 and density.cdf.dtype == torch.float64
    t = torch.tensor([-0.5, 0.0, 0.5 / 3, 0.5, 2.5 / 3, 1.0, 1.5], dtype=torch.float64)
    expected = 3 / 8 * torch.tensor([1.0, 1.0, 1.5, 3.0, 3.5, 3.0, 3.0], dtype=torch.float64)
    assert torch.allclose(density.pdf(t), expected, rtol=1e-12)
    inside = torch.tensor([0.05, 0.2, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(density.inverse_cdf(exact_cdf(density, inside)), inside, rtol=1e-12)
    assert torch.allclose(density.mixed(1.0, None).values, torch.ones(4, dtype=torch.float64))
    capped = density.mixed(0.0, 2.0)  # lowest 3/8 < 1/2: lambda = (1/2 - 3/8) / (1 - 3/8) = 0.2
    assert torch.allclose(capped.values, 0.8 * density.values + 0.2, rtol=1e-12)
    assert capped.values.min().item() == pytest.approx(0.5, rel=1e-12)


def test_epr_density_is_the_curve_on_the_nodes_even_for_huge_log_w():
    z = Z_KNOWN.copy()
    nodes = np.linspace(0.0, 1.0, 5)
    curve = np.exp(log_w(z, nodes))
    assert np.allclose(epr_density(z, cells=4).values.numpy(), curve / np.sum((curve[1:] + curve[:-1]) / 8))
    z[5] = 600.0  # k = 600: log w reaches 600, exp of it overflows without the shift by the maximum
    assert torch.isfinite(epr_density(z, cells=4).values).all()


def test_bins_and_fit_target_by_hand():
    """Bin k of 4 holds t in [k/4, (k+1)/4), t = 1 (and anything outside [0, 1]) is clamped to the end bins.
    Targets sqrt(sum l^2 / count) come from filled bins only, including a bin with one sample."""
    from mdm_scale.diffusion.ppots import fit_target, t_bin

    assert bin_centres(4).tolist() == [0.125, 0.375, 0.625, 0.875]
    assert t_bin(torch.tensor([-0.1, 0.0, 0.3, 0.999, 1.0, 1.2]), 4).tolist() == [0, 0, 1, 3, 3, 3]
    stats = torch.zeros(4, 5, dtype=torch.float64)
    stats[0, COUNT], stats[0, SUMSQ] = 2, 8.0
    stats[2, COUNT], stats[2, SUMSQ] = 1, 0.25
    stats[3, COUNT], stats[3, SUMSQ] = 4, 36.0
    t, w = fit_target(stats)
    assert t.tolist() == [0.125, 0.625, 0.875] and w.tolist() == [2.0, 0.5, 3.0]
    loss, pairs = torch.tensor([1.5, 2.0, 3.0]), torch.tensor([0.5, float("nan"), 2.0])
    single = bin_statistics(torch.tensor([0.1, 0.6, 1.0]), loss, pairs, 4)  # float32 losses: float64 sums
    assert single.dtype == torch.float64
    assert single.tolist() == [[1, 1.5, 2.25, 1, 0.5], [0] * 5, [1, 2.0, 4.0, 0, 0], [1, 3.0, 9.0, 1, 2.0]]


def test_ppots_settings_follow_the_variance_config():
    from mdm_scale.config.loader import load_config
    from mdm_scale.diffusion.build import t_sampler_for

    cfg = load_config(None, ["variance.t_sampler=ppots", "variance.t_sampler.bins=16", "variance.t_sampler.restarts=3",
                             "variance.t_sampler.mix_uniform=0.1", "variance.t_sampler.max_weight=8",
                             "variance.t_sampler.loss_max=20", "variance.t_sampler.refit_every=5",
                             "variance.t_sampler.half_life=10"])
    sampler = t_sampler_for(cfg.variance, cfg.seed, global_batch=8)
    assert type(sampler) is PPOTSSampler and sampler.settings == PPOTSConfig(
        bins=16, restarts=3, mix_uniform=0.1, max_weight=8.0, loss_max=20.0, refit_every=5, half_life=10.0)
    assert (sampler.sums.every, sampler.sums.decay) == (5, 0.5 ** 0.5)


def test_inverse_cdf_is_exact_and_density_integrates_to_one():
    density = epr_density(Z_KNOWN, cells=37)
    v = density.values
    assert float((0.5 * density.h * (v[1:] + v[:-1])).sum()) == pytest.approx(1.0, abs=1e-14)
    u = torch.linspace(0, 1, 10001, dtype=torch.float64)
    t = density.inverse_cdf(u)
    assert (t >= 0).all() and (t <= 1).all() and (torch.diff(t) >= 0).all()
    assert torch.allclose(exact_cdf(density, t), u, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mix, cap", [(0.1, None), (0.0, 4.0), (0.2, 3.0)])
def test_mixing_and_weight_cap_keep_a_normalised_density(mix, cap):
    base = epr_density(Z_KNOWN)
    mixed = base.mixed(mix, cap)
    v = mixed.values
    assert float((0.5 * mixed.h * (v[1:] + v[:-1])).sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((1.0 / v).max()) <= (cap or math.inf) * (1 + 1e-12)
    expected_lambda = max(mix, (1 / cap - float(base.values.min())) / (1 - float(base.values.min())) if cap else 0)
    assert torch.allclose(v, (1 - expected_lambda) * base.values + expected_lambda, atol=1e-12)


def fitted_sampler(seed: int = 0, **settings) -> PPOTSSampler:
    sampler = PPOTSSampler(seed, PPOTSConfig(**settings))
    sampler.density = epr_density(Z_KNOWN)
    return sampler


def test_quantile_inverts_every_samplers_draw():
    """``TSampler.quantile`` (the online variance monitor's strata) is F(t) of the density t was drawn from:
    quantile(transform(u)) = u up to the float32 rounding of t (|du| <= p(t) 2^-24) for uniform t, Clipped,
    P-POTS and P-POTS under SyRM; P-POTS's CDF is the exact piecewise quadratic.
    (Planted: the density's CDF evaluated linearly inside a cell fails it.)"""
    from mdm_scale.diffusion.clipped_t import ClippedT
    from mdm_scale.diffusion.coupled_t import SymmetricT

    u = torch.linspace(0.001, 0.999, 997, dtype=torch.float64).float()
    for sampler in (UniformT(1), ClippedT(1, 0.3, 0.8), fitted_sampler(), SymmetricT(fitted_sampler())):
        t, weight = sampler.transform(u)
        slack = 2**-23 / weight.double() + 1e-12  # p(t) times t's float32 spacing near t <= 1
        assert (sampler.quantile(t) - u.double()).abs().le(slack).all(), sampler.name
    density = fitted_sampler().density
    inside = torch.tensor([0.0, 0.013, 0.2, 0.5, 0.77, 1.0], dtype=torch.float64)
    assert torch.allclose(density.cdf_at(inside), exact_cdf(density, inside), rtol=0, atol=1e-15)


def test_sample_is_transform_of_keyed_uniforms():
    sampler = fitted_sampler(seed=3)
    index = torch.arange(100, 164)
    u = sampler.uniforms(index, Stream.T)
    t, weight = sampler.sample(index, Stream.T)
    t2, weight2 = sampler.transform(u)
    assert torch.equal(t, t2) and torch.equal(weight, weight2)
    assert torch.equal(u, UniformT(3).sample(index, Stream.T)[0])  # same keyed uniforms as the uniform sampler
    assert torch.allclose(weight.double(), 1 / sampler.density.pdf(t), rtol=1e-6)


def test_weights_have_mean_one_and_reweight_to_the_uniform_integral():
    """E_p[1/p(t)] = 1 and E_p[f(t)/p(t)] = integral f for f(t) = exp(3t) / t^0.3, over 200k keyed draws."""
    sampler = fitted_sampler()
    t, weight = sampler.sample(torch.arange(200_000))
    t, weight = t.double(), weight.double()
    n = len(t)
    for values, truth in ((weight, 1.0), (weight * torch.exp(3 * t) * t.pow(-0.3), None)):
        if truth is None:  # integral of exp(3t) t^-0.3 on (0, 1) by fine quadrature
            grid = (torch.arange(2_000_000, dtype=torch.float64) + 0.5) / 2_000_000
            truth = float((torch.exp(3 * grid) * grid.pow(-0.3)).mean())
        se = float(values.std()) / math.sqrt(n)
        assert abs(float(values.mean()) - truth) < 5 * se, (float(values.mean()), truth, se)


def make_batch(copies: int) -> Batch:
    """``copies`` repetitions of three SFT rows (prompt lengths 2, 3, 1; real lengths 6, 8, 5), each with its own
    sample index (so its own t and masks)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16, 17, 18], [19, 20, 21, 22, 23, 0, 0, 0]])
    real = torch.tensor([[1] * 6 + [0] * 2, [1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    loss_mask = real.clone()
    for row, prompt in enumerate([2, 3, 1]):
        loss_mask[row, :prompt] = False
    return Batch(input_ids=ids.repeat(copies, 1), loss_mask=loss_mask.repeat(copies, 1),
                 sample_index=torch.arange(3 * copies), attention_mask=real.repeat(copies, 1))


@torch.no_grad()
def test_ppots_weighted_loss_is_unbiased_for_the_uniform_t_loss():
    """On a fixed model, the mean weighted P-POTS loss equals the mean uniform-t loss within the confidence
    interval of the difference of two independent Monte-Carlo means."""
    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(MDMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2)).eval()
    copies = 6000
    batch = make_batch(copies)
    estimates = {}
    for name, sampler in (("uniform", UniformT(1)), ("ppots", fitted_sampler(seed=2))):
        noisy = MDMObjective(sampler, BernoulliMasks(seed=7 if name == "uniform" else 8, eps=1e-3), 3).corrupt(batch)
        out = model(**noisy.model_inputs())
        per_sample = noisy.sample_losses(noisy.row_losses(out.token_ce)).double() * noisy.weight.double()
        estimates[name] = per_sample.view(copies, 3)  # per row of the three-row batch
    diff = estimates["ppots"].mean(0) - estimates["uniform"].mean(0)
    se = torch.sqrt(estimates["ppots"].var(0) / copies + estimates["uniform"].var(0) / copies)
    assert (diff.abs() < 5 * se).all(), (diff, se)
    assert (estimates["ppots"].std(0) != estimates["uniform"].std(0)).all()  # the draws really differ


def test_bin_statistics_sums_per_bin():
    t = torch.tensor([0.01, 0.02, 0.5, 0.99])
    loss = torch.tensor([1.0, 3.0, 2.0, 20.0])
    pair = torch.tensor([0.5, float("nan"), 4.0, 1.0])
    stats = bin_statistics(t, loss, pair, bins=4, loss_max=10.0)
    assert stats[0, COUNT] == 2 and stats[0, SUM] == 4 and stats[0, SUMSQ] == 10
    assert stats[0, PAIRS] == 1 and stats[0, PAIR_SQ] == 0.5
    assert stats[2, COUNT] == 1 and stats[2, PAIR_SQ] == 4
    assert stats[3, SUM] == 10 and stats[3, SUMSQ] == 100  # clamped at loss_max
    assert stats[1].abs().sum() == 0


def test_bin_statistics_leave_out_non_finite_losses():
    """A skipped (non-finite) step must not poison the sampler: its NaN/Inf sequences are not counted."""
    t = torch.tensor([0.1, 0.1, 0.1, 0.9])
    loss = torch.tensor([2.0, float("nan"), float("inf"), 3.0])
    pair = torch.tensor([1.0, float("nan"), float("inf"), 0.25])
    stats = bin_statistics(t, loss, pair, bins=2)
    assert torch.isfinite(stats).all()
    assert stats[0, COUNT] == 1 and stats[0, SUM] == 2 and stats[0, SUMSQ] == 4
    assert stats[0, PAIRS] == 1 and stats[0, PAIR_SQ] == 1
    assert stats[1, COUNT] == 1 and stats[1, SUM] == 3 and stats[1, PAIR_SQ] == 0.25


def test_service_refits_every_n_steps_with_decay_and_warm_start():
    """Losses with E[l^2 | t] = w(t)^2: refits move p towards the known EPR density; the accumulated statistics
    decay by 0.5^(refit_every / half_life) per refit; the state round-trips exactly."""
    settings = dict(bins=32, refit_every=2, half_life=4.0, restarts=4)
    sampler = PPOTSSampler(0, PPOTSConfig(**settings))
    gen = torch.Generator().manual_seed(1)
    changed = []
    for step in range(1, 7):
        t = torch.rand(4096, generator=gen)
        loss = torch.from_numpy(np.exp(log_w(Z_KNOWN, t.double().numpy()))) * torch.randn(4096, generator=gen,
                                                                                          dtype=torch.float64)
        sampler.add(t, loss.float(), None)
        before = sampler.statistics.clone()
        pending = sampler.sums.pending.clone()
        changed.append(sampler.on_optimizer_step(step))
        if changed[-1]:
            assert torch.allclose(sampler.statistics, 0.5 ** 0.5 * before + pending, rtol=1e-12)
    assert changed == [False, True, False, True, False, True] and sampler.refits == 3
    known = epr_density(Z_KNOWN).values
    assert ((sampler.density.values - known).abs() / known).max() < 0.1

    restored = PPOTSSampler(0, PPOTSConfig(**settings))
    restored.load_state_dict(sampler.state_dict())
    index = torch.arange(50)
    assert all(torch.equal(a, b) for a, b in zip(sampler.sample(index), restored.sample(index)))
    assert np.array_equal(sampler.z, restored.z) and torch.equal(sampler.statistics, restored.statistics)
    with pytest.raises(ValueError, match="bins"):
        PPOTSSampler(0, PPOTSConfig(bins=16)).load_state_dict(sampler.state_dict())


def test_observe_bins_the_target_the_config_names():
    """``observe`` of a trained micro-batch: under ``target: loss`` the per-sequence loss with MIRROR's pair
    differences, under ``target: grad`` the gradient-norm proxy without pairs."""
    from types import SimpleNamespace

    micro = SimpleNamespace(t=torch.tensor([0.1, 0.6]), sample_loss=torch.tensor([1.0, 2.0]),
                            pair_sq_diff=torch.tensor([0.5, 0.25]), sample_grad_norm=torch.tensor([3.0, 4.0]))
    for target, expected in (("loss", bin_statistics(micro.t, micro.sample_loss, micro.pair_sq_diff, 4)),
                             ("grad", bin_statistics(micro.t, micro.sample_grad_norm, None, 4))):
        sampler = PPOTSSampler(0, PPOTSConfig(bins=4, target=target))
        sampler.observe(micro)
        assert torch.equal(sampler.sums.pending, expected), target


def test_service_accumulates_pairs_and_capped_losses_and_bounds_its_draw_log(monkeypatch):
    """``add`` (what ``observe`` calls) adds every micro-batch (MIRROR pair differences and the ``loss_max`` cap
    included) to the pending sums, moves them to the statistics' new device after a resume, refits every step with
    refit_every = 1, returns float32 weights, and keeps drawn t only up to the log limit."""
    import mdm_scale.diffusion.ppots as ppots

    settings = PPOTSConfig(bins=4, refit_every=1, restarts=2, loss_max=2.0, max_weight=1.5)
    sampler = PPOTSSampler(0, settings)
    fresh = sampler.state_dict()
    assert fresh["z"] is None and not fresh["pending"].any() and fresh["pending"].shape == (4, 5)
    t, loss, pairs = torch.tensor([0.1, 0.6, 0.9]), torch.tensor([1.0, 5.0, 2.0]), torch.tensor([1.0, 3.0, 0.5])
    sampler.add(t, loss, pairs)
    sampler.add(t, loss, pairs)
    assert torch.equal(sampler.sums.pending, 2 * bin_statistics(t, loss.clamp(max=2.0), pairs, 4))
    assert sampler.sums.pending[:, PAIRS].sum() == 6
    assert torch.equal(sampler.state_dict()["pending"], sampler.sums.pending)
    assert sampler.on_optimizer_step(1) is True and sampler.refits == 1
    assert sampler.density.values.min() >= 1 / 1.5 - 1e-12  # the weight cap holds after a refit
    assert sampler.z is not None
    for times, losses, fits in (([0.1, 0.6], [0.5, 0.25], 1), ([0.1, 0.6], [0.0, 0.0], 0), ([0.1, 0.2], [1.0, 2.0], 0),
                                ([], [], 0)):  # two filled bins suffice; all-zero targets or one bin keep p
        other = PPOTSSampler(0, settings)
        if times:
            other.add(torch.tensor(times), torch.tensor(losses), None)
        assert other.on_optimizer_step(1) is True and other.refits == fits
        assert other.sums.pending.dtype == torch.float64 and other.sums.pending.shape == (4, 5)
    sampler.add(t, loss, None)
    state = sampler.state_dict()
    restored = PPOTSSampler(0, settings)
    restored.load_state_dict(state)
    assert restored.refits == 1 and torch.equal(restored.sums.pending, sampler.sums.pending)
    restored.add(t, loss, None)
    assert torch.equal(state["pending"], sampler.sums.pending)  # the checkpoint's tensors are not shared
    PPOTSSampler(0, settings).load_state_dict(fresh)
    with pytest.raises(ValueError, match="^the checkpoint's P-POTS state has 4 bins and variance.t_sampler.bins is 8$"):
        PPOTSSampler(0, PPOTSConfig(bins=8)).load_state_dict(state)
    sampler.add(t.to("meta"), loss.to("meta"), None)  # a host checkpoint resumed on an accelerator
    assert sampler.sums.pending.device.type == "meta"
    monkeypatch.setattr(ppots, "_DRAW_LOG_LIMIT", 6)
    drawing = PPOTSSampler(0, PPOTSConfig(bins=4))
    for _ in range(3):
        assert drawing.transform(torch.rand(4))[1].dtype == torch.float32
    assert len(drawing._drawn) == 2  # 4 then 8 >= 6 draws: the third batch is not kept


def test_log_statistics_reports_weights_and_draws():
    sampler = fitted_sampler()
    _, weight = sampler.sample(torch.arange(1000))
    values = sampler.log_statistics()
    w = weight.double()
    assert values["weight_max"] == pytest.approx(float(w.max()))
    assert values["weight_ess"] == pytest.approx(float(w.sum() ** 2 / (len(w) * (w * w).sum())))
    assert len(values["drawn_t"]) == 1000 and values["refits"] == 0.0 and values["refit_failures"] == 0.0
    figure = values["density"]()
    assert len(figure.axes) == 2
    assert torch.equal(values["drawn_t"], sampler.density.inverse_cdf(sampler.uniforms(torch.arange(1000), Stream.T))
                       .float()) and values["weight_mean"] == pytest.approx(float(w.mean()))
    again = sampler.log_statistics()
    assert "drawn_t" not in again and "density" not in again  # draws emptied, one figure per fit


@pytest.mark.parametrize("items, message", [
    (["variance.masks.single_above=0.9"], r"unknown config key 'variance.masks.single_above': variance.masks "
                                          r"'bernoulli' has no such field \(set variance.masks.name to mirror\)"),
    (["variance.masks=mirror", "variance.masks.single_above=0"], r"'variance.masks.single_above' = 0.0: must be in"),
    (["variance.t_sampler={name: ppots, max_weight: 1}"], r"'variance.t_sampler.max_weight' = 1.0: must be > 1"),
    (["variance.t_sampler={name: ppots, masks: 1}"], r"'variance.t_sampler.masks' = 1: must be >= 2 without MIRROR"),
    (["variance.t_sampler={name: ppots, bins: 1}"], r"'variance.t_sampler.bins' = 1: must be in \[2, 4096\]"),
    (["variance.t_sampler=ppots", "train.objective=arm"], r"'variance.t_sampler' = 'ppots': t-samplers apply"),
])
def test_bad_variance_settings_name_key_and_value(items, message):
    from mdm_scale.config.loader import load_config
    from mdm_scale.config.schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config([REPO / "configs" / "quickstart.yaml"], items)


@pytest.mark.parametrize("overrides", [
    [],  # the defaults: 64 bins x 10 masks, 192 tokens
    ["variance.masks=mirror", "data.seq_len=256"],
    ["variance.t_sampler.x0=3", "variance.t_sampler.bins=7", "variance.t_sampler.masks=3",
     "variance.t_sampler.forward_tokens=1000", "data.seq_len=192", "train.micro_batch_size=2"],
])
def test_offline_estimate_plan_records_every_job_once_in_forwards_of_one_sequence(overrides):
    from mdm_scale.config.loader import load_config
    from mdm_scale.training.ppots_estimate import estimate_plan, forward_jobs

    cfg = load_config([REPO / "configs" / "quickstart.yaml"], ["data.seq_len=192", "train.micro_batch_size=64",
                                                                 "variance.t_sampler=ppots", *overrides])
    v = cfg.variance.t_sampler
    rows = (v.forward_tokens or 65536) // cfg.data.seq_len
    plans = {w: estimate_plan(cfg, w, on_gpu=True) for w in (1, 2, 3, 4, 16)}
    assert len({(p.per_forward, p.forwards_per_x0) for p in plans.values()}) == 1  # shapes: any world size
    for world, plan in plans.items():
        assert plan.per_forward * cfg.variance.masks.rows_per_sequence <= max(rows, 2 * cfg.train.micro_batch_size)
        recorded = []
        for rank in range(world):
            for f in range(plan.forwards):
                jobs, n = forward_jobs(plan, f, rank, world, v.x0)
                assert len(jobs) == plan.per_forward and len({j // plan.jobs_per_x0 for j in jobs}) == 1
                recorded += jobs[:n]
        assert sorted(recorded) == list(range(v.x0 * v.bins * v.masks)), world
    if not overrides:  # GPU: 640 draws of 192 tokens under 65,536 tokens: 2 forwards of 320 per sequence
        assert (plans[1].per_forward, plans[1].forwards_per_x0, plans[1].forwards) == (320, 2, 20)
        assert estimate_plan(cfg, 1, on_gpu=False).per_forward == 64  # CPU: one micro-batch


def test_batched_offline_estimate_equals_micro_batch_forwards(synth_dir, tmp_path, dist_env):
    """The batching changes which rows share a forward, never a job's loss: the statistics match those of
    forwards of one micro-batch each (on CPU rows do not interact, so up to float rounding at most)."""
    from conftest import tiny_overrides
    from mdm_scale.config.loader import load_config
    from mdm_scale.training.ppots_estimate import estimate_plan, offline_statistics
    from mdm_scale.training.trainer import Trainer

    settings = {"variance.t_sampler": {"name": "ppots", "x0": 0, "bins": 8, "masks": 3}, "variance.masks": "mirror"}
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "run", **settings))
    trainer = Trainer(cfg, dist_env)
    ppots = cfg.variance.t_sampler
    ppots.x0 = 3
    statistics = {}
    for tokens in (1, 10**6):
        ppots.forward_tokens = tokens
        statistics[tokens] = offline_statistics(trainer)
    assert estimate_plan(cfg, 1, on_gpu=False).forwards == 3 and ppots.forward_tokens == 10**6
    assert statistics[1][:, 0].sum() == 3 * 8 * 3  # every job counted once
    torch.testing.assert_close(statistics[10**6], statistics[1], rtol=1e-6, atol=0.0)
