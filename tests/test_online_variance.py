"""Online A/B/C (``diffusion/online_variance.py``) and ``variance.masks: auto``.

1. On the analytic model of ``analytic_mdm.py`` (A, B, C, V and MIRROR's pair statistic known exactly by
   enumerating masks), the probe and training-row estimators recover the exact values within 4.5 of their own
   standard errors.
2. On a real (tiny) model, the online estimates pooled during training agree with ``mdm-scale variance`` on the
   checkpoint of the same weights (learning rate ~0 keeps them fixed), within 4.5 combined standard errors.
3. Through ``mirror: auto``'s switches the per-step loss and its gradient stay unbiased for the uniform
   objective (exact values of the analytic model), and the stream positions stay consecutive and disjoint.
4. A tiny ``masks: auto`` run logs its decisions and resumes exactly across a switch.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analytic_mdm import MASK, PAD, SFT_ROWS, VOCAB, AnalyticMDM, eligible_tokens, exact_abc, midpoints, moments
from conftest import read_scalars, tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError
from mdm_scale.config.variance import BernoulliMasksConfig, MirrorMasksConfig
from mdm_scale.core.batch import Batch
from mdm_scale.data.dataset import TokenizedData
from mdm_scale.data.loader import TrainLoader
from mdm_scale.diffusion import online_variance
from mdm_scale.diffusion.build import masks_for
from mdm_scale.diffusion.objective import MDMObjective
from mdm_scale.diffusion.online_variance import Probe, VarianceMonitor, estimates, training_statistics
from mdm_scale.diffusion.t_samplers import UniformT
from mdm_scale.training.trainer import Trainer

Z = 4.5
EPS = 0.05


def analytic_loader(micro: int, seed: int = 5) -> TrainLoader:
    """The training stream over the analytic model's SFT rows (x0 uniform over them, epoch by epoch)."""
    rows = [prompt + response for prompt, response in SFT_ROWS]
    data = TokenizedData(np.concatenate(rows), np.cumsum([0, *map(len, rows)]),
                         np.array([len(prompt) for prompt, _ in SFT_ROWS]))
    return TrainLoader(data, seed, 0, 1, micro, 1, pad_id=PAD, pad_to_multiple_of=1, seq_len=16)


def exact_values(model: AnalyticMDM) -> dict:
    t = midpoints(0.0, 1.0, 1000)
    single = moments(model, eligible_tokens(), t, EPS, gradient=False)
    paired = moments(model, eligible_tokens(), t, EPS, mirror=True, gradient=False)
    abc = exact_abc(single)
    # MIRROR's pair mean has mask variance (A + K) / 2 per (x0, t), so A - K = 2 A - 2 a_pair.
    pair_mask_variance = (paired.s - paired.f**2).mean()
    return {**abc, "V": abc["total"], "A+B": abc["A"] + abc["B"], "pair_half_sq": 2 * abc["A"] - 2 * pair_mask_variance}


