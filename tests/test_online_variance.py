"""Online A/B/C (``diffusion/online_variance.py``) and ``variance.masks: auto``.

1. On the analytic model of ``analytic_mdm.py`` (A, B, C, V, MIRROR's pair statistic and SyRM's covariance known
   exactly by enumerating masks), the monitor driven as the trainer drives it (probe, observe, pool) recovers the
   exact values within 4.5 of its own standard errors, with and without MIRROR's training pairs and SyRM.
2. While the mean loss falls, the monitor's V is unbiased; the raw pooled sums of the estimator before issue 26
   are not. Its items are the ones the module docstring names, summed by hand; its pooling centres each step on
   the previous step's mean and decays by what the settings say.
3. On a real (tiny) model, the online estimates pooled during training agree with ``mdm-scale variance`` on the
   checkpoint of the same weights (learning rate ~0 keeps them fixed), within 4.5 combined standard errors.
4. Through ``masks: auto``'s switches the per-step loss and its gradient stay unbiased for the uniform objective
   (exact values of the analytic model), and the stream positions stay consecutive and disjoint; the rule
   switches only past its margin; a tiny ``masks: auto`` run logs its decisions and resumes exactly.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analytic_mdm import (
    MASK,
    PAD,
    SFT_ROWS,
    VOCAB,
    AnalyticMDM,
    eligible_tokens,
    exact_abc,
    midpoints,
    moments,
    sft_batch,
)
from conftest import read_scalars, tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError
from mdm_scale.config.variance import BernoulliMasksConfig, MirrorMasksConfig
from mdm_scale.core.batch import Batch
from mdm_scale.data.examples import TokenizedData
from mdm_scale.data.loader import TrainLoader
from mdm_scale.diffusion import online_variance
from mdm_scale.diffusion import variance_estimates as ve
from mdm_scale.diffusion.build import masks_for
from mdm_scale.diffusion.coupled_t import SymmetricT
from mdm_scale.diffusion.objective import MDMObjective, TrainedMicroBatch
from mdm_scale.diffusion.online_variance import MonitorSettings, Probe, VarianceMonitor
from mdm_scale.diffusion.t_samplers import UniformT
from mdm_scale.training.trainer import Trainer

Z = 4.5
EPS = 0.05


def analytic_loader(micro: int, seed: int = 5) -> TrainLoader:
    """The training stream over the analytic model's SFT rows (x0 uniform over them, epoch by epoch)."""
    rows = [prompt + response for prompt, response in SFT_ROWS]
    data = TokenizedData.from_prompt_lens(np.concatenate(rows), np.cumsum([0, *map(len, rows)]),
                                          np.array([len(prompt) for prompt, _ in SFT_ROWS]))
    return TrainLoader(data, seed, 0, 1, micro, 1, pad_id=PAD, pad_to_multiple_of=1, seq_len=16)


def iid_batch(step: int, size: int) -> Batch:
    """``size`` sequences drawn i.i.d. from the analytic model's SFT rows (the training stream draws without
    replacement, which on three rows would couple the sequences of a step), sample indices step * size + b."""
    choice = torch.randint(len(SFT_ROWS), (size,), generator=torch.Generator().manual_seed(1000 + step))
    rows = sft_batch(1)
    return Batch(rows.input_ids[choice], rows.loss_mask[choice], torch.arange(step * size, (step + 1) * size),
                 rows.attention_mask[choice])


def exact_quantities(model: AnalyticMDM) -> dict[str, float]:
    t = midpoints(0.0, 1.0, 1000)  # symmetric about 1/2: t and 1 - t are both nodes
    single = moments(model, eligible_tokens(), t, EPS, gradient=False)
    paired = moments(model, eligible_tokens(), t, EPS, mirror=True, gradient=False)
    abc = exact_abc(single)
    pair_half_sq = 2 * abc["A"] - 2 * (paired.s - paired.f**2).mean()  # A - K (pair mean's mask variance (A+K)/2)
    fbar = single.f.mean(0)
    return {"V": abc["total"], "A": abc["A"], "B": abc["B"], "C": abc["C"], "pair_half_sq": pair_half_sq,
            "cov_pair": abc["total"] - pair_half_sq, "cov_syrm": float((fbar * fbar[::-1]).mean() - fbar.mean() ** 2)}


def evaluate(model: AnalyticMDM, noisy) -> TrainedMicroBatch:
    with torch.no_grad():
        return TrainedMicroBatch(noisy, model(**noisy.model_inputs()).token_ce.float())


