"""An analytic masked-diffusion model: its per-token loss is a known function of the mask, so every moment of the
training estimator (docs/spec.md sections 1-3) is an exact finite sum. Used by the estimator and variance-tool tests.

**Model.** Row r of a corrupted batch holds S_r [MASK] tokens. Each loss position of row r gets the hidden vector
h(S_r) = (1, S_r) (with ``context=False``: (1, 0)), and the real masked head (``models/masked_head.py``) computes

    CE_i = logsumexp_v (W h)_v - (W h)_{y_i},        loss = sum_i coef_i CE_i,

with W (V x 2) the trainable parameter. CE_i depends on the token y_i and, through S, on how many tokens of its
row are masked (more masked context, higher loss), so E[l | t] rises with t. dCE_i/dW = (softmax(W h) - e_{y_i}) h^T.

**Exact moments.** One row with eligible tokens y_1..y_n, inclusion probabilities q_i(t) and mask m has the
unweighted loss l(m) = (1/n) sum_i m_i CE_i(|m|) / q_i. Enumerating the 2^n Bernoulli masks (MIRROR: the 4^n joint
states of a pair, per token (1,0), (0,1) with probability min(q, 1-q) each, (1,1) with max(0, 2q-1) and (0,0) with
max(0, 1-2q)) gives E[l | t] and E[l^2 | t] and the same for the gradient, exactly. Integrals over t use composite
Gauss-Legendre on pieces where the integrand is analytic (breaks at the kinks of MIRROR, ISAD and mirror_plus),
exact to ~1e-12 relative.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mdm_scale.core.batch import Batch
from mdm_scale.models.masked_head import chunked_linear_cross_entropy
from mdm_scale.models.modeling_mdm import MDMOutput

PAD, BOS, MASK, VOCAB = 0, 1, 2, 8
# Column 0: bias of each class's logit; column 1: its slope in S. Real tokens (3..7) lose logit as more of the
# row is masked, so CE grows from about 1 (S = 0) to 4-6 (S = 6).
W0 = torch.tensor([[-1.5, 0.4], [-1.5, 0.4], [-1.0, 0.4], [1.4, -0.6], [1.0, -0.5], [0.6, -0.4], [0.2, -0.5],
                   [-0.2, -0.6]], dtype=torch.float64)
PARAMS = W0.numel()
# SFT rows: (prompt, response); the response is what gets masked. Widths 8 (pads after the shorter rows).
SFT_ROWS = (([BOS, 3], [4, 5, 3, 7]), ([BOS], [6, 6, 4, 3, 5]), ([BOS, 7, 7, 4], [3, 7, 6]))
WIDTH = 8


def features(masked_count: torch.Tensor, context: bool) -> torch.Tensor:
    """h(S) = (1, S), or (1, 0) without context; float64 (N, 2)."""
    s = masked_count.to(torch.float64) if context else torch.zeros_like(masked_count, dtype=torch.float64)
    return torch.stack([torch.ones_like(s), s], dim=1)


class AnalyticMDM(nn.Module):
    """Takes a ``NoisyBatch.model_inputs()`` like the built-in model and returns its loss through the real head."""

    def __init__(self, context: bool = True, weight: torch.Tensor = W0):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.context = context

    def forward(self, input_ids, attention_mask=None, loss_positions=None, loss_targets=None, loss_coef=None):
        rows = loss_positions // input_ids.shape[1]
        hidden = features((input_ids == MASK).sum(1)[rows], self.context)
        loss, ce = chunked_linear_cross_entropy(hidden, self.weight, loss_targets, loss_coef, chunk=4096)
        return MDMOutput(loss=loss, token_ce=ce)

    @torch.no_grad()
    def tables(self, max_count: int) -> tuple[np.ndarray, np.ndarray]:
        """CE[S, y] (S+1, V) and dCE/dW[S, y] (S+1, V, PARAMS) for S = 0..max_count."""
        h = features(torch.arange(max_count + 1), self.context)  # (S, 2)
        logits = h @ self.weight.detach().T  # (S, V)
        ce = torch.logsumexp(logits, 1, keepdim=True) - logits
        residual = torch.softmax(logits, 1)[:, None, :] - torch.eye(VOCAB, dtype=torch.float64)[None]  # (S, y, V)
        grad = residual[..., None] * h[:, None, None, :]  # (S, y, V, 2)
        return ce.numpy(), grad.reshape(max_count + 1, VOCAB, PARAMS).numpy()


def sft_batch(copies: int, rows=SFT_ROWS, first_index: int = 0) -> Batch:
    """``copies`` repetitions of the SFT rows, row b having sample index first_index + b (its own noise)."""
    ids = torch.full((len(rows), WIDTH), PAD, dtype=torch.int64)
    eligible = torch.zeros(len(rows), WIDTH, dtype=torch.bool)
    for b, (prompt, response) in enumerate(rows):
        ids[b, :len(prompt) + len(response)] = torch.tensor(prompt + response)
        eligible[b, len(prompt):len(prompt) + len(response)] = True
    real = ids != PAD
    n = copies * len(rows)
    return Batch(input_ids=ids.repeat(copies, 1), loss_mask=eligible.repeat(copies, 1),
                 sample_index=torch.arange(first_index, first_index + n), attention_mask=real.repeat(copies, 1))


# ---- exact moments ----------------------------------------------------------------------------------------------
def gauss_legendre(breaks, nodes: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights of composite Gauss-Legendre quadrature on the pieces between sorted ``breaks``."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    edges = np.unique(np.asarray(breaks, dtype=np.float64))
    lo, hi = edges[:-1, None], edges[1:, None]
    return ((lo + hi) / 2 + (hi - lo) / 2 * x).ravel(), ((hi - lo) / 2 * w).ravel()


def t_breaks(eps: float, extra=()) -> list[float]:
    """[0, 1] cut where 1/pi(t) = 1/((1 - eps) t + eps) varies fastest (near 0), and at ``extra`` kinks."""
    return sorted({0.0, 0.01, 0.03, 0.1, 0.3, 1.0, *extra})


def mirror_kink(eps: float) -> float:
    """The t where pi(t) = 1/2: MIRROR's joint mask law changes form there."""
    return (0.5 - eps) / (1 - eps)


