"""The variance tool's stated 95% intervals (``variance/decomposition.py``) cover the exact A, B, C at their rate.

Each repetition draws the tool's nested sample (U units of one x0, J rates, K masks; standard estimator) from the
exact law of the analytic model used by ``test_variance_tool.py`` (its four blocks, doubled weights, eps = 0.3):
x0 uniform over the blocks, t ~ U(0, 1), each token masked with probability pi(t), and the loss
l = (1/n) sum_i M_i CE_i(|M|) / pi from the model's exact token-loss table, so one repetition is a tool run
without the model's forwards. ``summarize_unit`` and ``decompose`` then give the intervals, and the exact values
come from ``analytic_mdm.exact_abc``.

With R repetitions, the count of intervals that cover the exact value is Binomial(R, 0.95) when the intervals are
calibrated; the test accepts |coverage - 0.95| < z_alpha sqrt(0.95 * 0.05 / R) (alpha = 1e-4, R = 300:
+-0.049). So it fails when the standard errors are 25% too small (coverage 88%) or 50% too large (99.5%).

Measured here: 95.3% (A), 95.7% (B), 97.7% (C), 96.3% (total). Not covered by the claim (measured, see
docs/testing.md): with the tool's default --x0 = 64 units the same law gives 91-93%, and with heavy-tailed losses
(eps = 0.02, 1/pi up to 50) A and the total cover about 90% even at U = 400: the per-unit terms are skewed and
the normal approximation holds only slowly.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from analytic_mdm import AnalyticMDM, exact_abc, midpoints, moments
from mdm_scale.variance.decomposition import decompose, summarize_unit
from test_variance_tool import BLOCKS, EPS, WEIGHT

ALPHA = 1e-4
REPETITIONS = 300
UNITS, RATES, MASKS = 480, 4, 2  # the plan of test_variance_tool.py, whose tolerances these SEs set


def nested_losses(rng: np.random.Generator, ce: np.ndarray, repetitions: int) -> np.ndarray:
    """(R, U, J, K) exact-law draws of the standard estimator's loss."""
    blocks = BLOCKS[rng.integers(0, len(BLOCKS), (repetitions, UNITS))]  # (R, U, n)
    n = BLOCKS.shape[1]
    pi = (1 - EPS) * rng.random((repetitions, UNITS, RATES)) + EPS
    masked = rng.random((repetitions, UNITS, RATES, MASKS, n)) < pi[..., None, None]
    token_ce = ce[masked.sum(-1)]  # (R, U, J, K, V): the loss of every token id at the row's masked count
    ids = np.broadcast_to(blocks[:, :, None, None, :], masked.shape)
    return (masked * np.take_along_axis(token_ce, ids, -1)).sum(-1) / (n * pi[..., None])


@pytest.mark.parametrize("term", ["A", "B", "C", "total"])
def test_intervals_cover_the_exact_values_at_the_stated_rate(term, coverage):
    half_width = NormalDist().inv_cdf(1 - ALPHA / 2) * math.sqrt(0.95 * 0.05 / REPETITIONS)
    assert abs(coverage[term] - 0.95) < half_width, (term, coverage[term], half_width)


@pytest.fixture(scope="module")
def coverage() -> dict[str, float]:
    model = AnalyticMDM(weight=WEIGHT)
    ce, _ = model.tables(BLOCKS.shape[1])
    exact = exact_abc(moments(model, BLOCKS.tolist(), midpoints(0.0, 1.0), EPS, gradient=False))
    draws = nested_losses(np.random.default_rng(2024), ce, REPETITIONS)
    covered = {term: 0 for term in ("A", "B", "C", "total")}
    for values in draws:
        result = decompose([summarize_unit(unit[..., None]) for unit in values], RATES, MASKS)
        for term in covered:
            low, high = result[f"{term}_ci95"]
            covered[term] += low <= exact[term] <= high
    return {term: count / REPETITIONS for term, count in covered.items()}