@pytest.mark.parametrize("mirror, syrm", [(False, False), (True, False), (False, True), (True, True)])
def test_monitor_recovers_the_exact_quantities_on_a_known_model(mirror, syrm):
    """On the analytic model (A 3.57, B 0.15, C 0.01, V 3.73, A - K 4.72: cov_pair = -0.99, MIRROR pays at
    equal rows), one pooling of 120 steps of 16 sequences, all probed: V, A, B, C, the pair statistic and the
    covariances within 4.5 SE of their exact values, with MIRROR's training pairs and SyRM's units or without;
    under SyRM cov_syrm = Cov(f(t), f(1 - t)) too, and the gain -(cov_pair + cov_syrm) is resolved above 0.
    (Planted: B's items centred like a covariance fails it.)"""
    cfg = load_config(None, [f"variance.eps={EPS}", "seed=3"])
    sampler = SymmetricT(UniformT(3)) if syrm else UniformT(3)
    model = AnalyticMDM()
    objective = MDMObjective(sampler, masks_for(cfg.variance, 3, MirrorMasksConfig() if mirror else None), MASK)
    probe = Probe(objective, masks_for(cfg.variance, 3, MirrorMasksConfig()), masks_for(cfg.variance, 3), 3,
                  fraction=1.0)
    steps = 120
    monitor = VarianceMonitor(MonitorSettings(every=steps, probe_every=1, probe_fraction=1.0, syrm=syrm),
                              sampler.quantile, probe)
    for step in range(steps):
        batch = iid_batch(step, 16)
        monitor.probe(step, batch, lambda noisy: evaluate(model, noisy))
        monitor.observe(evaluate(model, objective.corrupt(batch)))
        monitor.on_optimizer_step(step + 1)
    r, exact = monitor.report, exact_quantities(model)
    assert r["cov_pair"].n_eff == steps * 16 * (2 if mirror else 1)  # the probe's pairs, and the training pairs
    for name in ("V", "A", "B", "C", "pair_half_sq", "cov_pair", *(("cov_syrm",) if syrm else ())):
        assert abs(r[name].value - exact[name]) <= Z * r[name].se, (name, r[name], exact[name])
    assert r["gain"].value == pytest.approx(-(r["cov_pair"].value + (r["cov_syrm"].value if syrm else 0.0)))
    assert r["gain"].value - Z * r["gain"].se > 0  # MIRROR pays here, resolved
    assert r["A_share"].value + r["B_share"].value + r["C_share"].value == pytest.approx(1.0)


# ---- the items and the pooling, by hand -------------------------------------------------------------------
def micro_batch(loss: list[float], row_sample: list[int], t: list[float], weight: list[float]) -> SimpleNamespace:
    """What ``training_sums`` and ``probe_sums`` read of a trained micro-batch: unweighted row losses, the
    sequence of each row, and per sequence t, weight and mean row loss."""
    row_loss, sequence = torch.tensor(loss), torch.tensor(row_sample)
    sample_loss = torch.zeros(len(t)).index_add_(0, sequence, row_loss) / torch.bincount(sequence, minlength=len(t))
    noisy = SimpleNamespace(t=torch.tensor(t), weight=torch.tensor(weight), row_sample=sequence, rows=len(loss))
    return SimpleNamespace(noisy=noisy, t=noisy.t, row_loss=row_loss, sample_loss=sample_loss)


def expected_sums(items: list[tuple[str, int, float, float]], rows: list[float], unit: list[int]) -> torch.Tensor:
    """(STEP_COLUMNS,) built item by item: (quantity, stratum, p, s) -> [1, p, s, p^2, p s, s^2]; the rows' n, sum
    L, sum over units of (unit sum)^2, of k_u (unit sum) and of k_u^2."""
    out = torch.zeros(online_variance.STEP_COLUMNS, dtype=torch.float64)
    for name, stratum, p, s in items:
        start = ve.ROW_COLUMNS + online_variance.QUANTITY_NAMES.index(name) * online_variance.ITEM_BLOCK
        out[start + stratum * ve.ITEM_COLUMNS:start + (stratum + 1) * ve.ITEM_COLUMNS] += torch.tensor(
            [1.0, p, s, p * p, p * s, s * s], dtype=torch.float64)
    if rows:
        groups = [[L for L, u in zip(rows, unit) if u == g] for g in sorted(set(unit))]
        out[:ve.ROW_COLUMNS] = torch.tensor([len(rows), sum(rows), sum(sum(g) ** 2 for g in groups),
                                            sum(len(g) * sum(g) for g in groups), sum(len(g) ** 2 for g in groups)],
                                           dtype=torch.float64)
    return out