def test_online_estimators_recover_exact_values_on_a_known_model():
    """Every online term within 4.5 of its standard error of the exact value. On this model A dominates
    (A 3.57, B 0.15, C 0.01, pair statistic 4.72): the test resolves A, V and the pair statistic (a missing 1/2
    fails it), while B and C lie below its resolution and are checked only for consistency."""
    cfg = load_config(None, [f"variance.eps={EPS}", "seed=3"])
    model = AnalyticMDM()
    objective = MDMObjective(UniformT(3), masks_for(cfg.variance, 3), MASK)
    probe = Probe(objective, masks_for(cfg.variance, 3, MirrorMasksConfig()), masks_for(cfg.variance, 3), 3,
                  fraction=1.0)
    loader = analytic_loader(micro=16)
    total = torch.zeros(online_variance.COLUMNS, dtype=torch.float64)
    with torch.no_grad():
        for step in range(150):
            batch = loader.micro_batch_at(step, 0)
            rows, counted = probe.rows(batch)
            total += Probe.statistics(rows, model(**rows.model_inputs()).token_ce.float(), counted)
            noisy = objective.corrupt(batch)
            row_loss = noisy.row_losses(model(**noisy.model_inputs()).token_ce.float())
            total += training_statistics(noisy, row_loss, noisy.pair_sq_diff(row_loss))
    r, exact = estimates(total), exact_values(model)
    se = {"A": r["A_se"], "A+B": r["A+B_se"], "V": r["V_se"], "pair_half_sq": r["pair_half_sq_se"],
          "C": (r["V_se"] ** 2 + r["A+B_se"] ** 2) ** 0.5, "B": (r["A_se"] ** 2 + r["A+B_se"] ** 2) ** 0.5}
    assert r["probes"] == 150 * 16 and r["rows"] == 150 * 16
    for term, error in se.items():
        assert abs(r[term] - exact[term]) <= Z * error, (term, r[term], exact[term], error)
    # K < 0 (antithetic masks): the pair statistic is not A, by more than this test resolves.
    assert exact["pair_half_sq"] - exact["A"] > Z * se["pair_half_sq"], (exact["pair_half_sq"], exact["A"])
    assert r["A_share"] + r["B_share"] + r["C_share"] == pytest.approx(1.0)


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
    online = estimates(trainer.service(VarianceMonitor).statistics)
    assert online["rows"] == steps * 8 and online["probes"] == steps * 8
    report = run_variance(cfg, ToolSettings(methods=["standard"], num_x0=48, num_t=3, num_masks=2, grad_dim=0),
                          tmp_path / "tool" / "report.json", checkpoint=summary["checkpoint"], env=dist_env)
    tool = report["methods"]["standard"]["loss"]

    def tool_se(term):
        lo, hi = tool[f"{term}_ci95"]
        return (hi - lo) / (2 * 1.959964)

    pairs = {"A": ("A", online["A_se"]), "total": ("V", online["V_se"]),
             "C": ("C", (online["V_se"] ** 2 + online["A+B_se"] ** 2) ** 0.5)}
    for term, (name, se) in pairs.items():
        error = (se**2 + tool_se(term) ** 2) ** 0.5
        assert abs(online[name] - tool[term]) <= Z * error, (term, online[name], tool[term], error)


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


def pooled_sums(rows: list[float], mask: list[float], rate: list[float], pair: list[float]) -> torch.Tensor:
    """The statistics columns of given training-row losses and half squared differences, summed by hand."""
    stats = torch.zeros(online_variance.COLUMNS, dtype=torch.float64)
    loss = torch.tensor(rows, dtype=torch.float64)
    stats[online_variance.ROWS] = len(rows)
    for power, column in enumerate((online_variance.SUM_L, online_variance.SUM_L2, online_variance.SUM_L3,
                                    online_variance.SUM_L4), start=1):
        stats[column] = (loss**power).sum()
    for half, columns in ((mask, (online_variance.MASK_N, online_variance.MASK_SUM, online_variance.MASK_SQ)),
                          (rate, (online_variance.RATE_N, online_variance.RATE_SUM, online_variance.RATE_SQ)),
                          (pair, (online_variance.PAIR_N, online_variance.PAIR_SUM, online_variance.PAIR_SQ))):
        h = torch.tensor(half, dtype=torch.float64)
        stats[columns[0]], stats[columns[1]], stats[columns[2]] = len(half), h.sum(), (h * h).sum()
    return stats


