"""The online variance estimators (docs/spec.md section 2.2) as pure functions: sums in, estimates out.

Notation: one *row* is one forward of one sequence x0 with one mask; L = w(t) l(x0, t, M) is its weighted loss.
Every quantity below is a variance or a covariance of rows drawn at the same parameters (one optimiser step):

    V          = Var(L)
    cov_pair   = Cov(L, L')     L' the antithetic partner (MIRROR's second mask) at the same (x0, t)   = B + C + K
    cov_mask   = Cov(L, L2)     L2 an independent mask at the same (x0, t)                              = B + C
    cov_rate   = Cov(L, L3)     L3 an independent rate and mask for the same x0                         = C
    cov_syrm   = Cov(La, Lb)    SyRM partners: other sequences, rates t and 1 - t (u and 1 - u)        = S

so A = V - cov_mask, B = cov_mask - cov_rate, C = cov_rate and MIRROR's pair statistic E[(L - L')^2] / 2 =
V - cov_pair = A - K. **MIRROR pays at equal rows iff cov_pair + cov_syrm < 0** (cov_syrm = 0 without SyRM):
with R rows per step, R / k units of k coupled rows, R Var(step mean) = V + cov_syrm for Standard and
2V - (A - K) + 2 cov_syrm = V + cov_pair + 2 cov_syrm for MIRROR (R / 2 sequences of two rows), so the
difference is cov_pair + cov_syrm (docs/spec.md section 2.2 derives it).

**Items, centred within their step.** Every estimate is a mean of per-item values z whose expectation is the
quantity exactly. An item is the unit that carries the quantity: a *unit* of coupled training rows (the rows
of one sequence, of one SyRM pair of sequences) for V, a pair of rows for a covariance. With m a constant
and c the step's *centring*, the mean over pairs of training rows of *different* units (independent rows) of
(L_i - m)(L_j - m),

    V item:           z = mean over the unit's rows of (L - m)^2 - c         E = Var(L) + (mu - m)^2 - (mu - m)^2
    covariance item:  z = (X - m)(Y - m) - c                                 E = Cov(X, Y) + (mu - m)^2 - (mu - m)^2
    difference item:  z = (L - m)(L2 - L3)        (B = cov_mask - cov_rate: the centring cancels)

where mu is the step's mean row loss. Both expectations hold for *any* m fixed before the step's noise is
drawn, so every item is unbiased at the parameters of its step, and step-to-step changes of the loss (a falling
loss) never enter: pooled raw sums of L and L^2 over many steps would add the variance of the step means to V
(section 2.2). Rows coupled inside a unit (MIRROR's pair, SyRM's pair) never enter c, so their covariances do
not bias it. We take m = the previous step's mean row loss (0 before the first step): any fixed m is exact, and
one close to mu makes c small and almost noiseless. With singleton units and m = the step's own mean, V's items
average to the usual sample variance with n - 1 degrees of freedom; the previous step's m keeps every item
type exact (the probe's extra rows are not among the rows that the step mean would be taken over).

For any item the value is z = p - m s + e (m^2 - c) with (p, s, e) = (mean L^2, 2 mean L, 1) for V,
(XY, X + Y, 1) for a covariance and (L (L2 - L3), L2 - L3, 0) for B; so per step it suffices to all-reduce
sums of n, p, s, p^2, p s, s^2 (``item_sums``) and of the training rows' unit structure (``row_sums``).

**Decay and effective sample size.** Steps pooled at a refit get weight 1; at each refit the earlier weights
are multiplied by ``decay``. For weights w_i, the weighted mean zbar = sum w z / sum w of i.i.d. items has
Var(zbar) = sigma^2 sum w^2 / (sum w)^2 = sigma^2 / n_eff, n_eff = (sum w)^2 / sum w^2, and
E[sum w (z - zbar)^2] = sigma^2 (sum w - sum w^2 / sum w), which gives an unbiased sigma^2. Treating decayed sums
as plain counts (n = sum w) would overstate the standard error by sqrt(n_eff / sum w), about 1.36 at
``refit_every`` 50 and half-life 200, so that a 2-SE margin would be 2.7 SE.

**Strata of t.** Items are binned by the quantile u = F(t) of their (first) row's rate under the run's
t-density into ``STRATA`` strata of equal probability 1 / ``STRATA`` (equal-width t-bins under uniform t). The
estimate is sum_j P_j zbar_j with the exact P_j, not the pooled mean: the share of the noise that comes from
how many draws happened to land in each stratum (the variance of the strata's means) is removed, and an
extreme draw in a stratum that the sample over-represents counts with its stratum's probability, not with
1 / n. The heavy tail inside a stratum stays (where 1/pi(t) grows towards 1/eps it lies inside the first
stratum; docs/spec.md section 2.2). A stratum with fewer than ``MIN_EFFECTIVE`` effective items is merged with
the next (collapsed strata: a small bias towards the neighbour's mean while strata are nearly empty, none once
they fill). Var = sum_j P_j^2 sigma_j^2 / n_eff_j.

**What the standard errors leave out.** Items of one step share m and c; c's noise is ignored (its variance
relative to that of an item sum is about 4 / n for V's items, n the step's rows, and far less for the
probe's few items). Under StraTS every pair of rows of a step is coupled, so c is biased by the stratification's
covariance, O(B / global batch). Under SyRM the two items of a coupled pair are correlated (t and 1 - t):
usually negatively, so the standard error is then a little too large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STRATA = 8
MIN_EFFECTIVE = 2.0  # effective items a stratum needs (a variance needs two); fewer: merged with the next
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: 95% two-sided intervals

# Per-step sums of the training rows (``row_sums``): rows n, sum L, sum over units of (sum of the unit's L)^2,
# sum over units of k_u (sum of the unit's L), sum over units of k_u^2 (k_u: rows of unit u).
ROW_N, ROW_SUM, ROW_UNIT_SQ, ROW_UNIT_K_SUM, ROW_UNIT_K_SQ = range(5)
ROW_COLUMNS = 5
# Per-step, per-stratum sums of one item type (``item_sums``): n, p, s, p^2, p s, s^2.
ITEM_N, ITEM_P, ITEM_S, ITEM_PP, ITEM_PS, ITEM_SS = range(6)
ITEM_COLUMNS = 6
# Pooled, decayed moments of item values per stratum (``pool``): sum w, sum w^2, sum w z, sum w z^2.
W, W2, WZ, WZZ = range(4)
POOLED_COLUMNS = 4


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and the effective number of items behind it."""

    value: float
    se: float
    n_eff: float = float("nan")

    def interval(self, z: float = Z95) -> tuple[float, float]:
        return self.value - z * self.se, self.value + z * self.se

    def __add__(self, other: Estimate) -> Estimate:
        """The sum of two independent estimates."""
        return Estimate(self.value + other.value, math.hypot(self.se, other.se), min(self.n_eff, other.n_eff))

    def __sub__(self, other: Estimate) -> Estimate:
        """The difference of two independent estimates."""
        return Estimate(self.value - other.value, math.hypot(self.se, other.se), min(self.n_eff, other.n_eff))

    def __neg__(self) -> Estimate:
        return Estimate(-self.value, self.se, self.n_eff)

    def share_of(self, total: Estimate) -> Estimate:
        """self / total, SE by the delta method for independent estimates:
        Var(x / v) ~ (se_x^2 + (x / v)^2 se_v^2) / v^2."""
        if not total.value > 0:
            return Estimate(float("nan"), float("nan"), self.n_eff)
        ratio = self.value / total.value
        return Estimate(ratio, math.hypot(self.se, ratio * total.se) / total.value, min(self.n_eff, total.n_eff))


