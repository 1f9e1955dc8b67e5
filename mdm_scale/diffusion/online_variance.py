"""Online A/B/C: where the training loss's noise comes from, measured while training (docs/spec.md section 2.2),
and the ``variance.masks: auto`` rule that acts on it.

One row is one forward of one sequence x0 with one mask; its weighted loss is L = w(t) l(x0, t, M) (w = 1/p(t)
under P-POTS, 1 under uniform t). Every term is a variance or a covariance of rows at the same parameters
(``variance_estimates.py`` states the algebra): V = Var(L), cov_pair = Cov(L, L') (L' the antithetic partner,
MIRROR's second mask), cov_mask = Cov(L, L2) (an independent mask at the same (x0, t)), cov_rate = Cov(L, L3) (an
independent rate and mask), B from the differences L (L2 - L3), and under SyRM cov_syrm = Cov(La, Lb) of partner
sequences; then A = V - cov_mask, C = cov_rate, and MIRROR's pair statistic E[(L - L')^2] / 2 = V - cov_pair.

**Where the items come from.**

- The training rows (``training_sums``, every micro-batch, free): a V item per *unit* of rows that share noise
  (a sequence's rows; under SyRM the rows of a pair of partner sequences, sequences 2m and 2m + 1); with MIRROR on,
  a cov_pair item per training pair; under SyRM, a cov_syrm item per pair of partner sequences (their mean rows).
- The *probe* (``Probe``, ``probe_sums``): on a keyed subset of sequences (``Stream.PROBE_SELECT``; each sequence
  of every ``variance.probe.every``-th optimiser step with probability ``variance.probe.fraction``) a no-grad
  forward evaluates four rows of the same x0: the base row (t, M), its antithetic partner M' = {u > 1 - q}, an
  independent mask M2 at the same t (``Stream.PROBE_MASK``) and an independent rate and mask (t3, M3)
  (``Stream.PROBE_T``, ``Stream.PROBE_T_MASK``): a cov_pair, a cov_mask, a cov_rate and a B item per sequence.
  Why a separate no-grad forward, not extra rows in the training forward with weight 0: both leave the gradient
  exactly unchanged, but weight-0 rows still pay their backward (about 2 forwards each) and a separate forward is
  a section of its own in the step-time breakdown. It runs at the step's current parameters, before the
  micro-batch's training forward; under ZeRO-3 every rank runs it on probe steps (the step number is global), a
  rank without selected sequences forwarding one uncounted row.

**Centred within their step.** Every item is centred on m, the previous step's mean training-row loss, less the
step's centring c (the mean of (L_i - m)(L_j - m) over pairs of training rows of different units), which makes it
exactly unbiased at its step's parameters whatever m is: a loss that falls from step to step never enters. So
each step's sums stay apart until the centring is known: ``PendingSums`` of shape (``variance.monitor.every``,
``STEP_COLUMNS``) hold, per step of the block, the sums that ``variance_estimates.row_sums`` and ``item_sums``
describe (the training rows' unit structure, then per quantity and stratum of t the item sums), added on the
device without host synchronisation. After every ``every``-th optimiser step one all-reduce pools the block over
ranks; each step is centred (``variance_estimates.block_moments``) and its items enter the pooled moments, whose
weights decay by 0.5^(every / half_life) per pooling (squared weights by its square: standard errors from the
effective sample size). Items are stratified by the quantile u = F(t) of their rate under the run's t-density
(``TSampler.quantile``) into 8 strata of equal probability; each estimate is the probability-weighted mean over
strata.

**MIRROR at equal rows.** With R rows per step, R Var(step mean) = V + cov_syrm for Standard and
V + cov_pair + 2 cov_syrm for MIRROR (R / 2 sequences of two rows), so MIRROR pays exactly when the gain
-(cov_pair + cov_syrm) > 0, i.e. E[(L - L')^2] / 2 > V + cov_syrm (cov_syrm = 0 without SyRM). ``masks: auto``
decides at each pooling: MIRROR switches on (off) when the gain is above (below) 0 by more than ``SWITCH_Z``
standard errors and at least ``MIN_PAIRS`` effective pair items (and SyRM items) are pooled; otherwise the setting
stays. While on, a micro-batch holds half the sequences so the rows per step stay fixed. Unbiasedness: each step's
loss is unbiased for the uniform objective under either setting, and the setting of a step is a function of
earlier steps' noise only (samples are never reused: stream positions run on), so E[step loss] = objective through
every switch (``tests/test_online_variance.py``).

:class:`VarianceMonitor` is a noise service (``service.py``): it probes, observes, pools at optimiser steps, logs
every estimate with its 95% interval (``_lo``, ``_hi``) and under ``masks: auto`` decides and switches MIRROR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mdm_scale.config.variance import AutoMasksConfig, VarianceConfig
from mdm_scale.core.batch import Batch
from mdm_scale.core.noise import Stream, keyed_uniform
from mdm_scale.diffusion import variance_estimates as ve
from mdm_scale.diffusion.masks import BernoulliMasks
from mdm_scale.diffusion.objective import MDMObjective, NoisyBatch, TrainedMicroBatch, stack_rows
from mdm_scale.diffusion.pooled_sums import PendingSums, due
from mdm_scale.diffusion.service import LogValue, NoiseService
from mdm_scale.distributed.env import broadcast_from_main

QUANTITY_NAMES = tuple(ve.QUANTITIES)
ITEM_BLOCK = ve.STRATA * ve.ITEM_COLUMNS
STEP_COLUMNS = ve.ROW_COLUMNS + len(QUANTITY_NAMES) * ITEM_BLOCK
"""Sums of one step: the training rows' ``row_sums``, then ``item_sums`` (strata x item columns) per quantity."""
MIN_PAIRS = 8.0  # ``masks: auto`` keeps its setting until this many effective pair (and SyRM) items are pooled
SWITCH_Z = 2.0  # ... and until the gain differs from 0 by this many standard errors
LOGGED_ESTIMATES = ("V", "A", "B", "C", "A_share", "B_share", "C_share", "pair_half_sq", "rule_right", "gain")
"""What the console and TensorBoard (``variance/*``) show at each pooling, each with ``_lo`` and ``_hi`` (its 95%
interval); then ``pairs`` (effective pair items) and, under ``masks: auto``, ``mirror`` (the setting from the
next step on). ``rule_right`` is the rule's right side V + cov_syrm (V without SyRM), ``pair_half_sq`` its left
side, ``gain`` their difference -(cov_pair + cov_syrm)."""

