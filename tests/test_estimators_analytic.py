"""The loss that training differentiates, and its gradient, are unbiased for the uniform-t objective
integral_0^1 E[l_t] dt under every t-sampler and mask generator; P-POTS and MIRROR reach their stated variances.

Everything runs the real path: keyed t-samplers (uniform, P-POTS with a non-uniform density, StraTS and SyRM
couplings), mask generators (Bernoulli, MIRROR, mirror_plus, ISAD), ``MDMObjective.corrupt`` and the masked head's
``sum_i loss_coef_i CE_i`` with its custom backward, on the analytic model of ``analytic_mdm.py`` whose moments are
exact. Each test splits the differentiated loss into its per-sequence terms X_b (B x the sum of coef * CE over b's
tokens; their mean is the loss, checked to 1e-9) and compares the mean of independent units (a unit: one copy of
the three SFT rows, or 24 sequences for a coupling) with the exact objective by a z-score. The variance is exact
where it is known in closed form (independent t: integral E[l_t^2 | x0] / p(t) dt - mu_x0^2), the sample variance
of the units for the couplings. alpha = 1e-4 two-sided per test (the gradient: Bonferroni over its 16 entries).
Each test also asserts the smallest bias it detects with power 95%, |bias| >= (z_alpha + z_0.95) SE, stated as a
fraction of the exact value (of the gradient's norm for gradient entries).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from analytic_mdm import (
    MASK,
    PARAMS,
    AnalyticMDM,
    eligible_tokens,
    features,
    gauss_legendre,
    mirror_kink,
    moments,
    sft_batch,
    t_breaks,
)
from mdm_scale.config.variance import PPOTSConfig
from mdm_scale.diffusion.coupled_t import StratifiedT, SymmetricT
from mdm_scale.diffusion.masks import BernoulliMasks, MirrorMasks
from mdm_scale.diffusion.objective import MDMObjective, TrainedMicroBatch
from mdm_scale.diffusion.ppots import STAT_COLUMNS, SUM, SUMSQ, PiecewiseLinearDensity, PPOTSSampler
from mdm_scale.diffusion.t_samplers import UniformT
from test_mirror import ConstantT

EPS = 0.02
ALPHA = 1e-4
Z = NormalDist().inv_cdf(1 - ALPHA / 2)  # 3.89
Z_GRAD = NormalDist().inv_cdf(1 - ALPHA / (2 * PARAMS))  # 4.52, Bonferroni over the gradient's entries
Z_POWER = NormalDist().inv_cdf(0.95)
COPIES = 8000  # x 3 SFT rows = 24000 sequences per estimator
ISAD_IDS, ISAD_DELTA = (6, 7), 0.3
MIRROR_PLUS = 0.6
TOKENS = eligible_tokens()


# ---- exact values -------------------------------------------------------------------------------------------------
def exact_objective(model: AnalyticMDM) -> tuple[np.ndarray, np.ndarray]:
    """Per x0: integral_0^1 E[l_t] dt (X,) and of E[dl_t/dW] (X, P) under Bernoulli(pi(t)) masks."""
    t, w = gauss_legendre(t_breaks(EPS))
    m = moments(model, TOKENS, t, EPS)
    return m.f @ w, np.einsum("xtp,t->xp", m.g, w)


def exact_variance(model: AnalyticMDM, density: PiecewiseLinearDensity | None = None, **mask_law) -> tuple:
    """Per x0, Var of one sequence's weighted loss w(t) l and gradient (per entry) for t ~ p, weight 1/p:
    integral E[l^2 | t] / p(t) dt - mu^2. Quadrature pieces follow p's linear cells and the mask law's kinks."""
    kinks = [mirror_kink(EPS)] if mask_law.get("mirror") else []
    if mask_law.get("single_above") is not None:
        kinks.append(mask_law["single_above"])
    if mask_law.get("boosted"):
        kinks.append((1 - ISAD_DELTA - EPS) / (1 - EPS))  # q = pi + delta reaches 1
    if density is None:
        t, w = gauss_legendre(t_breaks(EPS, kinks))
        p = np.ones_like(t)
    else:
        t, w = gauss_legendre(np.concatenate([np.linspace(0, 1, density.cells + 1), kinks]), nodes=2)
        p = density.pdf(torch.from_numpy(t)).numpy()
    m = moments(model, TOKENS, t, EPS, **mask_law)
    mean, grad_mean = m.f @ w, np.einsum("xtp,t->xp", m.g, w)
    return (m.s / p) @ w - mean**2, np.einsum("xtp,t->xp", m.g2 / p[None, :, None], w) - grad_mean**2


# ---- the estimator as training computes it ------------------------------------------------------------------------
def per_sequence_terms(objective: MDMObjective, model: AnalyticMDM, copies: int = COPIES):
    """Corrupt ``copies`` x the SFT rows, run the model, back-propagate its loss, and split loss and gradient into
    the per-sequence terms X_b (B,) and G_b (B, P) whose means they are (checked)."""
    batch = sft_batch(copies)
    noisy = objective.corrupt(batch)
    model.zero_grad()
    out = model(**noisy.model_inputs())
    out.loss.backward()
    sequences = len(noisy.t)
    sequence = noisy.row_sample[noisy.token_row]
    coef = noisy.loss_coef.to(torch.float64) * sequences
    x = torch.zeros(sequences, dtype=torch.float64).index_add_(0, sequence, coef * out.token_ce)
    with torch.no_grad():  # the closed form dCE_i/dW = (softmax(W h_i) - e_{y_i}) h_i^T per token
        hidden = features((noisy.input_ids == MASK).sum(1)[noisy.token_row], model.context)
        residual = torch.softmax(hidden @ model.weight.T, 1)
        residual[torch.arange(len(residual)), noisy.loss_targets] -= 1.0
        token_grad = (residual[:, :, None] * hidden[:, None, :]).reshape(-1, PARAMS)
    g = torch.zeros(sequences, PARAMS, dtype=torch.float64).index_add_(0, sequence, coef[:, None] * token_grad)
    assert float(out.loss.detach()) == pytest.approx(float(x.mean()), rel=1e-9)
    assert torch.allclose(model.weight.grad.reshape(-1), g.mean(0), rtol=1e-8, atol=1e-12)
    return x.numpy(), g.numpy()


def units(values: np.ndarray, size: int) -> np.ndarray:
    """Means over consecutive groups of ``size`` sequences (the i.i.d. units)."""
    return values.reshape(-1, size, *values.shape[1:]).mean(1)


def check_unbiased(estimates: np.ndarray, exact: float, unit_variance: float | None, detects: float,
                   z: float = Z, scale: float | None = None) -> None:
    """|mean - exact| < z SE over i.i.d. unit estimates, SE from ``unit_variance`` (exact) or the sample; and the
    test's power claim: (z + z_0.95) SE <= ``detects`` x ``scale`` (default |exact|)."""
    variance = float(estimates.var(ddof=1)) if unit_variance is None else unit_variance
    if variance <= 1e-20:  # an entry that does not depend on the noise (W's S-column without context): exact
        assert np.allclose(estimates, exact, rtol=1e-9, atol=1e-12)
        return
    se = math.sqrt(variance / len(estimates))
    score = (float(estimates.mean()) - exact) / se
    assert abs(score) < z, (float(estimates.mean()), exact, se, score)
    assert (z + Z_POWER) * se <= detects * (abs(exact) if scale is None else scale), ((z + Z_POWER) * se, exact)