@dataclass
class Moments:
    """Per (x0, t): f = E[l], s = E[l^2], and for the gradient g = E[dl/dW] (.., P), g2 = E[(dl/dW)^2] per
    component; all over the masks (one row, or a MIRROR pair combined by its row shares)."""

    f: np.ndarray  # (X, T)
    s: np.ndarray  # (X, T)
    g: np.ndarray  # (X, T, P or d)
    g2: np.ndarray  # (X, T, P or d)


def _row_loss(masks: np.ndarray, tokens: np.ndarray, q: np.ndarray, ce: np.ndarray, grad: np.ndarray):
    """l and dl/dW of each mask (m, n) at inclusion q (T, n): shapes (T, m) and (T, m, P)."""
    count = masks.sum(1).astype(int)  # (m,)
    contrib = masks[None] / q[:, None, :] / len(tokens)  # (T, m, n)
    return (contrib * ce[count][:, tokens][None]).sum(-1), np.einsum("tmn,mnp->tmp", contrib, grad[count][:, tokens])


def moments(model: AnalyticMDM, token_rows, t: np.ndarray, eps: float, mirror: bool = False,
            single_above: float | None = None, boosted=(), delta: float = 0.0,
            projection: np.ndarray | None = None, gradient: bool = True) -> Moments:
    """Exact mask moments of the loss and its gradient for each row of eligible tokens in ``token_rows``; with
    ``projection`` (d, P) the gradient is replaced by its projection (a gradient sketch is a linear map); without
    ``gradient``, g and g2 have no columns (faster)."""
    longest = max(len(r) for r in token_rows)
    ce, grad = model.tables(longest)
    if projection is not None:
        grad = grad @ projection.T
    if not gradient:
        grad = grad[..., :0]
    pi = (1 - eps) * t + eps
    out = []
    for row in token_rows:
        tokens = np.asarray(row)
        n = len(tokens)
        q = np.repeat(pi[:, None], n, 1)
        q = np.where(np.isin(tokens, boosted)[None], np.minimum(q + delta, 1.0), q)
        if not mirror:
            masks = np.array(list(itertools.product([0.0, 1.0], repeat=n)))
            prob = np.prod(np.where(masks[None] == 1, q[:, None], 1 - q[:, None]), -1)
            loss, dloss = _row_loss(masks, tokens, q, ce, grad)
        else:
            states = np.array(list(itertools.product(range(4), repeat=n)))
            first, second = np.isin(states, (0, 2)).astype(float), np.isin(states, (1, 2)).astype(float)
            lo = np.minimum(q, 1 - q)
            law = np.stack([lo, lo, np.maximum(0, 2 * q - 1), np.maximum(0, 1 - 2 * q)], -1)  # (T, n, 4)
            prob = np.prod(np.take_along_axis(law[:, None], states[None, :, :, None], -1)[..., 0], -1)
            (l1, g1), (l2, g2) = _row_loss(first, tokens, q, ce, grad), _row_loss(second, tokens, q, ce, grad)
            paired = np.ones_like(t, dtype=bool) if single_above is None else t < single_above
            share = np.where(paired, 0.5, 1.0)[:, None]
            loss = share * l1 + (1 - share) * l2
            dloss = share[..., None] * g1 + (1 - share[..., None]) * g2
        out.append(((prob * loss).sum(1), (prob * loss**2).sum(1), np.einsum("tm,tmp->tp", prob, dloss),
                    np.einsum("tm,tmp->tp", prob, dloss**2)))
    return Moments(*(np.stack(parts) for parts in zip(*out)))