Quantile = Callable[[torch.Tensor], torch.Tensor]
"""u = F(t) of the rates under the run's t-density (``TSampler.quantile``), on the rates' device."""


@dataclass(frozen=True)
class MonitorSettings:
    every: int = 50
    decay: float = 1.0  # factor on the pooled weights at each pooling, 0.5^(every / half_life)
    probe_every: int = 25
    probe_fraction: float = 0.0625
    mirror_auto: bool = False
    syrm: bool = False  # SyRM partner sequences: units of two sequences and the cov_syrm term

    @classmethod
    def from_config(cls, variance: VarianceConfig) -> MonitorSettings:
        return cls(every=variance.monitor.every, decay=variance.monitor.decay, probe_every=variance.probe.every,
                   probe_fraction=variance.probe.fraction, mirror_auto=isinstance(variance.masks, AutoMasksConfig),
                   syrm=variance.t_coupling == "symmetric")


# ---- one micro-batch's sums --------------------------------------------------------------------------------
def step_sums(items: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
    """(STEP_COLUMNS,) float64: ``rows`` (``row_sums``) and each quantity's item sums (STRATA, ITEM_COLUMNS)."""
    device = (rows if rows is not None else next(iter(items.values()))).device
    out = torch.zeros(STEP_COLUMNS, dtype=torch.float64, device=device)
    if rows is not None:
        out[:ve.ROW_COLUMNS] = rows
    for name, sums in items.items():
        start = ve.ROW_COLUMNS + QUANTITY_NAMES.index(name) * ITEM_BLOCK
        out[start:start + ITEM_BLOCK] = sums.reshape(-1)
    return out


def split_steps(block: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(S, STEP_COLUMNS) -> the rows' sums (S, ROW_COLUMNS) and {quantity: (S, STRATA, ITEM_COLUMNS)}."""
    items = block[:, ve.ROW_COLUMNS:].reshape(len(block), len(QUANTITY_NAMES), ve.STRATA, ve.ITEM_COLUMNS)
    return block[:, :ve.ROW_COLUMNS], {name: items[:, q] for q, name in enumerate(QUANTITY_NAMES)}


def weighted_row_losses(micro: TrainedMicroBatch) -> torch.Tensor:
    """(R,) L = w(t) l of each row, float64."""
    noisy = micro.noisy
    return micro.row_loss.double() * noisy.weight.double().to(micro.row_loss.device)[noisy.row_sample]


def training_sums(micro: TrainedMicroBatch, quantile: Quantile, syrm: bool) -> torch.Tensor:
    """(STEP_COLUMNS,) sums of one trained micro-batch, on its device, no host synchronisation: V's items (one
    per unit: a sequence, under SyRM a pair of partner sequences), MIRROR's training pairs (adjacent rows of one
    sequence) as cov_pair items, SyRM's partner sequences (their mean rows) as cov_syrm items."""
    noisy = micro.noisy
    loss = weighted_row_losses(micro)
    sequence = noisy.row_sample.to(loss.device)
    sequences = len(noisy.t)
    unit, units = (sequence // 2, (sequences + 1) // 2) if syrm else (sequence, sequences)
    stratum = ve.strata_of(quantile(noisy.t.to(loss.device)))  # (B,)
    p, s, first = ve.unit_items(loss, unit, units)
    items = {"V": ve.item_sums(p, s, stratum[sequence[first]])}
    if noisy.rows > sequences:  # MIRROR: rows i, i + 1 of one sequence are a pair (others: NaN, left out)
        paired = sequence[1:] == sequence[:-1]
        pp, ss = ve.pair_items(loss[:-1], loss[1:])
        items["cov_pair"] = ve.item_sums(torch.where(paired, pp, float("nan")), ss, stratum[sequence[:-1]])
    if syrm and sequences >= 2:
        mean = micro.sample_loss.double() * noisy.weight.double().to(loss.device)  # the sequence's mean row
        half = 2 * (sequences // 2)
        items["cov_syrm"] = ve.item_sums(*ve.pair_items(mean[0:half:2], mean[1:half:2]), stratum[0:half:2])
    return step_sums(items, ve.row_sums(loss, unit, units))


def probe_sums(rows: TrainedMicroBatch, counted: int, quantile: Quantile) -> torch.Tensor:
    """(STEP_COLUMNS,) sums of the probe's rows (``Probe.rows``: 2n pair rows (base, antithetic), n
    independent-mask rows, n independent-rate rows): a cov_pair, cov_mask, cov_rate and B item per sequence,
    stratified by the base row's rate. Zeros when nothing is counted."""
    loss = weighted_row_losses(rows)
    n = len(rows.t) // 3
    if counted == 0:
        return torch.zeros(STEP_COLUMNS, dtype=torch.float64, device=loss.device)
    base, anti = loss[0:2 * n:2], loss[1:2 * n:2]
    other_mask, other_rate = loss[2 * n:3 * n], loss[3 * n:4 * n]
    stratum = ve.strata_of(quantile(rows.t[:n].to(loss.device)))
    return step_sums({"cov_pair": ve.item_sums(*ve.pair_items(base, anti), stratum),
                      "cov_mask": ve.item_sums(*ve.pair_items(base, other_mask), stratum),
                      "cov_rate": ve.item_sums(*ve.pair_items(base, other_rate), stratum),
                      "B": ve.item_sums(*ve.difference_items(base, other_mask, other_rate), stratum)})


def probe_selected(seed: int, sample_index: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which sequences the probe measures: keyed by (seed, global sample index), never by rank."""
    return keyed_uniform(seed, sample_index, Stream.PROBE_SELECT) < fraction


def select_sequences(batch: Batch, keep: torch.Tensor) -> Batch:
    mask = None if batch.attention_mask is None else batch.attention_mask[keep]
    return Batch(batch.input_ids[keep], batch.loss_mask[keep], batch.sample_index[keep], mask)


class Probe:
    """Builds the probe's rows for a micro-batch (module docstring)."""

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


MirrorSwitch = Callable[[bool, int, str], None]
"""``switch(on, from_step, why)``: MIRROR on or off from optimiser step ``from_step`` (0-based) on; ``why`` is the
rule's numbers for the console ("" when a resume replays a decision)."""


class VarianceMonitor(NoiseService):
    """Online A/B/C: per-step pending sums, pooled moments, the latest estimates and ``masks: auto``'s decisions
    (module docstring). ``quantile`` maps rates to their quantiles under the run's t-density (default: uniform t);
    ``probe`` is None without the probe; ``switch`` applies ``masks: auto``'s decisions (``Trainer._set_mirror``)."""

    state_key = "variance_monitor"
    log_prefix = "variance"
    log_console = True

    def __init__(self, settings: MonitorSettings, quantile: Quantile = lambda t: t.to(torch.float64),
                 probe: Probe | None = None, switch: MirrorSwitch = lambda on, from_step, why: None):
        self.settings, self.quantile, self.prober, self.switch = settings, quantile, probe, switch
        self.pending = PendingSums((settings.every, STEP_COLUMNS))
        self.pooled = torch.zeros(len(QUANTITY_NAMES), ve.STRATA, ve.POOLED_COLUMNS, dtype=torch.float64)
        self.previous_mean = 0.0  # the mean training-row loss of the last step pooled: the next block's first m
        self.position = 0  # the current step's place in its block (steps since the last pooling)
        self.mirror_on = False
        self.decisions: list[tuple[int, bool]] = []  # (first step with the new setting, MIRROR on)
        self.report: dict[str, ve.Estimate] | None = None  # set at a pooling, taken by ``log``

    def probe_step(self, step: int) -> bool:
        """Whether optimiser step ``step`` (0-based, the same on every rank) runs the probe."""
        every = self.settings.probe_every
        return every > 0 and self.settings.probe_fraction > 0 and self.settings.every > 0 and step % every == 0

    def quantities(self) -> dict[str, torch.Tensor]:
        """The pooled moments (STRATA, POOLED_COLUMNS) of each quantity the run measures (cov_syrm under SyRM)."""
        return {name: self.pooled[q] for q, name in enumerate(QUANTITY_NAMES)
                if name != "cov_syrm" or self.settings.syrm}

    # ---- the service ----------------------------------------------------------------------------------------
    def probe(self, step: int, batch: Batch, evaluate: Callable) -> None:
        """On probe steps, the probe's no-grad forward on this micro-batch's selected sequences, at the parameters
        the micro-batch trains with. Every rank runs it (ZeRO-3 gathers parameters collectively)."""
        if self.prober is None or not self.probe_step(step):
            return
        noisy, counted = self.prober.rows(batch)
        self.pending.add(probe_sums(evaluate(noisy), counted, self.quantile), at=self.position)

    def observe(self, micro: TrainedMicroBatch) -> None:
        if self.settings.every > 0:
            self.pending.add(training_sums(micro, self.quantile, self.settings.syrm), at=self.position)

    def changes_after(self, step: int) -> bool:
        """Whether ``on_optimizer_step(step)`` may switch MIRROR (``masks: auto``, at a pooling)."""
        return self.settings.mirror_auto and due(step, self.settings.every)

    def on_optimizer_step(self, step: int) -> None:
        """After optimiser step ``step`` (1-based), on every rank: at a pooling, all-reduce the block's per-step
        sums, centre each step, pool and estimate; under ``masks: auto``, decide and switch MIRROR from the next
        step on."""
        every = self.settings.every
        self.position = step % every if every > 0 else 0
        if not due(step, every):
            return
        rows, items = split_steps(self.pending.reduce())
        moments, last = ve.block_moments(rows, items, self.previous_mean)
        self.previous_mean = float(last)
        block = torch.stack([moments[name] for name in QUANTITY_NAMES])
        self.pooled = ve.pool(self.pooled, block, self.settings.decay)
        self.report = ve.decomposition(self.quantities())
        if not self.settings.mirror_auto:
            return
        wanted = self._decide(self.report)
        flag = broadcast_from_main(torch.tensor([float(wanted)], dtype=torch.float64, device=self.pending.device))
        wanted = bool(flag.item() > 0.5)  # all-reduced sums agree on every rank; rank 0's word makes it certain
        if wanted == self.mirror_on:
            return
        self.mirror_on = wanted
        self.decisions.append((step, wanted))
        self.switch(wanted, step, self._why(self.report))

    def _decide(self, report: dict[str, ve.Estimate]) -> bool:
        """MIRROR pays at equal rows iff gain = -(cov_pair + cov_syrm) > 0 (module docstring). The setting changes
        only once ``MIN_PAIRS`` effective pair items (and SyRM items) are pooled and the gain differs from 0 by
        ``SWITCH_Z`` standard errors: the items are heavy-tailed (the weight 1/pi(t) reaches 1/eps at small t), and
        a single extreme pair must not flip the run."""
        if not (report["cov_pair"].n_eff >= MIN_PAIRS and report["cov_syrm"].n_eff >= MIN_PAIRS):
            return self.mirror_on
        gain = report["gain"]
        if not abs(gain.value) > SWITCH_Z * gain.se:  # also keeps the setting when either is NaN
            return self.mirror_on
        return gain.value > 0

    @staticmethod
    def _why(r: dict[str, ve.Estimate]) -> str:
        gain = r["gain"]
        return (f"gain -(cov_pair + cov_syrm) = {gain.value:.4g} (SE {gain.se:.2g}): E[(L1-L2)^2]/2 = "
                f"{r['pair_half_sq'].value:.4g} {'>' if gain.value > 0 else '<'} Var(L) (+ cov_syrm) = "
                f"{r['rule_right'].value:.4g} (A = {r['A'].value:.4g}, B = {r['B'].value:.4g}, "
                f"C = {r['C'].value:.4g})")

    def log(self, step: int, interval: bool) -> dict[str, LogValue]:
        report, self.report = self.report, None
        if report is None:
            return {}
        values: dict[str, LogValue] = {}
        for name in LOGGED_ESTIMATES:
            estimate = report[name]
            values[name] = estimate.value
            values[f"{name}_lo"], values[f"{name}_hi"] = estimate.interval()
        values["pairs"] = report["cov_pair"].n_eff
        if self.settings.mirror_auto:
            values["mirror"] = float(self.mirror_on)
        return values

    def state_dict(self) -> dict:
        return {"pending": self.pending.host(), "pooled": self.pooled.clone(), "previous_mean": self.previous_mean,
                "position": self.position, "mirror_on": self.mirror_on, "decisions": list(self.decisions)}

    def load_state_dict(self, state: dict, pending_from: list[dict] | None = None) -> None:
        """Restore, and replay ``masks: auto``'s decisions through ``switch``. ``pending_from``: the states of
        the old ranks whose pending sums this rank takes over after a change of the world size."""
        if not state:
            return  # a checkpoint from before the monitor existed: start with empty statistics
        self.mirror_on = bool(state["mirror_on"])
        self.decisions = [(int(s), bool(on)) for s, on in state["decisions"]]
        for from_step, on in self.decisions:
            self.switch(on, from_step, "")
        if "pooled" not in state:
            return  # the raw sums of the estimators before issue 26: not these; start empty, keep the decisions
        self.pooled = state["pooled"].to(torch.float64, copy=True)
        self.previous_mean, self.position = float(state["previous_mean"]), int(state["position"])
        self.pending.load([s["pending"] for s in (pending_from if pending_from is not None else [state])
                           if "pooled" in s])

    def load_rank_states(self, states: list[dict], main: dict) -> None:
        """The pooled moments, position and decisions (the same on every rank) from rank 0's state, the pending
        sums summed over the old ranks this rank takes over."""
        self.load_state_dict(main, pending_from=states)