def check_loss_and_gradient(objective, model, exact_var: tuple | None, unit: int, detects: tuple[float, float]):
    """The per-unit means of X_b and G_b are unbiased for the objective (``detects``: loss, gradient)."""
    x, g = per_sequence_terms(objective, model)
    mu, grad_mu = exact_objective(model)
    x_units, g_units = units(x, unit), units(g, unit)
    var = None if exact_var is None else exact_var[0].mean() / unit
    check_unbiased(x_units, float(mu.mean()), var, detects[0])
    grad_var = [None] * PARAMS if exact_var is None else exact_var[1].mean(0) / unit
    norm = float(np.linalg.norm(grad_mu.mean(0)))
    for p in range(PARAMS):
        check_unbiased(g_units[:, p], float(grad_mu[:, p].mean()), grad_var[p], detects[1], Z_GRAD, norm)


@pytest.fixture(scope="module")
def model():
    return AnalyticMDM()


@pytest.fixture(scope="module")
def fitted_density(model) -> PiecewiseLinearDensity:
    """P-POTS's own fit (``PPOTSSampler.update``: bins -> EPR -> density) to the exact E[l^2 | t] at the bin
    centres: a density far from uniform (about 1/pi(t) at small t)."""
    sampler = PPOTSSampler(0, PPOTSConfig(bins=64, restarts=8))
    sampler.update(exact_bin_statistics(model, 64))
    return sampler.density