def eligible_tokens(batch_rows=SFT_ROWS) -> list[list[int]]:
    return [response for _, response in batch_rows]


def midpoints(lo: float, hi: float, n: int = 2000) -> np.ndarray:
    return lo + (hi - lo) * (np.arange(n) + 0.5) / n


def exact_abc(m: Moments, gradient: bool = False, coupling: str = "independent", group: int = 1,
              density: np.ndarray | None = None) -> dict:
    """Exact A, B, C (docs/spec.md section 2) of one sequence's loss (or, ``gradient``, traces for its gradient) from
    moments on a midpoint grid of t (symmetric about 1/2, splittable into ``group`` strata), x0 uniform over the
    rows. With an importance ``density`` p (T,) on the grid (t ~ p, weight 1/p): A = int a/p dt and
    B = int |f|^2/p dt - |int f dt|^2 per x0. SyRM adds Cov_t(fbar(t), fbar(1 - t)); StraTS over ``group``
    strata removes the between-strata variance of fbar (both per sequence of the coupled unit)."""
    vec = m.g if gradient else m.f[..., None]
    a = (m.g2 - m.g**2).sum(-1) if gradient else m.s - m.f**2
    per_x = vec.mean(1)  # (X, d)
    p = np.ones(a.shape[1]) if density is None else density
    big_a = (a / p).mean()
    big_b = ((vec**2).sum(-1) / p).mean(1).mean() - (per_x**2).sum(-1).mean()
    big_c = ((per_x - per_x.mean(0)) ** 2).sum(-1).mean()
    fbar, mu = vec.mean(0), per_x.mean(0)  # (T, d), (d,)
    if coupling == "symmetric":
        big_b += (fbar * fbar[::-1]).sum(-1).mean() - (mu**2).sum()
    if coupling == "stratified":
        strata = fbar.reshape(group, -1, fbar.shape[-1]).mean(1)
        big_b -= ((strata - mu) ** 2).sum(-1).mean()
    return {"A": big_a, "B": big_b, "C": big_c, "total": big_a + big_b + big_c, "mean": float(mu[0])}