NAN = Estimate(float("nan"), float("nan"), 0.0)


# ---- per step: sums that one all-reduce pools over ranks and micro-batches ------------------------------------
# Every function below broadcasts over leading dimensions (independent runs, in the tests).
def row_sums(loss: torch.Tensor, unit: torch.Tensor, units: int) -> torch.Tensor:
    """(..., ROW_COLUMNS) float64 sums of one micro-batch's training rows: ``loss`` (..., R) the weighted row
    losses (non-finite ones are left out), ``unit`` (R,) int64 the unit of each row, numbered 0..``units``-1
    (rows of one unit share noise: a MIRROR pair, a SyRM pair of sequences). Additive over the micro-batches and
    ranks of a step, since units never straddle micro-batches. No host synchronisation."""
    loss = loss.detach().to(torch.float64)
    finite = torch.isfinite(loss)
    loss = torch.where(finite, loss, 0.0)
    members = _one_hot(unit.to(loss.device), units)  # (R, U)
    k, total = finite.to(torch.float64) @ members, loss @ members  # (..., U)
    return torch.stack([k.sum(-1), total.sum(-1), (total * total).sum(-1), (k * total).sum(-1), (k * k).sum(-1)],
                       dim=-1)


def item_sums(p: torch.Tensor, s: torch.Tensor, stratum: torch.Tensor, strata: int = STRATA) -> torch.Tensor:
    """(..., strata, ITEM_COLUMNS) float64 sums [n, p, s, p^2, p s, s^2] of one micro-batch's items (..., N)
    per stratum; items whose p or s is not finite are left out (module docstring: z = p - m s + e (m^2 - c))."""
    p, s = p.detach().to(torch.float64), s.detach().to(torch.float64)
    finite = torch.isfinite(p) & torch.isfinite(s)
    p, s = torch.where(finite, p, 0.0), torch.where(finite, s, 0.0)
    columns = torch.stack([finite.to(torch.float64), p, s, p * p, p * s, s * s], dim=-1)  # (..., N, 6)
    one_hot = _one_hot(stratum.to(p.device), strata)  # (..., N, strata): a matrix product, no scatter
    return one_hot.transpose(-1, -2) @ columns