def exact_bin_statistics(model: AnalyticMDM, bins: int) -> torch.Tensor:
    """P-POTS statistics holding the exact E[l | t] and E[l^2 | t] (averaged over x0) at the bin centres."""
    centres = (np.arange(bins) + 0.5) / bins
    m = moments(model, TOKENS, centres, EPS)
    stats = torch.zeros(bins, STAT_COLUMNS, dtype=torch.float64)
    stats[:, 0] = 1.0
    stats[:, SUM] = torch.from_numpy(m.f.mean(0))
    stats[:, SUMSQ] = torch.from_numpy(m.s.mean(0))
    return stats


def ppots(seed: int, density: PiecewiseLinearDensity) -> PPOTSSampler:
    sampler = PPOTSSampler(seed, PPOTSConfig())
    sampler.density = density
    return sampler


RAMP = PiecewiseLinearDensity(torch.tensor([0.2, 1.8], dtype=torch.float64))


# ---- 1. unbiasedness -------------------------------------------------------------------------------------------
def test_uniform_t_bernoulli_masks(model):
    """Uniform t, Bernoulli masks. Detects a relative bias of 3.5% of the loss (e.g. a constant factor on it, masks
    at a rate other than pi(t), masks drawn for another sequence's t) and 3% of |E grad| in any gradient entry."""
    objective = MDMObjective(UniformT(11), BernoulliMasks(12, EPS), MASK)
    check_loss_and_gradient(objective, model, exact_variance(model), 3, (0.035, 0.03))


@pytest.mark.parametrize("shape", ["fitted", "ramp"])
def test_ppots_importance_weighted(model, fitted_density, shape):
    """P-POTS, t ~ p with weight 1/p(t), for P-POTS's own fit (decreasing p) and the ramp p = 0.2 + 1.6 t.
    Detects 3.5% (fitted) and 5% (ramp) of the loss, 4% of |E grad| per entry; dropping the weight biases the loss
    by -1% (fitted: not detectable) and +7% (ramp: detected)."""
    density = fitted_density if shape == "fitted" else RAMP
    objective = MDMObjective(ppots(21, density), BernoulliMasks(22, EPS), MASK)
    check_loss_and_gradient(objective, model, exact_variance(model, density), 3, (0.05, 0.04))


@pytest.mark.parametrize("coupling", ["strats", "syrm", "strats+ppots", "syrm+ppots"])
def test_coupled_rates(model, coupling):
    """StraTS over steps of 24 sequences and SyRM pairs, around uniform t or P-POTS (ramp); units of 24 sequences,
    sample variance. Detects 5.5% of the loss and 4% of |E grad| per entry."""
    inner = ppots(31, RAMP) if coupling.endswith("ppots") else UniformT(31)
    sampler = StratifiedT(inner, 24) if coupling.startswith("strats") else SymmetricT(inner)
    objective = MDMObjective(sampler, BernoulliMasks(32, EPS), MASK)
    check_loss_and_gradient(objective, model, None, 24, (0.055, 0.04))


@pytest.mark.parametrize("variant", ["mirror", "mirror_plus", "ppots+mirror"])
def test_mirror_pairs(model, variant):
    """MIRROR pairs (the pair mean is the sequence's loss), mirror_plus (one row, share 1, for t >= 0.6) and MIRROR
    under P-POTS (ramp). Detects 2.5% (3.5% under P-POTS) of the loss and 2.5% of |E grad| per entry; an
    unaveraged pair doubles the loss."""
    single_above = MIRROR_PLUS if variant == "mirror_plus" else None
    density = RAMP if variant == "ppots+mirror" else None
    sampler = UniformT(41) if density is None else ppots(41, density)
    objective = MDMObjective(sampler, MirrorMasks(42, EPS, single_above=single_above), MASK)
    exact = exact_variance(model, density, mirror=True, single_above=single_above)
    check_loss_and_gradient(objective, model, exact, 3, (0.035 if density else 0.025, 0.025))