def test_estimates_from_pooled_sums_equal_the_sample_formulas():
    """V is the (1/n) sample variance of the rows with the delta-method SE sqrt((mu4 - V^2) / n); A, A + B and
    the pair statistic are means of their half squared differences with SE sd / sqrt(n); B and C are the
    differences. Columns without data, or a single row, give NaN; one difference gives SE 0."""
    rows, mask, rate = [1.0, 2.0, 4.0, 7.0], [0.5, 1.0, 2.0], [1.0, 2.5]
    r = estimates(pooled_sums(rows, mask, rate, [0.8]))
    loss = np.array(rows)
    v = loss.var()
    assert r["V"] == pytest.approx(v, rel=1e-12)
    assert r["V_se"] == pytest.approx(np.sqrt((np.mean((loss - loss.mean()) ** 4) - v * v) / 4), rel=1e-12)
    for key, half in (("A", mask), ("A+B", rate)):
        assert r[key] == pytest.approx(np.mean(half), rel=1e-12)
        assert r[f"{key}_se"] == pytest.approx(np.std(half) / np.sqrt(len(half)), rel=1e-12)
    assert (r["pair_half_sq"], r["pair_half_sq_se"]) == (pytest.approx(0.8), 0.0)
    assert r["B"] == pytest.approx(np.mean(rate) - np.mean(mask), rel=1e-12)
    assert r["C"] == pytest.approx(v - np.mean(rate), rel=1e-12)
    assert r["C_share"] == pytest.approx(r["C"] / v, rel=1e-12)
    assert (r["rows"], r["probes"], r["pairs"]) == (4, 3, 1)
    two = estimates(pooled_sums([1.0, 3.0], [0.5], [], []))
    assert two["V"] == 1.0 and two["V_se"] == 0.0 and two["A_share"] == 0.5
    assert np.isnan([two["A+B"], two["A+B_se"], two["pair_half_sq"], two["pair_half_sq_se"], two["B"]]).all()
    assert np.isnan(estimates(pooled_sums([2.0, 2.0], [1.0], [], []))["A_share"])  # V = 0: no shares
    one = estimates(pooled_sums([5.0], [1.0], [], []))
    assert np.isnan([one["V"], one["V_se"], one["A_share"]]).all()


def test_monitor_pools_at_refits_decides_with_a_margin_and_restores():
    """Refit every 2 steps with decay 0.5; probe steps are multiples of probe_every. ``mirror: auto`` keeps its
    setting below MIN_PROBES pairs, switches on when the pair statistic clearly exceeds V, and records the step;
    the state round-trips without sharing tensors with the checkpoint."""
    settings = online_variance.MonitorSettings(every=2, decay=0.5, probe_every=3, probe_fraction=0.5,
                                               mirror_auto=True)
    switched = []
    monitor = VarianceMonitor(settings, switch=lambda on, step, why: switched.append((on, step, why[:14])))
    assert monitor.log(0, True) == {}  # nothing to log before the first refit
    assert [monitor.probe_step(step) for step in range(4)] == [True, False, False, True]
    for every, fraction, expected in ((1, 0.5, True), (0, 0.5, False), (3, 0.0, False)):
        other = online_variance.MonitorSettings(probe_every=every, probe_fraction=fraction)
        assert VarianceMonitor(other).probe_step(1 if every == 1 else 0) is expected
    fresh = VarianceMonitor(settings).state_dict()["pending"]
    assert fresh.dtype == torch.float64 and not fresh.any() and len(fresh) == online_variance.COLUMNS
    rows, pairs = [1.0, 2.0] * 4, [5.0, 6.0] * 4  # V = 0.25, pair statistic 5.5: MIRROR pays
    monitor.sums.add(pooled_sums(rows[:4], [], [], pairs[:3]))
    monitor.sums.add(pooled_sums(rows[4:], [], [], pairs[3:7]))
    assert torch.equal(monitor.state_dict()["pending"], pooled_sums(rows, [], [], pairs[:7]))
    monitor.on_optimizer_step(1)  # not a refit step
    assert monitor.report is None
    monitor.on_optimizer_step(2)  # 8 rows but 7 pairs < MIN_PROBES: keep off
    assert (monitor.report["rows"], monitor.report["pairs"], monitor.report["mirror"]) == (8, 7, 0.0)
    assert set(monitor.log(2, False)) == set(online_variance.LOGGED_ESTIMATES) and monitor.log(3, True) == {}
    first = monitor.statistics.clone()
    monitor.sums.add(pooled_sums(rows, [], [], pairs))
    monitor.on_optimizer_step(4)
    assert torch.allclose(monitor.statistics, 0.5 * first + pooled_sums(rows, [], [], pairs))
    assert monitor.decisions == [(4, True)] and monitor.mirror_on and monitor.log(4, True)["mirror"] == 1.0
    assert switched == [(True, 4, "E[(L1-L2)^2]/2")]
    monitor.on_optimizer_step(6)  # nothing new (no observe): the setting stays
    assert monitor.decisions == [(4, True)] and len(switched) == 1
    every_step = VarianceMonitor(online_variance.MonitorSettings(every=1))
    every_step.on_optimizer_step(1)
    assert every_step.report is not None and every_step.sums.pending.dtype == torch.float64  # float64 sums
    state = monitor.state_dict()
    replayed = []
    restored = VarianceMonitor(settings, switch=lambda on, step, why: replayed.append((on, step, why)))
    restored.load_state_dict(state)
    assert torch.equal(restored.statistics, monitor.statistics) and restored.mirror_on
    assert restored.decisions == [(4, True)] and replayed == [(True, 4, "")]  # the resume replays, quietly
    restored.sums.add(pooled_sums(rows, [], [], []))
    assert torch.equal(state["pending"], torch.zeros(online_variance.COLUMNS, dtype=torch.float64))
    restored.sums.add(pooled_sums(rows, [], [], []).to("meta"))  # a host checkpoint resumed on an accelerator
    assert restored.sums.pending.device.type == "meta"