def strata_of(u: torch.Tensor, strata: int = STRATA) -> torch.Tensor:
    """Stratum of each quantile u = F(t) in [0, 1]: floor(u * strata), int64."""
    return (u.to(torch.float64) * strata).floor().clamp(0, strata - 1).long()


def _one_hot(index: torch.Tensor, size: int) -> torch.Tensor:
    return (index[..., None] == torch.arange(size, device=index.device)).to(torch.float64)


# ---- at a refit: per-step centring, then pooling with decay ---------------------------------------------------
def step_means(rows: torch.Tensor) -> torch.Tensor:
    """(..., S) mean row loss of each step from its all-reduced ``row_sums`` (..., S, ROW_COLUMNS); NaN
    without rows."""
    n = rows[..., ROW_N]
    return torch.where(n > 0, rows[..., ROW_SUM] / n.clamp(min=1), float("nan"))


def centring(rows: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(..., S) the centring c of each step: the mean over pairs of rows of different units of
    (L_i - m)(L_j - m).

    With n rows, step sum S1 and per unit sums S_u of k_u rows: sum over such pairs of (L_i - m)(L_j - m) =
    ((S1 - n m)^2 - sum_u (S_u - k_u m)^2) / 2 and their number is (n^2 - sum_u k_u^2) / 2. NaN where the step
    has no two units (its items cannot be centred and are left out)."""
    n, total = rows[..., ROW_N], rows[..., ROW_SUM]
    within = rows[..., ROW_UNIT_SQ] - 2 * m * rows[..., ROW_UNIT_K_SUM] + m * m * rows[..., ROW_UNIT_K_SQ]
    pairs = n * n - rows[..., ROW_UNIT_K_SQ]
    return torch.where(pairs > 0, ((total - n * m) ** 2 - within) / pairs.clamp(min=1), float("nan"))


def item_moments(items: torch.Tensor, m: torch.Tensor, c: torch.Tensor, centred: bool) -> torch.Tensor:
    """(..., strata, 3) [n, sum z, sum z^2] over S steps of items (..., S, strata, ITEM_COLUMNS), each step with
    its own m (..., S) and centring c (..., S); ``centred`` is e = 1 (V and covariances), False e = 0
    (differences). Steps without a centring (c NaN: fewer than two units) are left out for every item type, so
    that the items of all quantities come from the same steps (B = cov_mask - cov_rate holds exactly)."""
    usable = torch.isfinite(c) & torch.isfinite(m)
    a = (m * m - c) if centred else torch.zeros_like(m)
    m = torch.where(usable, m, 0.0)[..., None]
    a = torch.where(usable, a, 0.0)[..., None]
    items = torch.where(usable[..., None, None], items, 0.0)
    n, p, s = items[..., ITEM_N], items[..., ITEM_P], items[..., ITEM_S]
    pp, ps, ss = items[..., ITEM_PP], items[..., ITEM_PS], items[..., ITEM_SS]
    total = p - m * s + a * n
    square = pp + m * m * ss + a * a * n - 2 * m * ps + 2 * a * p - 2 * a * m * s
    return torch.stack([n.sum(-2), total.sum(-2), square.sum(-2)], dim=-1)


def pool(pooled: torch.Tensor, block: torch.Tensor, decay: float) -> torch.Tensor:
    """Pooled moments (..., strata, POOLED_COLUMNS) after one more block (``item_moments``, weight 1), the
    earlier weights multiplied by ``decay``: sum w and sum w z, sum w z^2 by decay, sum w^2 by decay^2."""
    n, total, square = block.unbind(-1)
    return torch.stack([decay * pooled[..., W] + n, decay**2 * pooled[..., W2] + n,
                        decay * pooled[..., WZ] + total, decay * pooled[..., WZZ] + square], dim=-1)


def weighted_means(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted mean, its standard error sigma / sqrt(n_eff) and n_eff of pooled moments (..., POOLED_COLUMNS)
    (module docstring); the mean is NaN without items, the SE NaN with n_eff <= 1."""
    w, w2, wz, wzz = moments.unbind(-1)
    mean = torch.where(w > 0, wz / w.clamp(min=1e-300), float("nan"))
    n_eff = torch.where(w2 > 0, w * w / w2.clamp(min=1e-300), 0.0)
    sigma2 = (wzz - mean * wz).clamp(min=0.0) / (w - w2 / w.clamp(min=1e-300)).clamp(min=1e-300)
    se = torch.where(n_eff > 1.0, (sigma2 / n_eff.clamp(min=1e-300)).sqrt(), float("nan"))
    return mean, se, n_eff


def stratified_means(pooled: torch.Tensor, probabilities: torch.Tensor | None = None,
                     min_effective: float = MIN_EFFECTIVE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_j P_j zbar_j over the strata of pooled (..., strata, POOLED_COLUMNS), P_j = 1 / strata unless given,
    with its standard error (Var = sum_j P_j^2 se_j^2) and the strata's total n_eff. Strata are taken in order
    and a group is closed once it holds ``min_effective`` effective items; what is left at the end joins the
    last group (or, without any, is the only one)."""
    pooled = pooled.to(torch.float64)
    strata = pooled.shape[-2]
    p = torch.full((strata,), 1.0 / strata, dtype=torch.float64) if probabilities is None else \
        probabilities.to(torch.float64)
    batch = pooled.shape[:-2]
    zero = torch.zeros(batch, dtype=torch.float64)
    value, variance, n_eff = zero.clone(), zero.clone(), zero.clone()
    open_p, open_m = zero.clone(), torch.zeros(*batch, POOLED_COLUMNS, dtype=torch.float64)
    last_p, last_m = zero.clone(), torch.zeros_like(open_m)

    def commit(share, moments, where):
        mean, se, eff = weighted_means(moments)
        return (torch.where(where, value + share * mean, value), torch.where(where, variance + share**2 * se**2,
                                                                              variance),
                torch.where(where, n_eff + eff, n_eff))

    for j in range(strata):
        open_p, open_m = open_p + p[j], open_m + pooled[..., j, :]
        close = torch.where(open_m[..., W2] > 0, open_m[..., W] ** 2 / open_m[..., W2].clamp(min=1e-300), 0.0) \
            >= min_effective
        value, variance, n_eff = commit(last_p, last_m, close & (last_p > 0))
        last_p, last_m = torch.where(close, open_p, last_p), torch.where(close[..., None], open_m, last_m)
        open_p, open_m = torch.where(close, 0.0, open_p), torch.where(close[..., None], 0.0, open_m)
    value, variance, n_eff = commit(last_p + open_p, last_m + open_m, torch.ones_like(value, dtype=torch.bool))
    return value, variance.sqrt(), n_eff


def stratified_mean(pooled: torch.Tensor, probabilities: torch.Tensor | None = None,
                    min_effective: float = MIN_EFFECTIVE) -> Estimate:
    """``stratified_means`` of one quantity's pooled moments (strata, POOLED_COLUMNS) as an ``Estimate``."""
    value, se, n_eff = stratified_means(pooled, probabilities, min_effective)
    return Estimate(float(value), float(se), float(n_eff))


# ---- the quantities, the decomposition and MIRROR's rule -------------------------------------------------------
QUANTITIES = {"V": True, "cov_pair": True, "cov_mask": True, "cov_rate": True, "B": False, "cov_syrm": True}
"""Item types (module docstring) and whether their items are centred (e = 1)."""


def unit_items(loss: torch.Tensor, unit: torch.Tensor, units: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V's items, one per unit of rows: p = mean L^2, s = 2 mean L over the unit's rows, (..., R) -> (..., U),
    and the first row of each unit (whose rate gives the item's stratum). ``unit`` (R,) numbers the units
    0..``units``-1, each with at least one row; a unit with a non-finite row gives a non-finite item (left out
    by ``item_sums``)."""
    loss = loss.detach().to(torch.float64)
    finite = torch.isfinite(loss)
    loss = torch.where(finite, loss, 0.0)
    members = _one_hot(unit.to(loss.device), units)  # (R, U)
    k = members.sum(0)
    broken = torch.where((~finite).to(torch.float64) @ members > 0, float("nan"), 0.0)
    rows = torch.arange(len(unit), device=loss.device)[:, None].expand(-1, members.shape[1])
    first = torch.where(members.bool(), rows, len(unit)).amin(0)
    return (loss * loss) @ members / k + broken, 2 * (loss @ members) / k + broken, first


def pair_items(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A covariance's items from paired rows: p = x y, s = x + y."""
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    return x * y, x + y


def difference_items(base: torch.Tensor, other_mask: torch.Tensor, other_rate: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """B's items (not centred): z = (L - m)(L2 - L3), i.e. p = L (L2 - L3), s = L2 - L3."""
    base, diff = base.detach().to(torch.float64), (other_mask.detach() - other_rate.detach()).to(torch.float64)
    return base * diff, diff


def block_moments(rows: torch.Tensor, items: dict[str, torch.Tensor], previous_mean: torch.Tensor | float
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The moments (..., strata, 3) of each quantity's items over one block of S steps: ``rows``
    (..., S, ROW_COLUMNS) and ``items`` {name: (..., S, strata, ITEM_COLUMNS)}, all-reduced. Step s is centred on
    m = the mean row loss of the last earlier step with rows (``previous_mean`` (...), that of the steps before
    the block, for the first). Returns the moments and the mean to carry into the next block."""
    means = step_means(rows)
    last = torch.as_tensor(previous_mean, dtype=torch.float64).expand(means.shape[:-1]).clone()
    m = torch.empty_like(means)
    for step in range(means.shape[-1]):
        m[..., step] = last
        last = torch.where(torch.isfinite(means[..., step]), means[..., step], last)
    c = centring(rows, m)
    return {name: item_moments(table, m, c, QUANTITIES[name]) for name, table in items.items()}, last


def decomposition(pooled: dict[str, torch.Tensor]) -> dict[str, Estimate]:
    """V, A, B, C, their shares of V, the covariances and MIRROR's pair statistic from the pooled moments of
    the quantities (``QUANTITIES``; missing ones are NaN, except cov_syrm: without SyRM it is exactly 0).
    A = V - cov_mask, C = cov_rate, B from its own (difference) items; shares A / V = 1 - cov_mask / V, B / V,
    C / V = cov_rate / V, which sum to 1. The rule's sides E[(L - L')^2] / 2 = V - cov_pair (``pair_half_sq``) and
    V + cov_syrm (``rule_right``), and ``gain`` = -(cov_pair + cov_syrm) = their difference: the variance per row
    that MIRROR saves at equal rows (> 0: it pays), with the SE of the covariances (V cancels)."""
    est = {name: stratified_mean(pooled[name]) if name in pooled else NAN for name in QUANTITIES}
    if "cov_syrm" not in pooled:  # no SyRM: no such term, exactly
        est["cov_syrm"] = Estimate(0.0, 0.0, float("inf"))
    v, cov_pair, cov_mask = est["V"], est["cov_pair"], est["cov_mask"]
    cov_rate, cov_syrm = est["cov_rate"], est["cov_syrm"]
    return {**est, "A": v - cov_mask, "C": cov_rate, "pair_half_sq": v - cov_pair, "rule_right": v + cov_syrm,
            "gain": -(cov_pair + cov_syrm), "A_share": -(cov_mask.share_of(v) - Estimate(1.0, 0.0, v.n_eff)),
            "B_share": est["B"].share_of(v), "C_share": cov_rate.share_of(v)}