@pytest.mark.parametrize("mirror", [False, True])
def test_isad_on_context_free_token_losses(mirror):
    """ISAD (tokens 6 and 7 masked at min(pi + 0.3, 1), weighted by 1/q), alone and with MIRROR, is unbiased when a
    token's loss ignores the other masks (the case masks.py states). Detects 2.5% of the loss, 7% of |E grad|
    per entry (the entries of W's S-column are exactly 0 without context, and checked to be)."""
    model = AnalyticMDM(context=False)
    masks = (MirrorMasks(52, EPS, boosted_ids=ISAD_IDS, delta=ISAD_DELTA) if mirror
             else BernoulliMasks(52, EPS, ISAD_IDS, ISAD_DELTA))
    objective = MDMObjective(UniformT(51), masks, MASK)
    exact = exact_variance(model, mirror=mirror, boosted=ISAD_IDS, delta=ISAD_DELTA)
    check_loss_and_gradient(objective, model, exact, 3, (0.025, 0.07))


# ---- 2. variance: P-POTS reaches the optimum, MIRROR its closed form ---------------------------------------------
def weighted_variance(model, density: PiecewiseLinearDensity | None) -> float:
    return float(exact_variance(model, density)[0].mean())


def test_ppots_fit_reaches_the_optimal_variance_and_beats_uniform(model, fitted_density):
    """Var of one sequence's weighted loss under p, given x0 and averaged over x0: mean_x0 (integral
    E[l^2 | t, x0] / p - mu_x0^2). The optimum p* = sqrt(E[l^2 | t]) / Z (E over x0 too) gives
    Z^2 - mean mu_x0^2. P-POTS's fit to exact statistics (the fixture) and its service fit
    (``observe`` of 24000 sampled sequences, refit at ``on_optimizer_step``) both get within 0.5% of the optimum's
    variance (measured: +0.2%), and more than 5% below uniform t's (the optimum is 8.6% below it). All values are
    exact integrals for the density the sampler returns; no sampling noise enters except through the service fit's
    statistics."""
    t, w = gauss_legendre(t_breaks(EPS))
    m = moments(model, TOKENS, t, EPS)
    optimum = float(np.sqrt(m.s.mean(0)) @ w) ** 2 - float(((m.f @ w) ** 2).mean())
    uniform = weighted_variance(model, None)
    sampler = PPOTSSampler(61, PPOTSConfig(bins=64, restarts=8, refit_every=1))
    objective = MDMObjective(UniformT(61), BernoulliMasks(62, EPS), MASK)  # statistics from uniform t
    noisy = objective.corrupt(sft_batch(COPIES))
    with torch.no_grad():
        out = model(**noisy.model_inputs())
    sampler.observe(TrainedMicroBatch(noisy, out.token_ce.float()))
    assert sampler.on_optimizer_step(1) and sampler.refits == 1
    for density in (fitted_density, sampler.density):
        fitted = weighted_variance(model, density)
        assert optimum <= fitted <= 1.005 * optimum, (fitted, optimum)
        assert fitted < 0.95 * uniform, (fitted, uniform)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
def test_mirror_pair_variance_matches_the_closed_form(t):
    """Context-free token losses c_i at fixed t: the MIRROR pair mean (1/(2 n pi)) sum_i c_i (M1_i + M2_i) has
    Var = (1/(2 n^2 pi^2)) sum_i c_i^2 (pi (1 - pi) + k), with the per-token covariance k = -pi^2 (pi <= 1/2) or
    -(1 - pi)^2 (above). The sum over the three row types of the sample variances (8000 pairs each) must match
    the closed form within z_alpha of its SE (from the samples' fourth moments). Independent masks (k = 0) give
    a 56%, 2400%, 32% higher variance at t = 0.25, 0.5, 0.8; the test detects 20%."""
    model = AnalyticMDM(context=False)
    objective = MDMObjective(ConstantT(t), MirrorMasks(71, EPS), MASK)
    x, _ = per_sequence_terms(objective, model)
    ce, _ = model.tables(0)
    pi = (1 - EPS) * t + EPS
    k = -pi**2 if pi <= 0.5 else -((1 - pi) ** 2)
    closed = measured = se2 = 0.0
    for row, tokens in enumerate(TOKENS):
        c, n = ce[0][tokens], len(tokens)
        closed += float((c**2).sum()) * (pi * (1 - pi) + k) / (2 * n**2 * pi**2)
        values = x[row::len(TOKENS)]
        measured += float(values.var(ddof=1))
        se2 += (float(((values - values.mean()) ** 4).mean()) - float(values.var()) ** 2) / len(values)
    se = math.sqrt(se2)
    assert abs(measured - closed) < Z * se, (measured, closed, se)
    assert (Z + Z_POWER) * se <= 0.2 * closed, ((Z + Z_POWER) * se, closed)