def test_monitor_settings_follow_the_variance_config():
    """The monitor runs on its own cadence (``variance.monitor``), not P-POTS's: a refit interval of 7 under P-POTS
    leaves it at 10."""
    cfg = load_config(None, ["variance.masks=auto", "variance.monitor.every=10", "variance.monitor.half_life=20",
                             "variance.probe.every=4", "variance.probe.fraction=0.25", "train.micro_batch_size=4",
                             "variance.t_sampler={name: ppots, refit_every: 7, half_life: 5}"])
    assert online_variance.MonitorSettings.from_config(cfg.variance) == online_variance.MonitorSettings(
        every=10, decay=0.5**0.5, probe_every=4, probe_fraction=0.25, mirror_auto=True)
    assert not online_variance.MonitorSettings.from_config(load_config(None, []).variance).mirror_auto


@pytest.mark.parametrize("mirror_on", [False, True])
def test_mirror_auto_switches_only_past_the_margin(mirror_on):
    """With standard errors 1.5 and 2 (combined 2.5) the margin is SWITCH_Z x 2.5 = 5: a gap of exactly 5 keeps
    the setting, 5.125 switches MIRROR on; with exact statistics any positive gap switches it on."""
    monitor = VarianceMonitor(online_variance.MonitorSettings(mirror_auto=True))
    monitor.mirror_on = mirror_on
    r = {"pairs": 8, "rows": 8, "pair_half_sq": 5.5, "V": 0.5, "pair_half_sq_se": 1.5, "V_se": 2.0}
    assert monitor._decide(r) is mirror_on
    assert monitor._decide({**r, "pair_half_sq": 5.625}) is True
    assert monitor._decide({**r, "pair_half_sq": -4.625}) is False
    assert monitor._decide({**r, "pair_half_sq": 1.0, "pair_half_sq_se": 0.0, "V_se": 0.0}) is True
    assert monitor._decide({**r, "pair_half_sq": 0.0, "pair_half_sq_se": 0.0, "V_se": 0.0}) is False
    assert monitor._decide({**r, "pairs": 7, "pair_half_sq": 100.0}) is mirror_on
    assert monitor._decide({**r, "rows": 7, "pair_half_sq": 100.0}) is mirror_on


