"""P-POTS: the importance t-sampler fitted to the loss, refitted during training (docs/spec.md sections 2 and 3.1).

**Target.** For the weighted estimator ell(t) / p(t) with t ~ p, Var = integral E[ell_t^2] / p(t) dt - const,
minimised over densities by p*(t) proportional to sqrt(E[ell_t^2]) (Cauchy-Schwarz), where ell_t is the
unweighted per-sequence loss at rate t (with MIRROR: the mean of the pair, the quantity that is weighted).
E[ell_t^2] = v(t) + s(t): masking-pattern variance plus the mean square over x0 of the mask-averaged loss
(docs/spec.md section 2; the released code uses the square of the x0-averaged loss instead of s, which drops the
data spread). Statistics per t-bin (count, sum, sum of squares, with MIRROR the pair count and the sum of
(ell_1 - ell_2)^2) give w_j = sqrt(sum of squares / count) at the bin centres; the EPR shape (``epr.py``) is
fitted to w by KL.

**Density actually sampled.** The fitted EPR curve is evaluated at ``DENSITY_CELLS + 1`` equally spaced nodes
on [0, 1] and p is the piecewise-linear interpolation of those values, normalised by its exact integral (the
trapezoid sum of a piecewise-linear function). Its CDF is piecewise quadratic and is inverted in closed form,
and the weight is 1 / p(t) at the returned t. So the support is all of [0, 1] (no truncation: the official
grid [1/T, 1 - 1/T] gives E[weight] = 1 - 2/T) and E_p[f(t) / p(t)] = integral_0^1 f(t) dt holds exactly for
the density used, however well it approximates the EPR curve. Options: mixing with the uniform density,
p <- (1 - lambda) p + lambda, and a weight cap ``max_weight`` implemented as the smallest extra mixing that
makes p >= 1 / max_weight everywhere, so capped weights stay exactly unbiased (clipping weights would not).

**Service** (``service.py``). ``observe`` adds each micro-batch's statistics (bins x 5, float64, one-hot matrix
product: deterministic, no host sync) to its pooled sums (``pooled_sums.py``). Every ``refit_every`` optimiser
steps ``on_optimizer_step`` pools them over ranks (one all-reduce of 5 x bins floats, decay
0.5^(refit_every / half_life)), and rank 0 refits from the current parameters (warm start) and broadcasts the
new density, so every rank samples from bit-identical p(t) from the next step on. A fit that fails on rank 0
(e.g. an EPR curve whose log-range underflows the density to zero somewhere) keeps the current density on every
rank: the broadcast's first number says that no new density comes, and rank 0 prints why.
"""

from __future__ import annotations

import numpy as np
import torch

from mdm_scale.config.variance import PPOTSConfig
from mdm_scale.diffusion.epr import fit_epr, log_w
from mdm_scale.diffusion.pooled_sums import PooledSums
from mdm_scale.diffusion.service import LogValue
from mdm_scale.diffusion.t_samplers import TSampler
from mdm_scale.distributed.env import broadcast_from_main

DENSITY_CELLS = 1024
COUNT, SUM, SUMSQ, PAIRS, PAIR_SQ = range(5)
STAT_COLUMNS = 5
_DRAW_LOG_LIMIT = 1 << 16  # drawn (t, weight) kept between two log_statistics calls