@pytest.mark.parametrize("syrm", [False, True])
def test_training_sums_hold_one_item_per_unit_pair_and_partner(syrm):
    """Four sequences (t in strata 0, 2, 4, 7; weights 2, 0.5, 1, 1) with MIRROR rows (0, 0 | 1, 1 | 2 | 3, 3: the
    third has one row). V: one item per sequence (under SyRM per pair of partners: sequences 0-1 and 2-3), p = mean
    L^2, s = 2 mean L over its weighted rows; cov_pair: each two-row sequence, (L1 L2, L1 + L2); cov_syrm (SyRM):
    each pair of partners' weighted mean rows. (Planted: units = sequences under SyRM; the single row paired with
    its neighbour: each fails.)"""
    loss, rows, t, weight = [1.0, 3.0, 2.0, 6.0, 5.0, 0.5, 1.5], [0, 0, 1, 1, 2, 3, 3], [0.05, 0.3, 0.6, 0.95], \
        [2.0, 0.5, 1.0, 1.0]
    strata = [0, 2, 4, 7]
    got = online_variance.training_sums(micro_batch(loss, rows, t, weight), lambda u: u.double(), syrm)
    L = [x * weight[b] for x, b in zip(loss, rows)]
    unit = [b // 2 for b in rows] if syrm else rows
    items = []
    for u in sorted(set(unit)):
        mine = [x for x, v in zip(L, unit) if v == u]
        first = rows[unit.index(u)]
        items.append(("V", strata[first], sum(x * x for x in mine) / len(mine), 2 * sum(mine) / len(mine)))
    for i, j in ((0, 1), (2, 3), (5, 6)):
        items.append(("cov_pair", strata[rows[i]], L[i] * L[j], L[i] + L[j]))
    if syrm:
        mean = [sum(x for x, b in zip(L, rows) if b == seq) / rows.count(seq) for seq in range(4)]
        items += [("cov_syrm", strata[0], mean[0] * mean[1], mean[0] + mean[1]),
                  ("cov_syrm", strata[2], mean[2] * mean[3], mean[2] + mean[3])]
    assert torch.allclose(got, expected_sums(items, L, unit), rtol=1e-12, atol=0)


def test_probe_sums_hold_a_pair_a_mask_a_rate_and_a_difference_item_per_sequence():
    """Two probed sequences: rows (base, antithetic) x 2, then the independent-mask and independent-rate rows,
    each weighted by its own sequence's weight; strata of the base rates (0.3, 0.9 -> 2, 7). Nothing counted:
    zeros. (Planted: the rate row's weight used for the base row fails it.)"""
    micro = micro_batch([1.0, 2.0, 3.0, 5.0, 4.0, 7.0, 1.0, 2.0], [0, 0, 1, 1, 2, 3, 4, 5],
                        [0.3, 0.9, 0.3, 0.9, 0.5, 0.1], [2.0, 0.5, 2.0, 0.5, 3.0, 1.0])
    got = online_variance.probe_sums(micro, 2, lambda u: u.double())
    base, anti, mask, rate = (2.0, 1.5), (4.0, 2.5), (8.0, 3.5), (3.0, 2.0)  # weighted
    items = []
    for b, stratum in ((0, 2), (1, 7)):
        items += [("cov_pair", stratum, base[b] * anti[b], base[b] + anti[b]),
                  ("cov_mask", stratum, base[b] * mask[b], base[b] + mask[b]),
                  ("cov_rate", stratum, base[b] * rate[b], base[b] + rate[b]),
                  ("B", stratum, base[b] * (mask[b] - rate[b]), mask[b] - rate[b])]
    assert torch.allclose(got, expected_sums(items, [], []), rtol=1e-12, atol=0)
    assert not online_variance.probe_sums(micro, 0, lambda u: u.double()).any()


def hand_v(blocks: list[list[list[float]]], decay: float) -> tuple[float, float, float]:
    """V pooled by hand, its SE and n_eff: each step's rows (singleton units) centred on m = the previous step's
    mean (0 at first) less c = the mean of (L_i - m)(L_j - m) over pairs i != j; the items of block k of K
    weighted w = decay^(K - 1 - k); sigma^2 = sum w (z - zbar)^2 / (W - W2 / W), SE = sigma / sqrt(n_eff),
    n_eff = W^2 / W2 (W = sum w, W2 = sum w^2)."""
    weighted, m = [], 0.0
    for k, block in enumerate(blocks):
        for rows in block:
            pairs = [(a - m) * (b - m) for a, b in itertools.permutations(rows, 2)]
            c = sum(pairs) / len(pairs)
            weighted += [(decay ** (len(blocks) - 1 - k), (x - m) ** 2 - c) for x in rows]
            m = sum(rows) / len(rows)
    total, squares = sum(w for w, _ in weighted), sum(w * w for w, _ in weighted)
    mean = sum(w * z for w, z in weighted) / total
    sigma2 = sum(w * (z - mean) ** 2 for w, z in weighted) / (total - squares / total)
    n_eff = total**2 / squares
    return mean, (sigma2 / n_eff) ** 0.5, n_eff


def observe_rows(monitor: VarianceMonitor, rows: list[float]) -> None:
    """One step's rows as two micro-batches (singleton units, t in stratum 0, weight 1)."""
    for half in (rows[:1], rows[1:]):
        monitor.observe(micro_batch(half, list(range(len(half))), [0.01] * len(half), [1.0] * len(half)))


def test_monitor_centres_each_step_on_the_previous_mean_and_pools_with_decay():
    """Two poolings of two steps of three rows each (one stratum: the stratified mean is the weighted mean),
    decay 0.5: V, its SE and its n_eff equal the hand computation, and nothing is pooled between poolings. A
    monitor restored mid-block pools exactly what the first one pools. (Planted: m = the step's own mean (V's
    value does not move with m for singleton units, its SE does); every step of a block summed into one slot;
    the restored position reset to 0: each fails.)"""
    settings = MonitorSettings(every=2, decay=0.5)
    blocks = [[[1.0, 2.0, 4.0], [2.0, 3.5, 3.0]], [[0.5, 1.0, 2.0], [0.0, 1.5, 0.5]]]
    monitor = VarianceMonitor(settings)
    for step, rows in enumerate([rows for block in blocks for rows in block], start=1):
        observe_rows(monitor, rows)
        monitor.on_optimizer_step(step)
        assert (monitor.report is not None) == (step % 2 == 0) and monitor.position == step % 2
        if step == 2:
            value, se, _ = hand_v(blocks[:1], 0.5)
            assert (monitor.report["V"].value, monitor.report["V"].se) == (pytest.approx(value, rel=1e-12),
                                                                           pytest.approx(se, rel=1e-12))
            assert monitor.report["V"].n_eff == 6
            monitor.report = None
        if step == 3:  # mid-block: a resume from here must pool the same
            restored = VarianceMonitor(settings)
            restored.load_state_dict(monitor.state_dict())
    value, se, n_eff = hand_v(blocks, 0.5)
    v = monitor.report["V"]
    assert (v.value, v.se, v.n_eff) == (pytest.approx(value, rel=1e-12), pytest.approx(se, rel=1e-12),
                                        pytest.approx(n_eff, rel=1e-12))
    assert n_eff == pytest.approx(10.8)
    observe_rows(restored, blocks[1][1])
    restored.on_optimizer_step(4)
    assert restored.report["V"].value == pytest.approx(v.value, rel=1e-12)
    assert torch.equal(restored.pooled, monitor.pooled) and restored.previous_mean == monitor.previous_mean


def falling_loss(runs: int, steps: int, units: int, slope: float, seed: int, shared: float = 0.3) -> torch.Tensor:
    """Rows of MIRROR-like units of two rows, L = mu_s + a + b_r with a shared by the unit (variance ``shared``)
    and b per row (variance 1 - shared, skewed): V = 1, Cov within a unit ``shared``. mu_s falls by ``slope`` per
    step. Returns (runs, steps, 2 units) losses."""
    g = torch.Generator().manual_seed(seed)
    mu = 3.0 - slope * torch.arange(steps, dtype=torch.float64)
    common = torch.randn(runs, steps, units, 1, generator=g, dtype=torch.float64) * shared**0.5
    own = (torch.empty(runs, steps, units, 2, dtype=torch.float64).exponential_(generator=g) - 1) * (1 - shared)**0.5
    return (mu[None, :, None, None] + common + own).reshape(runs, steps, 2 * units)


def monitor_v(losses: torch.Tensor, every: int, decay: float) -> ve.Estimate:
    """The monitor's V over one run's (steps, 2 units) rows, units of two rows, rates spread over all strata."""
    monitor = VarianceMonitor(MonitorSettings(every=every, decay=decay))
    units = losses.shape[1] // 2
    t = ((torch.arange(units) + 0.5) / units).tolist()
    for step, rows in enumerate(losses, start=1):
        monitor.observe(micro_batch(rows.tolist(), [u for u in range(units) for _ in (0, 1)], t, [1.0] * units))
        monitor.on_optimizer_step(step)
    return ve.decomposition(monitor.quantities())["V"]


def pooled_raw_v(losses: torch.Tensor, every: int, decay: float) -> float:
    """The estimator before issue 26: sums of L and L^2 over all rows, decayed at each pooling,
    V = E[L^2] - E[L]^2."""
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(losses), every):
        block = losses[start:start + every].reshape(-1)
        sums = decay * sums + torch.stack([torch.tensor(float(len(block)), dtype=torch.float64), block.sum(),
                                           (block**2).sum()])
    mean = sums[1] / sums[0]
    return float(sums[2] / sums[0] - mean**2)


