"""The EPR density family of P-POTS and its KL fit (docs/spec.md section 3.1).

Shape (the official ``_fit_powerU_w_KL``; "Exponential-Power-Root"):

    v(t) = a t^r + b (1 - t)^q          (U-shaped power law: masking-pattern variance)
    g(t) = A exp(k t^m)                 (mean loss)
    w(t) = sqrt(v(t) + g(t)^2),          p(t) proportional to w(t)

with seven free numbers z and softplus sp: a = sp(z0) + 1e-9, b = sp(z1) + 1e-9, A = sp(z2) + 1e-9,
r = 1 + sp(z3), q = 1 + sp(z4), k = sp(z5), m = 1 + sp(z6). Everything is computed in log space, so large k
cannot overflow; t is clipped to [1e-6, 1 - 1e-6].

Fit: given a target w_j >= 0 on grid points t_j, minimise KL(w_pdf || p_pdf) where both are normalised on the
grid by the trapezoid rule and the KL integral is a trapezoid sum too. Only the shape is matched (v and g are
not fitted separately). scipy L-BFGS-B with the analytic gradient, from ``restarts`` starting points
z = Z0 + N(0, 0.6^2) drawn with ``numpy.random.default_rng(seed)``, keeping the best; or from one start (a warm
start from the current z, for refits).
The result is a pure function of its inputs: the same on every rank that calls it with the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

N_PARAMS = 7
Z0 = np.array([-0.3, 0.4, -1.0, 0.3, 0.2, -0.2, 0.2])
START_SCALE = 0.6
T_CLIP = 1e-6
TIGHT = {"ftol": 1e-13, "gtol": 1e-10, "maxiter": 500}


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _log_w_and_jacobian(z: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log w(t) (n,) and its Jacobian d log w / dz (n, 7), all in log space."""
    z = np.asarray(z, dtype=np.float64)
    sp, sig = _softplus(z), 1.0 / (1.0 + np.exp(-z))
    log_a, log_b, log_big_a = np.log(sp[:3] + 1e-9)
    r, q, k, m = 1.0 + sp[3], 1.0 + sp[4], sp[5], 1.0 + sp[6]
    t = np.clip(np.asarray(t, dtype=np.float64), T_CLIP, 1.0 - T_CLIP)
    log_t, log_1mt = np.log(t), np.log1p(-t)
    left, right = log_a + r * log_t, log_b + q * log_1mt
    log_v = np.logaddexp(left, right)
    t_m = np.power(t, m)
    log_g2 = 2.0 * log_big_a + 2.0 * k * t_m
    total = np.logaddexp(log_v, log_g2)
    alpha, beta = np.exp(log_v - total), np.exp(log_g2 - total)  # shares of v and g^2 in w^2
    gamma = np.exp(left - log_v)  # share of a t^r in v
    d_inner = np.stack([0.5 * alpha * gamma, 0.5 * alpha * (1.0 - gamma), beta,  # d/d(log a, log b, log A)
                        0.5 * alpha * gamma * log_t, 0.5 * alpha * (1.0 - gamma) * log_1mt,  # d/d(r, q)
                        beta * t_m, beta * k * t_m * log_t], axis=1)  # d/d(k, m)
    d_outer = np.concatenate([sig[:3] / (sp[:3] + 1e-9), sig[3:]])  # d(log a, ..., m) / dz
    return 0.5 * total, d_inner * d_outer


def log_w(z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """log w(t) = 0.5 log(a t^r + b (1-t)^q + A^2 exp(2 k t^m)) for parameters z (7,)."""
    return _log_w_and_jacobian(z, t)[0]


def _trapezoid_weights(t: np.ndarray) -> np.ndarray:
    """c with sum_i c_i y_i = the trapezoid integral of y on the grid t."""
    gaps = np.diff(t)
    c = np.zeros_like(t)
    c[:-1] += 0.5 * gaps
    c[1:] += 0.5 * gaps
    return c


def kl_to_target(z: np.ndarray, t: np.ndarray, target_pdf: np.ndarray, log_target_pdf: np.ndarray
                 ) -> tuple[float, np.ndarray]:
    """KL(target || EPR(z)) on the grid (trapezoid rule; 0 log 0 = 0) and its gradient in z.

    With c the trapezoid weights and p_i = w_i / sum_j c_j w_j: KL = sum_i c_i f_i (log f_i - log p_i), and
    since sum_i c_i f_i = 1, dKL/dz = sum_i c_i (p_i - f_i) d log w_i / dz.
    """
    c = _trapezoid_weights(t)
    lw, jac = _log_w_and_jacobian(z, t)
    shift = lw.max()
    log_norm = np.log(np.sum(c * np.exp(lw - shift))) + shift
    log_p = lw - log_norm
    kl = float(np.sum(c * target_pdf * (log_target_pdf - log_p)))
    grad = (c * (np.exp(log_p) - target_pdf)) @ jac
    return kl, grad


@dataclass(frozen=True)
class EPRFit:
    z: np.ndarray
    kl: float


def fit_epr(t: np.ndarray, w: np.ndarray, restarts: int = 20, start: np.ndarray | None = None,
            seed: int = 0) -> EPRFit:
    """Fit the EPR shape to the target w (>= 0, not all 0) on increasing grid points t.

    With ``start`` (a warm start) one L-BFGS-B run from it; otherwise ``restarts`` runs from random starts.
    """
    t = np.asarray(t, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if t.ndim != 1 or t.shape != w.shape or len(t) < 2 or np.any(np.diff(t) <= 0):
        raise ValueError(f"fit_epr needs >= 2 increasing grid points with one target each, got t {t.shape}, "
                         f"w {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError("fit_epr needs finite, non-negative targets, not all zero")
    target = w / np.sum(_trapezoid_weights(t) * w)
    log_target = np.log(np.where(target > 0, target, 1.0))
    if start is not None:
        starts = [np.asarray(start, dtype=np.float64)]
    else:
        noise = np.random.default_rng(seed).normal(0.0, START_SCALE, size=(restarts, N_PARAMS))
        starts = list(Z0 + noise)
    # A cold fit converges tightly; a warm refit stops at scipy's default tolerances (a few ms: the target is
    # noisy at that level anyway).
    options = TIGHT if start is None else {}
    best = None
    with threadpool_limits(1, user_api="blas"):  # L-BFGS-B's 7-dimensional BLAS calls: threads only cost
        for z_start in starts:
            result = minimize(kl_to_target, z_start, args=(t, target, log_target), method="L-BFGS-B", jac=True,
                              options=options)
            kl = float(result.fun)
            if np.isfinite(kl) and (best is None or kl < best.kl):
                best = EPRFit(z=np.asarray(result.x, dtype=np.float64), kl=kl)
    if best is None:
        raise RuntimeError("EPR fit failed from every starting point")
    return best