class PiecewiseLinearDensity:
    """A density on [0, 1], linear between ``len(values)`` equally spaced nodes, normalised exactly."""

    def __init__(self, values: torch.Tensor):
        values = values.to(torch.float64)
        if values.ndim != 1 or len(values) < 2 or not bool(torch.isfinite(values).all()) or \
                bool((values <= 0).any()):
            raise ValueError("a piecewise-linear density needs >= 2 finite, positive node values")
        self.cells = len(values) - 1
        self.h = 1.0 / self.cells
        area = 0.5 * self.h * (values[1:] + values[:-1])
        total = area.sum()
        self.values = values / total
        self.cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(area / total, 0)])
        self.cdf[-1] = 1.0
        self._device_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # (values, cdf) on another device

    @classmethod
    def uniform(cls, cells: int = DENSITY_CELLS) -> PiecewiseLinearDensity:
        return cls(torch.ones(cells + 1, dtype=torch.float64))

    def mixed(self, mix_uniform: float, max_weight: float | None) -> PiecewiseLinearDensity:
        """(1 - lambda) p + lambda, lambda = max(mix_uniform, the least mixing giving p >= 1 / max_weight)."""
        lam = mix_uniform
        if max_weight is not None:
            floor, lowest = 1.0 / max_weight, float(self.values.min())
            if lowest < floor:
                lam = max(lam, (floor - lowest) / (1.0 - lowest))
        if lam == 0.0:
            return self
        return PiecewiseLinearDensity((1.0 - lam) * self.values + lam)

    def cdf_at(self, t: torch.Tensor) -> torch.Tensor:
        """F(t), float64, on t's device: inside cell k, C_k + p_k x + s x^2 / 2 with x = t - k h and s the cell's
        slope. The node tables are copied to a device once per density (no copy per call)."""
        values, cdf = self._tables(t.device)
        k, x = self._cell(t)
        p_k = values.index_select(0, k)
        slope = (values.index_select(0, k + 1) - p_k) / self.h
        return (cdf.index_select(0, k) + p_k * x + 0.5 * slope * x * x).clamp(0.0, 1.0)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device_tables is None or self._device_tables[0].device != device:
            self._device_tables = (self.values.to(device), self.cdf.to(device))
        return self._device_tables

    def _cell(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cell k of each t (clamped to [0, 1]; t = 1 in the last cell) and x = t - k h, float64."""
        t = t.to(torch.float64).clamp(0.0, 1.0)
        k = (t / self.h).floor().clamp(max=self.cells - 1).long()
        return k, t - k.to(torch.float64) * self.h

    def pdf(self, t: torch.Tensor) -> torch.Tensor:
        k, x = self._cell(t)
        left, right = self.values.index_select(0, k), self.values.index_select(0, k + 1)
        return left + (right - left) * (x / self.h)

    def inverse_cdf(self, u: torch.Tensor) -> torch.Tensor:
        """t with CDF(t) = u, float64. Inside cell k the CDF is C_k + p_k x + s x^2 / 2 (s the slope), so
        x = 2 r / (p_k + sqrt(p_k^2 + 2 s r)) with r = u - C_k (the stable root, exact also for s = 0)."""
        u = u.to(torch.float64)
        k = (torch.searchsorted(self.cdf, u, right=True) - 1).clamp(0, self.cells - 1)
        r = (u - self.cdf.index_select(0, k)).clamp(min=0.0)
        p_k = self.values.index_select(0, k)
        slope = (self.values.index_select(0, k + 1) - p_k) / self.h
        root = torch.sqrt((p_k * p_k + 2.0 * slope * r).clamp(min=0.0))
        x = (2.0 * r / (p_k + root).clamp(min=1e-300)).clamp(0.0, self.h)
        return k.to(torch.float64) * self.h + x


def epr_density(z: np.ndarray, cells: int = DENSITY_CELLS) -> PiecewiseLinearDensity:
    """The EPR curve with parameters z on the node grid, as a piecewise-linear density."""
    nodes = np.linspace(0.0, 1.0, cells + 1)
    log_values = log_w(z, nodes)
    return PiecewiseLinearDensity(torch.from_numpy(np.exp(log_values - log_values.max())))


def bin_centres(bins: int) -> np.ndarray:
    return (np.arange(bins) + 0.5) / bins


def t_bin(t: torch.Tensor, bins: int) -> torch.Tensor:
    return (t * bins).floor().clamp(0, bins - 1).long()


def bin_statistics(t: torch.Tensor, sample_loss: torch.Tensor, pair_sq_diff: torch.Tensor | None, bins: int,
                   loss_max: float | None = None) -> torch.Tensor:
    """(bins, 5) float64 sums [count, sum loss, sum loss^2, pairs, sum pair sq diff] of one batch, on the
    losses' device, by a one-hot matrix product (deterministic on GPU, unlike atomic scatter-adds).

    Non-finite losses (a step the non-finite guard skips) are left out, so one bad step cannot poison the
    statistics; a NaN pair difference marks a sequence without a MIRROR pair (``variance.masks.single_above``)."""
    loss = sample_loss.detach().to(torch.float64)
    finite = torch.isfinite(loss)
    loss = torch.where(finite, loss, 0.0)
    if loss_max is not None:
        loss = loss.clamp(max=loss_max)
    if pair_sq_diff is None:
        paired = torch.zeros_like(loss, dtype=torch.bool)
        pair_sq = torch.zeros_like(loss)
    else:
        d = pair_sq_diff.detach().to(torch.float64)
        paired = torch.isfinite(d) & finite
        pair_sq = torch.where(paired, d, 0.0)
    columns = torch.stack([finite.to(torch.float64), loss, loss * loss, paired.to(torch.float64), pair_sq], dim=1)
    one_hot = (t_bin(t.to(loss.device), bins)[:, None] == torch.arange(bins, device=loss.device)[None, :])
    return one_hot.to(torch.float64).T @ columns


def fit_target(statistics: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Grid points and targets w_j = sqrt(E[loss^2 | bin j]) of the bins that hold samples."""
    stats = statistics.to(torch.float64).numpy()
    filled = stats[:, COUNT] > 0
    t = bin_centres(len(stats))[filled]
    w = np.sqrt(np.maximum(stats[filled, SUMSQ] / stats[filled, COUNT], 0.0))
    return t, w


class PPOTSSampler(TSampler, config=PPOTSConfig):
    """t ~ p(t) by inverse CDF, weight 1 / p(t); p refitted from training statistics (module docstring).

    Until the first fit (the offline estimate, ``training/ppots_estimate.py``, or the first refit) p is
    uniform.
    """

    name = "ppots"

    def __init__(self, seed: int, settings: PPOTSConfig):
        super().__init__(seed)
        self.settings = settings
        self.density = PiecewiseLinearDensity.uniform()
        self.z: np.ndarray | None = None
        self.sums = PooledSums((settings.bins, STAT_COLUMNS), settings.refit_every, settings.decay)
        self.refits = 0
        self.failures = 0  # fits that raised on rank 0 (the density was kept); counted on rank 0 only
        self._drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._drawn_count = 0
        self._plotted_refits = -1

    # ---- drawing --------------------------------------------------------------------------------------------
    def transform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.density.inverse_cdf(u).to(torch.float32)
        weight = (1.0 / self.density.pdf(t)).to(torch.float32)  # at the float32 t the model sees
        self._record(t, weight)
        return t, weight

    def quantile(self, t: torch.Tensor) -> torch.Tensor:
        """u = F(t) under the current density (the one that draws until the next refit)."""
        return self.density.cdf_at(t)

    def _record(self, t: torch.Tensor, weight: torch.Tensor) -> None:
        if self._drawn_count < _DRAW_LOG_LIMIT:
            self._drawn.append((t, weight))
            self._drawn_count += len(t)

    @classmethod
    def from_config(cls, config: PPOTSConfig, seed: int) -> PPOTSSampler:
        return cls(seed, config)

    @property
    def statistics(self) -> torch.Tensor:
        """The pooled per-bin statistics (bins, 5) the fits use, the same on every rank."""
        return self.sums.statistics

    # ---- the service ----------------------------------------------------------------------------------------
    def observe(self, micro) -> None:
        """Per-bin sums of the micro-batch's per-sequence target: the unweighted loss (with MIRROR, the pair's
        mean and squared difference), or the gradient-norm proxy (``settings.target``)."""
        if self.settings.target == "grad":
            self.add(micro.t, micro.sample_grad_norm, None)
        else:
            self.add(micro.t, micro.sample_loss, micro.pair_sq_diff)

    def add(self, t: torch.Tensor, sample_loss: torch.Tensor, pair_sq_diff: torch.Tensor | None) -> None:
        """t (B,), the per-sequence target (B,) and, with MIRROR, the squared difference of the two rows' losses
        (B,; NaN where a sequence has one row). Device tensors; no sync."""
        self.sums.add(bin_statistics(t, sample_loss, pair_sq_diff, self.settings.bins, self.settings.loss_max))

    def changes_after(self, step: int) -> bool:
        return self.sums.due(step)

    def on_optimizer_step(self, step: int) -> bool:
        """At a refit step: pool the statistics over ranks and refit. Returns True if it refitted."""
        if not self.sums.due(step):
            return False
        self.sums.pool()
        self.refit(self.sums.pending_sums.device)
        return True

    def update(self, new_statistics: torch.Tensor, device: torch.device | str = "cpu") -> None:
        """Add ``new_statistics`` (the same on every rank, e.g. the offline estimate's) with decay and refit."""
        self.sums.accumulate(new_statistics)
        self.refit(device)

    def refit(self, device: torch.device | str = "cpu") -> None:
        """Refit on rank 0 from the pooled statistics and broadcast the result over ``device`` (where the
        collectives run). The payload's first number says whether rank 0 has a new density: without one (too
        little data, or a fit that failed: rank 0 logs why) every rank keeps the current density, so a fit that
        raises on rank 0 alone never leaves the other ranks waiting in the broadcast."""
        z, density = self._fit_or_keep() if _is_main() else (None, None)
        cells = self.density.cells
        payload = torch.zeros(1 + 7 + cells + 1, dtype=torch.float64)
        if density is not None:
            payload[0] = 1.0
            payload[1:8] = torch.from_numpy(z)
            payload[8:] = density.values
        payload = broadcast_from_main(payload.to(device)).cpu()
        if payload[0] == 1.0:
            self.z = payload[1:8].numpy().copy()
            self.density = PiecewiseLinearDensity(payload[8:])
            self.refits += 1

    def _fit_or_keep(self) -> tuple[np.ndarray, PiecewiseLinearDensity] | tuple[None, None]:
        """``_fit``'s result, or (None, None) with the reason printed when it raises: e.g. an EPR curve whose
        log-range exceeds the float range underflows to zero density somewhere, which
        ``PiecewiseLinearDensity`` refuses. Any exception counts (the other ranks wait in the broadcast for
        whatever rank 0 sends); the run goes on with the current density and ``refit_failures`` counts it."""
        try:
            return self._fit()
        except Exception as err:  # noqa: BLE001 -- see the docstring: never leave the other ranks waiting
            self.failures += 1
            print(f"P-POTS refit {self.refits + 1}: the fit failed ({type(err).__name__}: {err}); every rank keeps "
                  f"the current p(t)", flush=True)
            return None, None

    def _fit(self) -> tuple[np.ndarray, PiecewiseLinearDensity] | tuple[None, None]:
        t, w = fit_target(self.statistics)
        if len(t) < 2 or not np.any(w > 0):
            return None, None  # too little data: keep the current density
        fit = fit_epr(t, w, restarts=self.settings.restarts, start=self.z)
        density = epr_density(fit.z, self.density.cells).mixed(self.settings.mix_uniform, self.settings.max_weight)
        return fit.z, density

    # ---- logging and checkpoints ----------------------------------------------------------------------------
    def log_statistics(self) -> dict[str, LogValue]:
        values: dict[str, LogValue] = {"refits": float(self.refits), "refit_failures": float(self.failures)}
        if self._drawn:
            t = torch.cat([d[0] for d in self._drawn])
            w = torch.cat([d[1] for d in self._drawn]).to(torch.float64)
            values.update(weight_max=float(w.max()), weight_mean=float(w.mean()),
                          weight_ess=float(w.sum() ** 2 / (len(w) * (w * w).sum())), drawn_t=t)
            self._drawn, self._drawn_count = [], 0
        if self.refits != self._plotted_refits:  # a figure costs ~0.1 s: draw one per new fit
            density, statistics = self.density, self.statistics.clone()
            values["density"] = lambda: plot_density(density, statistics)
            self._plotted_refits = self.refits
        return values

    def state_dict(self) -> dict:
        return {"bins": self.settings.bins, "z": None if self.z is None else torch.from_numpy(self.z.copy()),
                "density": self.density.values.clone(), **self.sums.state_dict(), "refits": self.refits}

    def load_state_dict(self, state: dict, pending_from: list[dict] | None = None) -> None:
        """Restore; ``pending_from``: the states of the old ranks whose pending statistics this rank takes over
        after a change of the world size (``NoiseService.load_rank_states``)."""
        if state.get("bins") != self.settings.bins:
            raise ValueError(f"the checkpoint's P-POTS state has {state.get('bins')} bins and "
                             f"variance.t_sampler.bins is {self.settings.bins}")
        self.z = None if state["z"] is None else state["z"].numpy().astype(np.float64)
        self.density = PiecewiseLinearDensity(state["density"])
        self.sums.load_state_dict(state, pending_from)
        self.refits = int(state["refits"])

    def load_rank_states(self, states: list[dict], main: dict) -> None:
        """The pooled statistics and the density (the same on every rank) from rank 0's state, the pending
        statistics summed over the old ranks this rank takes over."""
        self.load_state_dict(main, pending_from=states)


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def plot_density(density: PiecewiseLinearDensity, statistics: torch.Tensor):
    """Figure: p(t) with the normalised target, and the per-bin loss mean and variance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    nodes = np.linspace(0.0, 1.0, density.cells + 1)
    top.plot(nodes, density.values.numpy(), label="p(t) sampled")
    t, w = fit_target(statistics)
    if len(t) >= 2 and np.any(w > 0):
        top.plot(t, w / np.sum(0.5 * (w[1:] + w[:-1]) * np.diff(t)), ".", label="target sqrt(E[loss^2])")
    top.set_ylabel("density")
    top.legend()
    stats = statistics.numpy()
    filled = stats[:, COUNT] > 0
    centres = bin_centres(len(stats))[filled]
    mean = stats[filled, SUM] / stats[filled, COUNT]
    var = np.maximum(stats[filled, SUMSQ] / stats[filled, COUNT] - mean**2, 0.0)
    bottom.plot(centres, mean, label="loss mean")
    bottom.plot(centres, var, label="loss variance")
    pairs = stats[:, PAIRS] > 0
    if pairs.any():
        bottom.plot(bin_centres(len(stats))[pairs], stats[pairs, PAIR_SQ] / (2 * stats[pairs, PAIRS]),
                    label="MIRROR pair (l1-l2)^2 / 2")
    bottom.set_xlabel("t")
    bottom.set_yscale("symlog")
    bottom.legend()
    fig.tight_layout()
    return fig