def test_v_is_unbiased_while_the_loss_falls_and_pooled_raw_sums_are_not():
    """A loss falling by r = 0.008 per step over 200 steps, pooled every 50 steps with half-life 200 (decay
    0.84), MIRROR-like units of two rows with covariance 0.3: the raw sums add the weighted variance of the step
    means, r^2 Var_w(step) ~ 0.2 here, to V = 1. Over 16 runs the monitor's mean is within 4.5 standard errors
    of 1 (SE about 0.011), the raw sums' is not. (Planted: the centring c left out, so that V's items carry the
    noise of m, the previous step's mean (+0.08), fails it.)"""
    losses = falling_loss(runs=16, steps=200, units=8, slope=0.008, seed=1)
    decay = 0.5 ** (50 / 200)
    new = torch.tensor([monitor_v(run, 50, decay).value for run in losses])
    old = torch.tensor([pooled_raw_v(run, 50, decay) for run in losses])
    for values, unbiased in ((new, True), (old, False)):
        error = float(values.mean()) - 1.0
        se = float(values.std()) / len(values) ** 0.5
        assert (abs(error) <= Z * se) is unbiased, (error, se)
    assert float(old.mean()) - 1.0 > 0.1  # the drift's share, not a fluctuation


@pytest.mark.parametrize("mirror_on", [False, True])
def test_mirror_auto_switches_only_past_the_margin(mirror_on):
    """The gain with standard error 2.5: the margin is SWITCH_Z x 2.5 = 5: a gain of exactly 5 keeps the setting,
    5.125 switches MIRROR on, -5.125 off; an exact gain switches at any sign; fewer than 8 effective pair (or,
    under SyRM, partner) items keep the setting whatever the gain; a NaN gain keeps it."""
    monitor = VarianceMonitor(MonitorSettings(mirror_auto=True))
    monitor.mirror_on = mirror_on

    def report(gain, se=2.5, pairs=8.0, partners=float("inf")):
        return {"gain": ve.Estimate(gain, se), "cov_pair": ve.Estimate(-gain, se, pairs),
                "cov_syrm": ve.Estimate(0.0, 0.0, partners)}

    assert monitor._decide(report(5.0)) is mirror_on
    assert monitor._decide(report(5.125)) is True
    assert monitor._decide(report(-5.125)) is False
    assert monitor._decide(report(0.5, se=0.0)) is True and monitor._decide(report(-0.5, se=0.0)) is False
    assert monitor._decide(report(0.0, se=0.0)) is mirror_on
    assert monitor._decide(report(100.0, pairs=7.9)) is mirror_on
    assert monitor._decide(report(100.0, partners=7.9)) is mirror_on
    assert monitor._decide(report(float("nan"))) is mirror_on and monitor._decide(report(9.0, float("nan"))) is \
        mirror_on