def test_ema_correction_has_mean_zero_under_importance_weights():
    """EMA control variate (docs/spec.md 3.5) with P-POTS weights 1/p(t) (ramp p = 0.2 + 1.6 t): over 96000 keyed draws
    the correction mean_b w_b b[bin(t_b)] - mean_k b_k is 0 within z_alpha exact SEs (Var of one draw:
    integral b[bin(t)]^2 / p(t) dt - (mean_k b_k)^2). Detects a bias of 1.5% of mean_k b_k; a correction without the
    weight is off by +16% here."""
    from mdm_scale.diffusion.ema_baseline import EMABaseline

    ema = EMABaseline(bins=10, rate=0.05, device=torch.device("cpu"))
    ema.baseline = 1.0 + 3.0 * (torch.arange(10, dtype=torch.float32) + 0.5) / 10  # like a rising E[l | t]
    t, weight = ppots(81, RAMP).sample(torch.arange(96_000))
    correction = float(ema.correction(t, weight))
    nodes, w = gauss_legendre(np.linspace(0, 1, 11))
    b = ema.baseline.double().numpy()[np.minimum((nodes * 10).astype(int), 9)]
    p = RAMP.pdf(torch.from_numpy(nodes)).numpy()
    mean_b = float(ema.baseline.double().mean())
    se = math.sqrt(((b**2 / p) @ w - mean_b**2) / len(t))
    assert abs(correction) < Z * se, (correction, se)
    assert (Z + Z_POWER) * se <= 0.015 * mean_b


# ---- contracts that the mutation run (docs/testing.md) found untested ----------------------------------------
@pytest.mark.parametrize("name", ["uniform", "ppots", "strats", "syrm", "strats+ppots"])
def test_samplers_return_float32_rates_and_weights(name):
    """TSampler.sample's contract: (t, weight), float32 (B,), t in [0, 1), weight 1/p(t) > 0."""
    inner = ppots(91, RAMP) if name.endswith("ppots") else UniformT(91)
    sampler = {"strats": StratifiedT(inner, 5), "syrm": SymmetricT(inner)}.get(name.split("+")[0], inner)
    t, weight = sampler.sample(torch.arange(7, 1007))
    assert t.dtype == weight.dtype == torch.float32 and t.shape == weight.shape == (1000,)
    assert bool(((t >= 0) & (t < 1)).all()) and bool((weight > 0).all())


def test_mirror_plus_pairs_report_nan_for_single_rows():
    """With mirror_plus, a batch of paired and single sequences: pair_sq_diff is (l1 - l2)^2 for pairs, NaN for the
    single rows (so P-POTS's statistics skip them)."""
    sampler = UniformT(0)
    sampler.transform = lambda u: (torch.tensor([0.2, 0.7, 0.4]), torch.ones(3))  # fixed rates
    noisy = MDMObjective(sampler, MirrorMasks(1, EPS, single_above=0.5), MASK).corrupt(sft_batch(1))
    assert noisy.row_sample.tolist() == [0, 0, 1, 2, 2]
    row_loss = torch.tensor([1.0, 3.0, 5.0, 2.0, 6.0])
    diff = noisy.pair_sq_diff(row_loss)
    assert diff[0] == 4.0 and diff[2] == 16.0 and bool(torch.isnan(diff[1]))
    assert noisy.sample_losses(row_loss).tolist() == [2.0, 5.0, 4.0]