def test_probe_keeps_the_attention_mask_of_the_selected_sequences():
    ids = torch.arange(12).view(3, 4)
    attention = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    batch = Batch(ids, attention.clone(), torch.arange(3), attention)
    keep = torch.tensor([True, False, True])
    chosen = online_variance.select_sequences(batch, keep)
    assert torch.equal(chosen.input_ids, ids[keep]) and torch.equal(chosen.sample_index, torch.tensor([0, 2]))
    assert torch.equal(chosen.attention_mask, attention[keep]) and torch.equal(chosen.loss_mask, attention[keep])
    assert online_variance.select_sequences(Batch(ids, attention, torch.arange(3), None), keep).attention_mask is None


def test_training_statistics_weight_rows_and_pairs_and_skip_non_finite_ones():
    """Weights (2, 0.5) per sequence, rows (1, 3 | NaN): weighted losses 2 and 6 count, the NaN row does not.
    The pair difference 4 of sequence 0 becomes w^2 * 4 / 2 = 8; sequence 1 has no pair (NaN)."""
    noisy = SimpleNamespace(weight=torch.tensor([2.0, 0.5]), row_sample=torch.tensor([0, 0, 1]))
    out = training_statistics(noisy, torch.tensor([1.0, 3.0, float("nan")]), torch.tensor([4.0, float("nan")]))
    assert out.dtype == torch.float64
    expected = {online_variance.ROWS: 2, online_variance.SUM_L: 8, online_variance.SUM_L2: 40,
                online_variance.SUM_L3: 224, online_variance.SUM_L4: 1312, online_variance.PAIR_N: 1,
                online_variance.PAIR_SUM: 8, online_variance.PAIR_SQ: 64}
    assert out.tolist() == [expected.get(column, 0) for column in range(online_variance.COLUMNS)]
    assert not training_statistics(noisy, torch.tensor([1.0, 3.0, 2.0]), None)[online_variance.PAIR_N:].any()


def test_probe_statistics_weight_each_row_by_its_own_sequence():
    """Two probed sequences: rows (base, antithetic) x 2, then the independent-mask and independent-rate rows,
    with per-sequence weights; the half squared differences are summed by hand. Nothing counted: zeros."""
    noisy = SimpleNamespace(t=torch.zeros(6), weight=torch.tensor([2.0, 0.5, 1.0, 1.0, 3.0, 1.0]),
                            row_sample=torch.tensor([0, 0, 1, 1, 2, 3, 4, 5]), row_losses=lambda ce: ce)
    ce = torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0, 7.0, 1.0, 2.0])  # weighted: base (2, 1.5), anti (4, 2.5),
    out = Probe.statistics(noisy, ce, counted=1)                  # other mask (4, 7), other rate (3, 2)
    assert out.dtype == torch.float64
    expected = {online_variance.MASK_N: 2, online_variance.MASK_SUM: 17.125, online_variance.MASK_SQ: 232.765625,
                online_variance.RATE_N: 2, online_variance.RATE_SUM: 0.625, online_variance.RATE_SQ: 0.265625,
                online_variance.PAIR_N: 2, online_variance.PAIR_SUM: 2.5, online_variance.PAIR_SQ: 4.25}
    assert out.tolist() == [expected.get(column, 0) for column in range(online_variance.COLUMNS)]
    assert not Probe.statistics(noisy, ce, counted=0).any()


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


def test_mirror_auto_can_switch_only_at_the_steps_it_names():
    """The trainer corrupts the next step's first micro-batch early except after the steps at which
    ``changes_after`` is true; a decision at any other step would train on a stale micro-batch."""
    from mdm_scale.diffusion.online_variance import MonitorSettings

    auto = VarianceMonitor(MonitorSettings(every=5, mirror_auto=True))
    assert [s for s in range(1, 16) if auto.changes_after(s)] == [5, 10, 15]
    assert not any(VarianceMonitor(MonitorSettings(every=5)).changes_after(s) for s in range(1, 16))
    for step in range(1, 16):  # a decision comes from on_optimizer_step only where changes_after said so
        auto.sums.add(torch.ones(online_variance.COLUMNS, dtype=torch.float64))
        auto.on_optimizer_step(step)
        assert (auto.report is not None) == auto.changes_after(step)
        auto.report = None