def test_monitor_logs_every_estimate_with_its_interval_and_decides_at_poolings():
    """At a pooling the log holds each estimate with its 95% interval (``_lo``, ``_hi``: value -+ 1.96 SE), the
    effective pairs and, under ``masks: auto``, the setting; nothing between poolings. A decision calls ``switch``
    with the rule's numbers and is replayed quietly on restore; the console shows ``X=value [lo, hi]``."""
    from mdm_scale.training.metrics import _console_items

    switched = []
    monitor = VarianceMonitor(MonitorSettings(every=2, mirror_auto=True),
                              switch=lambda on, step, why: switched.append((on, step, why[:27])))
    assert monitor.log(0, True) == {}
    g = torch.Generator().manual_seed(0)
    for step in range(1, 5):
        base = torch.randn(32, generator=g, dtype=torch.float64)  # MIRROR pairs with covariance -1: it pays
        rows = torch.stack([base, -base + 0.1 * torch.randn(32, generator=g, dtype=torch.float64)], 1).reshape(-1)
        monitor.observe(micro_batch(rows.tolist(), [b for b in range(32) for _ in (0, 1)],
                                    ((torch.arange(32) + 0.5) / 32).tolist(), [1.0] * 32))
        monitor.on_optimizer_step(step)
        logged = monitor.log(step, True)
        if step % 2:
            assert logged == {}
            continue
        expected = {f"{name}{end}" for name in online_variance.LOGGED_ESTIMATES for end in ("", "_lo", "_hi")}
        assert set(logged) == expected | {"pairs", "mirror"}
        assert logged["V_hi"] - logged["V"] == pytest.approx(logged["V"] - logged["V_lo"])
        assert logged["gain_lo"] > 0 and logged["mirror"] == 1.0 and logged["pairs"] == 32 * step
    assert monitor.decisions == [(2, True)] and switched == [(True, 2, "gain -(cov_pair + cov_syrm)")]
    replayed = []
    restored = VarianceMonitor(MonitorSettings(every=2, mirror_auto=True),
                               switch=lambda on, step, why: replayed.append((on, step, why)))
    restored.load_state_dict(monitor.state_dict())
    assert restored.mirror_on and replayed == [(True, 2, "")]
    line = " ".join(_console_items({"V": 1.0, "V_lo": 0.5, "V_hi": 1.5, "mirror": 1.0}))
    assert line == "V=1 [0.5, 1.5] mirror=1"


