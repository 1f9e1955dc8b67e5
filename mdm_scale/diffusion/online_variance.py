"""Online A/B/C: where the training loss's noise comes from, measured while training (docs/spec.md
sections 2 and 2.2), and the ``variance.masks: auto`` rule that acts on it.

One row is one forward of one sequence x0 with one mask; its weighted loss is L = w(t) l(x0, t, M) (w = 1/p(t)
under P-POTS, 1 under uniform t). With V = Var(L) = A + B + C (``docs/variance.md``):

- **V** from the training rows: every row is marginally a standard draw (also MIRROR's second row), so the
  pooled sums of L and L^2 over all rows give V = E[L^2] - E[L]^2.
- **A** and **A + B** from a *probe*: on a keyed subset of sequences (``Stream.PROBE_SELECT``; each sequence of
  every ``variance.probe.every``-th optimiser step with probability ``variance.probe.fraction``) a no-grad
  forward evaluates four rows of the same x0: the base row (t, M) and its antithetic partner M' = {u > 1 - q} (MIRROR's
  second mask), an independent mask M2 at the same t (``Stream.PROBE_MASK``), and an independent rate and
  mask (t3, M3) (``Stream.PROBE_T``, ``Stream.PROBE_T_MASK``). Two i.i.d. draws X, Y given what they share have
  E[(X - Y)^2] / 2 = Var(X | shared), so
      E[(L(t, M) - L(t, M2))^2] / 2   = E_{x0,t}[Var_M L]            = A
      E[(L(t, M) - L(t3, M3))^2] / 2  = E_{x0}[Var_{t,M} L]          = A + B
      E[(L(t, M) - L(t, M'))^2] / 2   = A - K,  K = E_{x0,t}[Cov(L, L' | x0, t)]  (MIRROR's pair statistic)
  hence B = (A + B) - A and C = V - (A + B). With MIRROR on, the training pairs add to the last statistic.
  Why a separate no-grad forward, not extra rows in the training forward with weight 0: both leave the gradient
  exactly unchanged (a zero coefficient multiplies a finite CE), but weight-0 rows still pay their backward
  (about 2 forwards each) and a separate forward is a section of its own in the step-time breakdown. The probe
  runs at the step's current parameters (before the micro-batch's training forward), so its four rows are
  evaluated by the same function: the estimators above are unbiased at those parameters. Under ZeRO-3 every rank
  runs the probe forward on probe steps (the step number is global); a rank without selected sequences
  forwards one uncounted row.
- **MIRROR at equal rows.** With R rows per step, standard has Var = V / R and MIRROR (R / 2 sequences of two
  antithetic rows) Var = (A + K + 2B + 2C) / R, so MIRROR pays exactly when A - K > V, i.e. when
  E[(L - L')^2] / 2 > Var(L): both sides are measured above. ``masks: auto`` switches MIRROR on or off at each
  pooling by this rule (when the sides differ by ``SWITCH_Z`` standard errors), halving the sequences per
  micro-batch while on so the rows per step stay fixed.
  Unbiasedness: each step's loss is unbiased for the uniform objective under either setting, and the setting of
  a step is a function of earlier steps' noise only (samples are never reused: stream positions run on), so
  E[step loss] = objective through every switch (``tests/test_online_variance.py``).

Accumulation (``pooled_sums.py``, as for P-POTS's statistics): per-rank sums on the device (no host
synchronisation per step), pooled over ranks every ``variance.monitor.every`` steps (for any t-sampler), the
earlier pooled sums decayed by 0.5^(every / half_life). Standard errors treat the decayed sums as plain sums
(approximate). :class:`VarianceMonitor` is a noise service (``service.py``): it probes, observes, pools at
optimiser steps, logs the estimates, and under ``masks: auto`` decides and switches MIRROR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mdm_scale.config.variance import AutoMasksConfig, VarianceConfig
from mdm_scale.core.batch import Batch
from mdm_scale.core.noise import Stream, keyed_uniform
from mdm_scale.diffusion.masks import BernoulliMasks
from mdm_scale.diffusion.objective import MDMObjective, NoisyBatch, stack_rows
from mdm_scale.diffusion.pooled_sums import PooledSums
from mdm_scale.diffusion.service import LogValue, NoiseService
from mdm_scale.distributed.env import broadcast_from_main

# Columns of the statistics: training rows (count, sums of L, L^2, L^3, L^4: V and its standard error), then
# (count, sum, sum of squares) of the half squared differences for the independent mask (A), the independent
# rate (A + B) and the antithetic pair (A - K).
(ROWS, SUM_L, SUM_L2, SUM_L3, SUM_L4, MASK_N, MASK_SUM, MASK_SQ, RATE_N, RATE_SUM, RATE_SQ, PAIR_N, PAIR_SUM,
 PAIR_SQ) = range(14)
COLUMNS = 14
MIN_PROBES = 8  # ``masks: auto`` keeps its setting until this many pairs and rows are pooled
SWITCH_Z = 2.0  # ... and until the rule's two sides differ by this many standard errors
LOGGED_ESTIMATES = ("A", "B", "C", "V", "A_share", "B_share", "C_share", "pair_half_sq", "mirror")
"""What the console and TensorBoard (``variance/*``) show at each pooling."""


@dataclass(frozen=True)
class MonitorSettings:
    every: int = 50
    decay: float = 1.0  # factor on the pooled sums at each pooling, 0.5^(every / half_life)
    probe_every: int = 25
    probe_fraction: float = 0.0625
    mirror_auto: bool = False

    @classmethod
    def from_config(cls, variance: VarianceConfig) -> MonitorSettings:
        return cls(every=variance.monitor.every, decay=variance.monitor.decay, probe_every=variance.probe.every,
                   probe_fraction=variance.probe.fraction, mirror_auto=isinstance(variance.masks, AutoMasksConfig))


def estimates(stats: torch.Tensor) -> dict[str, float]:
    """A, B, C, V, the MIRROR pair statistic A - K, shares and standard errors from pooled sums (host)."""
    s = stats.to(torch.float64).tolist()

    def mean_se(n: int, total: int, sq: int) -> tuple[float, float]:
        if s[n] <= 0:
            return float("nan"), float("nan")
        mean = s[total] / s[n]
        return mean, max(s[sq] / s[n] - mean * mean, 0.0) ** 0.5 / s[n] ** 0.5

    rows = s[ROWS]
    v = v_se = float("nan")
    if rows > 1:
        m1, m2, m3, m4 = (s[c] / rows for c in (SUM_L, SUM_L2, SUM_L3, SUM_L4))
        v = m2 - m1 * m1
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        v_se = max(central4 - v * v, 0.0) ** 0.5 / rows**0.5  # delta method: Var(sample variance) ~ (mu4 - V^2)/n
    a, a_se = mean_se(MASK_N, MASK_SUM, MASK_SQ)
    ab, ab_se = mean_se(RATE_N, RATE_SUM, RATE_SQ)
    pair, pair_se = mean_se(PAIR_N, PAIR_SUM, PAIR_SQ)
    out = {"V": v, "A": a, "B": ab - a, "C": v - ab, "A+B": ab, "pair_half_sq": pair,
           "V_se": v_se, "A_se": a_se, "A+B_se": ab_se, "pair_half_sq_se": pair_se,
           "rows": rows, "probes": s[MASK_N], "pairs": s[PAIR_N]}
    for term in ("A", "B", "C"):
        out[f"{term}_share"] = out[term] / v if v > 0 else float("nan")
    return out


def probe_selected(seed: int, sample_index: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which sequences the probe measures: keyed by (seed, global sample index), never by rank."""
    return keyed_uniform(seed, sample_index, Stream.PROBE_SELECT) < fraction


def select_sequences(batch: Batch, keep: torch.Tensor) -> Batch:
    mask = None if batch.attention_mask is None else batch.attention_mask[keep]
    return Batch(batch.input_ids[keep], batch.loss_mask[keep], batch.sample_index[keep], mask)


class Probe:
    """Builds the probe's rows for a micro-batch and turns their losses into statistics (module docstring)."""

    def __init__(self, objective: MDMObjective, pair_masks: BernoulliMasks, single_masks: BernoulliMasks,
                 seed: int, fraction: float):
        self.pair = MDMObjective(objective.t_sampler, pair_masks, objective.mask_token_id)
        self.single = MDMObjective(objective.t_sampler, single_masks, objective.mask_token_id)
        self.seed, self.fraction = seed, fraction

    def rows(self, batch: Batch) -> tuple[NoisyBatch, int]:
        """The probe rows of the selected sequences of ``batch`` (B' >= 1 of them; the first sequence,
        uncounted, if none is selected) and how many are counted."""
        keep = probe_selected(self.seed, batch.sample_index, self.fraction)
        counted = int(keep.sum())
        if counted == 0:
            keep[0] = True
        chosen = select_sequences(batch, keep)
        parts = [self.pair.corrupt(chosen, Stream.T, Stream.MASK),
                 self.single.corrupt(chosen, Stream.T, Stream.PROBE_MASK),
                 self.single.corrupt(chosen, Stream.PROBE_T, Stream.PROBE_T_MASK)]
        return stack_rows(parts), counted

    @staticmethod
    def statistics(noisy: NoisyBatch, token_ce: torch.Tensor, counted: int) -> torch.Tensor:
        """(COLUMNS,) float64 sums of the probe's half squared differences, on the device. Rows: 2B' pair rows
        (base, antithetic), B' independent-mask rows, B' independent-rate rows."""
        n = len(noisy.t) // 3
        loss = (noisy.row_losses(token_ce).double() * noisy.weight.double()[noisy.row_sample])
        base, anti = loss[0:2 * n:2], loss[1:2 * n:2]
        other_mask, other_rate = loss[2 * n:3 * n], loss[3 * n:4 * n]
        out = torch.zeros(COLUMNS, dtype=torch.float64, device=loss.device)
        if counted == 0:
            return out
        for (count, total, sq), other in (((MASK_N, MASK_SUM, MASK_SQ), other_mask),
                                          ((RATE_N, RATE_SUM, RATE_SQ), other_rate),
                                          ((PAIR_N, PAIR_SUM, PAIR_SQ), anti)):
            half = (base - other) ** 2 / 2
            out[count] = n
            out[total] = half.sum()
            out[sq] = (half * half).sum()
        return out


def training_statistics(noisy: NoisyBatch, row_loss: torch.Tensor, pair_sq_diff: torch.Tensor | None) -> torch.Tensor:
    """(COLUMNS,) float64 sums of one training micro-batch on the device: rows for V; MIRROR pairs (the
    unweighted (l1 - l2)^2, NaN where a sequence has one row) for A - K."""
    weight = noisy.weight.double()
    loss = row_loss.double() * weight[noisy.row_sample]
    finite = torch.isfinite(loss)
    loss = torch.where(finite, loss, 0.0)
    out = torch.zeros(COLUMNS, dtype=torch.float64, device=loss.device)
    square = loss * loss
    out[ROWS], out[SUM_L], out[SUM_L2] = finite.sum(), loss.sum(), square.sum()
    out[SUM_L3], out[SUM_L4] = (square * loss).sum(), (square * square).sum()
    if pair_sq_diff is not None:
        half = pair_sq_diff.double() * weight * weight / 2
        paired = torch.isfinite(half)
        half = torch.where(paired, half, 0.0)
        out[PAIR_N], out[PAIR_SUM], out[PAIR_SQ] = paired.sum(), half.sum(), (half * half).sum()
    return out


MirrorSwitch = Callable[[bool, int, str], None]
"""``switch(on, from_step, why)``: MIRROR on or off from optimiser step ``from_step`` (0-based) on; ``why`` is the
rule's sides for the console ("" when a resume replays a decision)."""


class VarianceMonitor(NoiseService):
    """Online A/B/C: pooled sums, the latest estimates and ``masks: auto``'s decisions (module docstring).
    ``probe`` is None without the probe; ``switch`` applies ``masks: auto``'s decisions (``Trainer._set_mirror``)."""

    state_key = "variance_monitor"
    log_prefix = "variance"
    log_console = True

    def __init__(self, settings: MonitorSettings, probe: Probe | None = None,
                 switch: MirrorSwitch = lambda on, from_step, why: None):
        self.settings, self.prober, self.switch = settings, probe, switch
        self.sums = PooledSums((COLUMNS,), settings.every, settings.decay)
        self.mirror_on = False
        self.decisions: list[tuple[int, bool]] = []  # (first step with the new setting, MIRROR on)
        self.report: dict[str, float] | None = None  # set at a pooling, taken by ``log``

    @property
    def statistics(self) -> torch.Tensor:
        """The pooled sums (``COLUMNS``,), the same on every rank."""
        return self.sums.statistics

    def probe_step(self, step: int) -> bool:
        """Whether optimiser step ``step`` (0-based, the same on every rank) runs the probe."""
        every = self.settings.probe_every
        return every > 0 and self.settings.probe_fraction > 0 and step % every == 0

    # ---- the service ----------------------------------------------------------------------------------------
    def probe(self, step: int, batch: Batch, evaluate: Callable) -> None:
        """On probe steps, the probe's no-grad forward on this micro-batch's selected sequences, at the parameters
        the micro-batch trains with. Every rank runs it (ZeRO-3 gathers parameters collectively)."""
        if self.prober is None or not self.probe_step(step):
            return
        noisy, counted = self.prober.rows(batch)
        rows = evaluate(noisy)
        self.sums.add(Probe.statistics(rows.noisy, rows.token_ce, counted))

    def observe(self, micro) -> None:
        self.sums.add(training_statistics(micro.noisy, micro.row_loss, micro.pair_sq_diff))

    def changes_after(self, step: int) -> bool:
        """Whether ``on_optimizer_step(step)`` may switch MIRROR (``masks: auto``, at a pooling)."""
        return self.settings.mirror_auto and self.sums.due(step)

    def on_optimizer_step(self, step: int) -> None:
        """After optimiser step ``step`` (1-based), on every rank: at a pooling, all-reduce, pool and estimate;
        under ``masks: auto``, decide and switch MIRROR from the next step on."""
        if not self.sums.due(step):
            return
        self.sums.pool()
        self.report = estimates(self.sums.statistics)
        if not self.settings.mirror_auto:
            return
        wanted = self._decide(self.report)
        flag = broadcast_from_main(torch.tensor([float(wanted)], dtype=torch.float64, device=self.sums.pending.device))
        wanted = bool(flag.item() > 0.5)  # all-reduced sums agree on every rank; rank 0's word makes it certain
        self.report["mirror"] = float(wanted)
        if wanted == self.mirror_on:
            return
        self.mirror_on = wanted
        self.decisions.append((step, wanted))
        r = self.report
        self.switch(wanted, step, f"E[(L1-L2)^2]/2 = {r['pair_half_sq']:.4g} {'>' if wanted else '<='} Var(L) = "
                                  f"{r['V']:.4g} (A = {r['A']:.4g}, B = {r['B']:.4g}, C = {r['C']:.4g})")

    def _decide(self, r: dict[str, float]) -> bool:
        """MIRROR pays at equal rows iff E[(L - L')^2] / 2 > Var(L) (module docstring). The setting changes only
        when the two sides differ by ``SWITCH_Z`` standard errors: both statistics are heavy-tailed (the weight
        1/pi(t) reaches 1/eps at small t), and a single extreme pair must not flip the run."""
        if r["pairs"] < MIN_PROBES or r["rows"] < MIN_PROBES:
            return self.mirror_on
        gap = r["pair_half_sq"] - r["V"]
        se = (r["pair_half_sq_se"] ** 2 + r["V_se"] ** 2) ** 0.5
        if abs(gap) <= SWITCH_Z * se:
            return self.mirror_on
        return gap > 0

    def log(self, step: int, interval: bool) -> dict[str, LogValue]:
        report, self.report = self.report, None
        return {k: report[k] for k in LOGGED_ESTIMATES if k in report} if report is not None else {}

    def state_dict(self) -> dict:
        return {**self.sums.state_dict(), "mirror_on": self.mirror_on, "decisions": list(self.decisions)}

    def load_state_dict(self, state: dict) -> None:
        """Restore, and replay ``masks: auto``'s decisions through ``switch``."""
        if not state:
            return  # a checkpoint from before the monitor existed: start with empty statistics
        self.sums.load_state_dict(state)
        self.mirror_on = bool(state["mirror_on"])
        self.decisions = [(int(s), bool(on)) for s, on in state["decisions"]]
        for from_step, on in self.decisions:
            self.switch(on, from_step, "")