def test_arm_batch_fields_with_filler_rows_and_single_targets():
    """ARM's NoisyBatch: a filler row (valid 0) gets coefficient 0, a row with one target has token_scale 1, and
    the statistics fields map tokens to rows and rows to sequences one to one."""
    from mdm_scale.diffusion.objective import ARMObjective

    batch = sft_batch(1, rows=(([1, 3], [4, 5, 3, 7]), ([1, 4, 5, 6, 7], [3]), ([1], [6, 6, 4])))
    batch.valid = torch.tensor([True, True, False])
    noisy = ARMObjective().corrupt(batch)
    assert noisy.rows == 3 and noisy.eligible_tokens == 8 and noisy.attention_mask is batch.attention_mask
    assert noisy.token_row.tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    assert noisy.token_scale.tolist() == pytest.approx([0.25] * 4 + [1.0] + [1 / 3] * 3)
    assert noisy.loss_coef.tolist() == pytest.approx([0.25 / 3] * 4 + [1 / 3] + [0.0] * 3)
    assert noisy.row_sample.tolist() == [0, 1, 2] and noisy.row_scale.tolist() == [1.0] * 3
    assert noisy.t.tolist() == [0.0] * 3 and noisy.weight.tolist() == [1.0, 1.0, 0.0]
    assert noisy.sample_losses(noisy.row_losses(torch.ones(8))).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_strats_permutations_depend_on_seed_and_stream():
    """StraTS's stratum permutation is keyed by (seed, stream, step): two seeds, or the training and eval streams,
    assign different strata to the same positions (64! permutations: equal by chance with probability 1/64!)."""
    from mdm_scale.core.noise import Stream

    def strata(seed: int, stream: int) -> list[int]:
        u = StratifiedT(UniformT(seed), 64).uniforms(torch.arange(64), stream)
        return (u * 64).floor().long().tolist()

    assert strata(1, Stream.T) != strata(2, Stream.T)
    assert strata(1, Stream.T) != strata(1, Stream.EVAL_T)
    assert sorted(strata(1, Stream.T)) == list(range(64))


def test_masks_for_passes_every_setting_on():
    """``masks_for`` (what configs use) hands mirror_plus's threshold and ISAD's ids and delta to the generator."""
    from mdm_scale.config.loader import load_config
    from mdm_scale.config.variance import BernoulliMasksConfig
    from mdm_scale.diffusion.build import masks_for

    cfg = load_config(None, [f"variance.eps={EPS}", "variance.masks={name: mirror, single_above: 0.9}",
                             "variance.isad.token_ids=[6]", "variance.isad.delta=0.25"])
    mirror, single = masks_for(cfg.variance, 3), masks_for(cfg.variance, 3, BernoulliMasksConfig())
    assert isinstance(mirror, MirrorMasks) and mirror.single_above == 0.9
    assert type(single) is BernoulliMasks
    for masks in (mirror, single):
        assert (masks.seed, masks.eps, masks.boosted_ids.tolist(), masks.delta) == (3, EPS, [6], 0.25)


def test_corrupt_fills_every_field_for_filler_rows_streams_isad_and_one_token_rows():
    """``MDMObjective.corrupt``: filler rows (valid 0) get weight and coefficients 0; the t stream is the one asked
    for; a single ISAD id is masked at q = min(pi + delta, 1) and weighted 1/(q n); a one-token response has
    token_scale 1/pi; padding reaches the model; ``eligible_tokens`` counts the response tokens."""
    from mdm_scale.core.noise import Stream

    rows = (([1, 3], [4, 6, 3, 7]), ([1, 4, 5, 6, 7], [3]), ([1], [6, 6, 4]))
    batch = sft_batch(200, rows=rows)
    batch.valid = torch.arange(600) % 3 != 2  # the third row of each copy is filler
    objective = MDMObjective(UniformT(5), BernoulliMasks(6, EPS, boosted_ids=(6,), delta=0.3), MASK)
    noisy = objective.corrupt(batch)
    assert noisy.eligible_tokens == 200 * 8 and torch.equal(noisy.attention_mask, batch.attention_mask)
    filler = ~batch.valid
    assert bool((noisy.weight[filler] == 0).all()) and bool((noisy.weight[~filler] == 1).all())
    sequence = noisy.row_sample[noisy.token_row]
    assert bool((noisy.loss_coef[filler[sequence]] == 0).all())
    pi = (1 - EPS) * noisy.t[sequence] + EPS
    q = torch.where(noisy.loss_targets == 6, (pi + 0.3).clamp(max=1.0), pi)
    n = batch.loss_mask.sum(1)[sequence]
    assert torch.allclose(noisy.token_scale, 1 / (q * n), rtol=1e-6)
    assert bool((n == 1).any())  # the one-token rows were masked somewhere, and checked above
    eval_t = objective.corrupt(batch, t_stream=Stream.EVAL_T).t
    assert torch.equal(eval_t, UniformT(5).sample(batch.sample_index, Stream.EVAL_T)[0])
    assert not torch.equal(eval_t, noisy.t)