def test_a_checkpoint_of_the_old_estimators_keeps_its_decisions_and_starts_the_sums_empty():
    """A monitor state written before issue 26 (raw sums of 14 columns) resumes with its decisions replayed and
    empty statistics, on its own rank as after a change of the world size."""
    old = {"statistics": torch.ones(14, dtype=torch.float64), "pending": torch.ones(14, dtype=torch.float64),
           "mirror_on": True, "decisions": [(4, True)]}
    for load in (lambda m: m.load_state_dict(old), lambda m: m.load_rank_states([old, old], old)):
        replayed: list[tuple[bool, int]] = []
        monitor = VarianceMonitor(MonitorSettings(every=2, mirror_auto=True),
                                  switch=lambda on, step, why, seen=replayed: seen.append((on, step)))
        load(monitor)
        assert monitor.mirror_on and monitor.decisions == [(4, True)] and replayed == [(True, 4)]
        assert not monitor.pooled.any() and not monitor.pending.host().any() and monitor.position == 0


def test_monitor_settings_follow_the_variance_config():
    """The monitor runs on its own cadence (``variance.monitor``), not P-POTS's: a refit interval of 7 under P-POTS
    leaves it at 10; SyRM's coupling makes its units pairs of sequences."""
    cfg = load_config(None, ["variance.masks=auto", "variance.monitor.every=10", "variance.monitor.half_life=20",
                             "variance.probe.every=4", "variance.probe.fraction=0.25", "train.micro_batch_size=4",
                             "variance.t_sampler={name: ppots, refit_every: 7, half_life: 5}",
                             "variance.t_coupling=symmetric"])
    assert MonitorSettings.from_config(cfg.variance) == MonitorSettings(
        every=10, decay=0.5**0.5, probe_every=4, probe_fraction=0.25, mirror_auto=True, syrm=True)
    assert not MonitorSettings.from_config(load_config(None, []).variance).mirror_auto


def test_online_estimates_agree_with_the_variance_tool_on_the_same_checkpoint(synth_dir, tmp_path, dist_env):
    """Train with learning rate ~0 (weights fixed at the checkpoint's), pool the online statistics over all
    steps without decay, and compare with ``mdm-scale variance`` (method standard) on the saved checkpoint."""
    from mdm_scale.variance.runner import ToolSettings, run_variance

    steps = 30
    overrides = tiny_overrides(synth_dir, tmp_path / "run", **{
        "train.lr": 1e-30, "train.weight_decay": 0.0, "train.max_steps": steps, "train.micro_batch_size": 8,
        "train.zero_stage": 0, "train.eval_samples": 8,
        "train.log_every": steps, "variance.eps": 0.1, "variance.probe": {"every": 1, "fraction": 1.0},
        "variance.monitor": {"every": steps, "half_life": 0.0}, "logging.tensorboard": False})
    cfg = load_config(["configs/quickstart.yaml"], overrides)
    trainer = Trainer(cfg, dist_env)
    summary = trainer.fit()
    online = ve.decomposition(trainer.service(VarianceMonitor).quantities())
    assert online["V"].n_eff == steps * 8 and online["cov_mask"].n_eff == steps * 8
    report = run_variance(cfg, ToolSettings(methods=["standard"], num_x0=48, num_t=3, num_masks=2, grad_dim=0),
                          tmp_path / "tool" / "report.json", checkpoint=summary["checkpoint"], env=dist_env)
    tool = report["methods"]["standard"]["loss"]

    def tool_se(term):
        lo, hi = tool[f"{term}_ci95"]
        return (hi - lo) / (2 * 1.959964)

    for term, name in (("A", "A"), ("total", "V"), ("C", "C")):
        error = (online[name].se ** 2 + tool_se(term) ** 2) ** 0.5
        assert abs(online[name].value - tool[term]) <= Z * error, (term, online[name], tool[term], error)


def test_mirror_auto_can_switch_only_at_the_steps_it_names():
    """The trainer corrupts the next step's first micro-batch early except after the steps at which
    ``changes_after`` is true; a decision at any other step would train on a stale micro-batch."""
    auto = VarianceMonitor(MonitorSettings(every=5, mirror_auto=True))
    assert [s for s in range(1, 16) if auto.changes_after(s)] == [5, 10, 15]
    assert not any(VarianceMonitor(MonitorSettings(every=5)).changes_after(s) for s in range(1, 16))
    for step in range(1, 16):  # estimates (and so decisions) come from on_optimizer_step only where changes_after
        observe_rows(auto, [1.0, 2.0, 4.0])
        auto.on_optimizer_step(step)
        assert (auto.report is not None) == auto.changes_after(step)
        auto.report = None


def test_loss_and_gradient_stay_unbiased_through_mirror_switches():
    """The trainer's own switch (``Trainer._set_mirror``) toggles MIRROR every few steps; the mean step loss and
    gradient over the run equal the exact uniform objective and its gradient."""
    cfg = load_config(None, [f"variance.eps={EPS}", "seed=3", "variance.masks=auto", "train.micro_batch_size=8"])
    model = AnalyticMDM()
    host = SimpleNamespace(cfg=cfg, loader=analytic_loader(micro=8),
                           objective=MDMObjective(UniformT(3), masks_for(cfg.variance, 3), MASK))
    losses, grads, seen = [], [], []
    for step in range(1500):
        if step % 7 == 0:
            Trainer._set_mirror(host, on=(step // 7) % 2 == 1, from_step=step)
        batch = host.loader.micro_batch_at(step, 0)
        seen += batch.sample_index.tolist()
        model.zero_grad()
        out = model(**host.objective.corrupt(batch).model_inputs())
        out.loss.backward()
        losses.append(float(out.loss))
        grads.append(model.weight.grad.reshape(-1).clone().numpy())
    assert seen == list(range(len(seen)))  # consecutive, never reused, through every switch
    t = midpoints(0.0, 1.0, 1000)
    exact = moments(model, eligible_tokens(), t, EPS)
    exact_loss, exact_grad = exact.f.mean(), exact.g.mean((0, 1))
    losses, grads = np.array(losses), np.array(grads)
    n = len(losses)
    assert abs(losses.mean() - exact_loss) <= Z * losses.std(ddof=1) / n**0.5, (losses.mean(), exact_loss)
    grad_se = grads.std(0, ddof=1) / n**0.5
    assert np.all(np.abs(grads.mean(0) - exact_grad) <= Z * grad_se + 1e-12), (grads.mean(0), exact_grad)


def test_mirror_auto_run_logs_decisions_and_resumes_exactly(synth_dir, tmp_path, dist_env, monkeypatch):
    """Decisions are forced to alternate at every refit (every 2 steps) so that the run crosses switches."""
    monkeypatch.setattr(VarianceMonitor, "_decide", lambda self, report: not self.mirror_on)
    common = {"variance.masks": "auto", "variance.monitor.every": 2, "variance.probe": {"every": 1, "fraction": 0.5},
              "train.max_steps": 7, "train.grad_accum": 2,
              "train.zero_stage": 0, "train.eval_samples": 8}
    straight = Trainer(load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "a", **common)),
                       dist_env)
    summary = straight.fit()
    assert straight.service(VarianceMonitor).decisions == [(2, True), (4, False), (6, True)]
    assert [straight.loader._span(s)[1] for s in (1, 2, 3, 4, 6)] == [4, 2, 2, 4, 2]  # sequences per micro-batch
    tb = summary["tensorboard_dir"]
    assert read_scalars(tb, "variance/mirror") == {2: 1.0, 4: 0.0, 6: 1.0}
    assert set(read_scalars(tb, "variance/A")) == {2, 4, 6}

    split_cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "b", **common))
    interrupted = Trainer(split_cfg, dist_env)
    for _ in range(5):  # past the switches at steps 2 and 4
        interrupted.train_step()
    interrupted.save()
    resumed = Trainer(split_cfg, dist_env)
    assert resumed.service(VarianceMonitor).decisions == [(2, True), (4, False)]
    assert resumed.objective.masks.__class__.__name__ == "BernoulliMasks"
    resumed_summary = resumed.fit()
    a, b = read_scalars(tb, "train/loss"), read_scalars(resumed_summary["tensorboard_dir"], "train/loss")
    for step in (6, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_probe_keeps_the_attention_mask_of_the_selected_sequences():
    ids = torch.arange(12).view(3, 4)
    attention = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    batch = Batch(ids, attention.clone(), torch.arange(3), attention)
    keep = torch.tensor([True, False, True])
    chosen = online_variance.select_sequences(batch, keep)
    assert torch.equal(chosen.input_ids, ids[keep]) and torch.equal(chosen.sample_index, torch.tensor([0, 2]))
    assert torch.equal(chosen.attention_mask, attention[keep]) and torch.equal(chosen.loss_mask, attention[keep])
    assert online_variance.select_sequences(Batch(ids, attention, torch.arange(3), None), keep).attention_mask is None


def test_probe_rows_share_the_training_t_and_fall_back_to_one_uncounted_sequence():
    """The base pair and the independent mask use the training t (Stream.T), the third row an independent rate.
    With nothing selected, the first sequence is forwarded and not counted."""
    cfg = load_config(None, [f"variance.eps={EPS}", "seed=3"])
    objective = MDMObjective(UniformT(3), masks_for(cfg.variance, 3), MASK)
    batch = analytic_loader(micro=4).micro_batch_at(0, 0)
    probes = [Probe(objective, masks_for(cfg.variance, 3, MirrorMasksConfig()), masks_for(cfg.variance, 3), 3,
                    fraction) for fraction in (1.0, 0.0)]
    rows, counted = probes[0].rows(batch)
    training_t = objective.corrupt(batch).t
    assert counted == 4 and torch.equal(rows.t[:4], training_t) and torch.equal(rows.t[4:8], training_t)
    assert not torch.isclose(rows.t[8:], training_t).any()
    rows, counted = probes[1].rows(batch)
    assert counted == 0 and len(rows.t) == 3 and torch.equal(rows.t[:2], training_t[:1].repeat(2))


@pytest.mark.parametrize("items, message", [
    (["variance.masks=auto", "train.micro_batch_size=5"], r"'train.micro_batch_size' = 5: .*must be even"),
    (["variance.masks=auto", "variance.t_coupling=stratified"], r"'variance.t_coupling' = 'stratified'"),
    (["variance.masks=auto", "variance.probe.every=0"], r"'variance.probe.every' = \(0, 0.0625\)"),
    (["variance.masks=auto", "variance.monitor.every=0"], r"'variance.monitor.every' = 0: variance.masks = auto"),
    (["variance.masks=auto", "data.packing=true"], r"'variance.masks' = 'auto': .*packed rows"),
    (["variance.masks=auto", "variance.t_coupling=symmetric", "train.micro_batch_size=6"],
     r"'train.micro_batch_size' = 6: variance.masks = auto with SyRM .*divisible by 4"),
    (["variance.masks=sometimes"], r"'variance.masks.name' = 'sometimes': choose one of \['bernoulli', 'mirror', "
                                   r"'auto'"),
    (["variance.probe.fraction=2"], r"'variance.probe.fraction' = 2.0: must be in \[0, 1\]"),
])
def test_bad_online_variance_settings_name_the_key(items, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, items)


@pytest.mark.distributed
def test_two_ranks_pool_the_same_statistics_as_one_rank(synth_dir, tmp_path, dist_env):
    """2 ZeRO-3 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the same samples, noise and probe
    selection (all keyed by stream position), so the all-reduced estimates and ``mirror: auto``'s settings agree."""
    from conftest import final_summary, run_deepspeed

    common = {"variance.masks": "auto", "variance.monitor.every": 3, "variance.probe": {"every": 1, "fraction": 0.5},
              "train.max_steps": 9}
    args = ["train", "--config", "configs/quickstart.yaml"]
    for item in tiny_overrides(synth_dir, tmp_path / "two", **common):
        args += ["--set", item]
    proc = run_deepspeed(args, ranks=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    two = final_summary(proc.stdout)["tensorboard_dir"]
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "one", **common,
                                                                  **{"train.grad_accum": 2}))
    one = Trainer(cfg, dist_env).fit()["tensorboard_dir"]
    assert read_scalars(one, "variance/mirror") == read_scalars(two, "variance/mirror")
    for tag in ("variance/V", "variance/A", "variance/pair_half_sq"):
        a, b = read_scalars(one, tag), read_scalars(two, tag)
        assert sorted(a) == [3, 6, 9]
        assert a[3] == pytest.approx(b[3], rel=1e-3), tag  # weights differ by float summation order only


@pytest.mark.parametrize("mirror", [False, True])
def test_gradient_norm_proxy_brackets_the_true_logit_gradient_norm(mirror):
    """``sample_grad_norms`` (``ppots_target: grad``): with 1 - p_y in place of ||softmax - onehot||, the proxy
    is at most the norm of the autograd gradient of each sequence's loss w.r.t. its logits, and at least
    1/sqrt(2) of it."""
    cfg = load_config(None, ["variance.eps=0.05", "seed=4"])
    kind = MirrorMasksConfig() if mirror else BernoulliMasksConfig()
    objective = MDMObjective(UniformT(4), masks_for(cfg.variance, 4, kind), MASK)
    noisy = objective.corrupt(analytic_loader(micro=8).micro_batch_at(0, 0))
    logits = torch.randn(noisy.masked_tokens, VOCAB, generator=torch.Generator().manual_seed(0), requires_grad=True)
    token_ce = torch.nn.functional.cross_entropy(logits, noisy.loss_targets, reduction="none")
    losses = noisy.sample_losses(noisy.row_losses(token_ce))
    proxy = noisy.sample_grad_norms(token_ce.detach())
    for b in range(len(losses)):
        (grad,) = torch.autograd.grad(losses[b], logits, retain_graph=True)
        true = float(grad.norm())
        assert float(proxy[b]) <= true * (1 + 1e-5) + 1e-7 and true <= 2**0.5 * float(proxy[b]) * (1 + 1e-5) + 1e-7
    assert bool((proxy > 0).any())
