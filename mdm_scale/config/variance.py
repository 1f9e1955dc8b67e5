"""The ``variance`` section: how the diffusion noise is drawn and measured (``mdm_scale/diffusion``, docs/spec.md
sections 1-3, docs/variance.md).

    variance:
      t_sampler: {name: ppots, refit_every: 50}   # a kind of TSamplerConfig: uniform, ppots, clipped, ...
      masks: {name: mirror}                       # a kind of MaskConfig: bernoulli, mirror, auto, ...
      t_coupling: independent                     # StraTS / SyRM: how the rates of one batch are coupled
      eps: 1.0e-3
      isad: {token_ids: [], delta: 0.2}           # token-level importance sampling, for every mask generator
      ema: {bins: 0, rate: 0.01}                  # the EMA control variate of the logged loss
      probe: {every: 25, fraction: 0.0625}        # the online A/B/C probe
      monitor: {every: 50, half_life: 200.0}      # the online A/B/C estimates (and mirror auto's decisions)

``t_sampler`` and ``masks`` are families of kinds (``config/choice.py``): a new kind is a dataclass subclass
with ``name: str = "<its name>"`` and its own fields and ``check``; its component registers against it in
``mdm_scale/diffusion`` (``docs/extending.md``). The keys of the flat section that came before are still read,
with a deprecation note naming the new key (``config/legacy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mdm_scale.config.choice import Choice
from mdm_scale.config.errors import require


def decay_factor(every: int, half_life: float) -> float:
    """Factor on pooled statistics at each pooling every ``every`` steps with half-life ``half_life`` steps
    (1 = no decay): 0.5^(every / half_life)."""
    return 0.5 ** (every / half_life) if half_life > 0 else 1.0


# ---- t-samplers ---------------------------------------------------------------------------------------------
@dataclass
class TSamplerConfig(Choice, family="variance.t_sampler"):
    """Distribution of the masking rate t per sequence (``diffusion/t_samplers.py``)."""

    unbiased: ClassVar[bool] = True
    """Whether the weighted loss estimates the standard objective (the EMA control variate needs it)."""


@dataclass
class UniformTConfig(TSamplerConfig):
    """t ~ U(0, 1), weight 1."""

    name: str = "uniform"


@dataclass
class PPOTSConfig(TSamplerConfig):
    """P-POTS: t ~ p(t) with weight 1/p(t), p fitted to the loss (``diffusion/ppots.py``, docs/spec.md section 3.1),
    first by an offline estimate before step 1 (``training/ppots_estimate.py``), then refitted from the training
    losses."""

    name: str = "ppots"
    display: ClassVar[str] = "P-POTS"
    x0: int = 10
    """Offline estimate before the first step: training sequences used (split over ranks); 0 skips it (p starts
    uniform and is fitted at the first refit)."""
    masks: int = 10
    """Offline estimate: mask draws per (sequence, t) (each draw is a pair with MIRROR)."""
    bins: int = 64
    """t-bins of the statistics; the offline estimate evaluates t at the bin centres."""
    forward_tokens: int | None = None
    """Offline estimate: token budget of one no-grad forward. A forward holds (t, mask) draws of one sequence: up
    to this // data.seq_len rows (half as many draws with MIRROR's pairs), at least train.micro_batch_size draws
    (``training/ppots_estimate.py``). null: 65,536 on GPU; on CPU one micro-batch of draws (large forwards
    measured slower per row there under ZeRO-3)."""
    restarts: int = 20
    """Random starts of the first EPR fit (later refits start from the current parameters)."""
    refit_every: int = 50
    """Optimiser steps between refits from the training losses (one all-reduce each); 0 = never refit."""
    half_life: float = 200.0
    """Half-life in optimiser steps of the accumulated statistics; 0 = no decay."""
    mix_uniform: float = 0.0
    """Defensive mixing p <- (1 - lambda) p + lambda with the uniform density."""
    max_weight: float | None = None
    """Cap on the importance weight 1/p(t), enforced by mixing in just enough uniform density (stays unbiased)."""
    target: Literal["loss", "grad"] = "loss"
    """What p(t) is fitted proportional to sqrt(E[x^2 | t]) of: ``loss``, the per-sequence loss l (the paper);
    ``grad``, a per-sequence gradient-norm proxy, the norm of the gradient of l with respect to its masked
    tokens' logits (``NoisyBatch.sample_grad_norms``, no extra backward). Measured in docs/variance.md."""
    loss_max: float | None = None
    """Clamp per-sequence losses at this value in the P-POTS statistics only (the official code used 10)."""

    @property
    def decay(self) -> float:
        """Factor applied to the accumulated statistics at each refit (1 = no decay)."""
        return decay_factor(self.refit_every, self.half_life)

    def check(self, config) -> None:
        for name in ("x0", "refit_every"):
            require(getattr(self, name) >= 0, self.key(name), getattr(self, name), "must be >= 0")
        for name in ("masks", "restarts"):
            require(getattr(self, name) >= 1, self.key(name), getattr(self, name), "must be >= 1")
        require(self.forward_tokens is None or self.forward_tokens >= 1, self.key("forward_tokens"),
                self.forward_tokens, "must be >= 1 or null")
        require(self.masks >= 2 or config.variance.masks.rows_per_sequence == 2, self.key("masks"), self.masks,
                "must be >= 2 without MIRROR (the mask variance needs two draws)")
        require(2 <= self.bins <= 4096, self.key("bins"), self.bins, "must be in [2, 4096]")
        require(self.half_life >= 0, self.key("half_life"), self.half_life, "must be >= 0")
        require(0.0 <= self.mix_uniform < 1.0, self.key("mix_uniform"), self.mix_uniform, "must be in [0, 1)")
        require(self.max_weight is None or self.max_weight > 1.0, self.key("max_weight"), self.max_weight,
                "must be > 1 (p(t) = 1 everywhere is the uniform density)")
        require(self.loss_max is None or self.loss_max > 0, self.key("loss_max"), self.loss_max, "must be > 0")


@dataclass
class ClippedTConfig(TSamplerConfig):
    """t ~ U[low, high] with weight 1: the BD3-LM baseline, *biased* (``diffusion/clipped_t.py``)."""

    name: str = "clipped"
    display: ClassVar[str] = "Clipped"
    unbiased: ClassVar[bool] = False
    low: float = 0.3
    """Lower end beta of U[beta, omega]."""
    high: float = 0.8
    """Upper end omega of U[beta, omega]."""

    def check(self, config) -> None:
        require(0.0 <= self.low < self.high <= 1.0, self.key("low"), (self.low, self.high),
                "need 0 <= low < high <= 1")


# ---- mask generators ----------------------------------------------------------------------------------------
@dataclass
class MaskConfig(Choice, family="variance.masks"):
    """Which eligible tokens of each sequence are masked at rate t (``diffusion/masks.py``)."""

    rows_per_sequence: ClassVar[int] = 1
    """Forward rows each sequence costs (MIRROR: 2); ``auto`` counts 1, it halves its sequences itself."""
    fixed: ClassVar[bool] = True
    """False for a policy that changes the generator during training (``auto``): ``mdm-scale variance``, which
    measures one generator at fixed parameters, has nothing to measure for it."""


@dataclass
class BernoulliMasksConfig(MaskConfig):
    """One mask per sequence, M_i ~ Bernoulli(pi(t)) independently per eligible token."""

    name: str = "bernoulli"


@dataclass
class MirrorMasksConfig(MaskConfig):
    """MIRROR antithetic mask pairs (docs/spec.md section 3.2): two rows per sequence in the same forward."""

    name: str = "mirror"
    display: ClassVar[str] = "MIRROR"
    rows_per_sequence: ClassVar[int] = 2
    single_above: float | None = None
    """Sequences with t >= this use one mask (saves compute where the pair's anti-correlation is weak; the paper's
    "mirror_plus" used 0.9). null = always two masks."""

    def check(self, config) -> None:
        require(self.single_above is None or 0.0 < self.single_above <= 1.0, self.key("single_above"),
                self.single_above, "must be in (0, 1]")


@dataclass
class AutoMasksConfig(MaskConfig):
    """MIRROR switched on or off at every pooling of the online estimates (``variance.monitor.every``) by the
    measured rule "MIRROR pays at equal rows iff Cov(L1, L2) + cov_syrm < 0", i.e. E[(L1 - L2)^2] / 2 > Var(L)
    (+ the SyRM partners' covariance under SyRM) (``diffusion/online_variance.py``), starting off; while on, a
    micro-batch holds ``train.micro_batch_size / 2`` sequences, so the rows per step stay fixed."""

    name: str = "auto"
    fixed: ClassVar[bool] = False

    def check(self, config) -> None:
        v = config.variance
        require(v.monitor.every > 0, "variance.monitor.every", v.monitor.every,
                "variance.masks = auto decides at each refit of the online estimates: must be > 0")
        require(v.probe.every > 0 and v.probe.fraction > 0, "variance.probe.every", (v.probe.every, v.probe.fraction),
                "variance.masks = auto measures MIRROR's pairs with the probe while MIRROR is off: "
                "probe.every and probe.fraction must be > 0")
        require(v.t_coupling != "stratified", "variance.t_coupling", v.t_coupling,
                "StraTS stratifies a fixed global batch of sequences, which variance.masks = auto changes")
        require(not config.data.packing, "variance.masks", self.name, "variance.masks = auto changes the "
                "sequences per micro-batch, which packed rows (data.packing) do not have")
        require(config.train.micro_batch_size % 2 == 0, "train.micro_batch_size", config.train.micro_batch_size,
                "variance.masks = auto halves the micro-batch while MIRROR is on: must be even")
        require(v.t_coupling != "symmetric" or config.train.micro_batch_size % 4 == 0, "train.micro_batch_size",
                config.train.micro_batch_size, "variance.masks = auto with SyRM (variance.t_coupling = symmetric) "
                "pairs the sequences of the halved micro-batch too: must be divisible by 4")


# ---- fixed sections -----------------------------------------------------------------------------------------
@dataclass
class ISADConfig:
    """ISAD (docs/spec.md 3.6): token ids masked with probability min(pi + delta, 1), weighted by 1/q
    (Horvitz-Thompson), under any mask generator."""

    token_ids: list[int] = field(default_factory=list)
    """The token ids masked more often; empty = off."""
    delta: float = 0.2
    """How much the mask probability of the chosen token ids is raised."""

    def check(self) -> None:
        require(0.0 < self.delta < 1.0, "variance.isad.delta", self.delta, "must be in (0, 1)")
        require(all(i >= 0 for i in self.token_ids), "variance.isad.token_ids", self.token_ids,
                "token ids must be >= 0")


@dataclass
class EMAConfig:
    """EMA (docs/spec.md 3.5): a per-t-bin moving-average baseline, a control variate of the logged loss only;
    the gradient is provably unchanged (``diffusion/ema_baseline.py``)."""

    bins: int = 0
    """t-bins of the baseline; 0 = off."""
    rate: float = 0.01
    """The baseline's moving-average rate eta."""

    def check(self) -> None:
        require(self.bins >= 0, "variance.ema.bins", self.bins, "must be >= 0")
        require(0.0 < self.rate <= 1.0, "variance.ema.rate", self.rate, "must be in (0, 1]")


@dataclass
class ProbeConfig:
    """The online A/B/C probe (``diffusion/online_variance.py``): every ``every`` optimiser steps, a no-grad
    forward evaluates four rows (base mask, its antithetic mask, an independent mask, an independent rate and
    mask) of the selected sequences. Without it (0) V is still measured, and MIRROR's pair covariance while MIRROR
    trains. At 25 the
    probe costs 0.86% of the step time at the 1.1B shape (one probe step: 63 ms against 293 ms steps,
    docs/benchmarks.md)."""

    every: int = 25
    """Optimiser steps between probe steps; 0 = no probe."""
    fraction: float = 0.0625
    """Fraction of the sequences of a probe step that the probe measures (chosen by a keyed draw per global sample
    index). Cost: about (4/3) fraction / every of the training compute."""

    def check(self) -> None:
        require(self.every >= 0, "variance.probe.every", self.every, "must be >= 0")
        require(0.0 <= self.fraction <= 1.0, "variance.probe.fraction", self.fraction, "must be in [0, 1]")


@dataclass
class MonitorConfig:
    """The online A/B/C estimates (``diffusion/online_variance.py``), measured for every mdm run whatever its
    t-sampler: per-rank sums pooled (one all-reduce) and logged every ``every`` steps, where ``masks: auto``
    decides."""

    every: int = 50
    """Optimiser steps between poolings (each one all-reduce, estimates logged); 0 = never."""
    half_life: float = 200.0
    """Half-life in optimiser steps of the pooled sums; 0 = no decay."""

    @property
    def decay(self) -> float:
        return decay_factor(self.every, self.half_life)

    def check(self) -> None:
        require(self.every >= 0, "variance.monitor.every", self.every, "must be >= 0")
        require(self.half_life >= 0, "variance.monitor.half_life", self.half_life, "must be >= 0")


@dataclass
class VarianceConfig:
    """The diffusion noise: how t and the masks are drawn, and how their variance is measured."""

    t_sampler: TSamplerConfig = field(default_factory=UniformTConfig)
    """How t is drawn: ``uniform``; ``ppots`` (t ~ p(t), weight 1/p(t)); ``clipped`` (U[low, high], weight 1,
    biased); or any registered kind (``variance.t_sampler: {name: ..., <its fields>}``)."""
    masks: MaskConfig = field(default_factory=BernoulliMasksConfig)
    """How masks are drawn: ``bernoulli``; ``mirror`` (antithetic pairs); ``auto`` (MIRROR on or off by the online
    rule); or any registered kind."""
    t_coupling: Literal["independent", "stratified", "symmetric"] = "independent"
    """How the rates of one batch are coupled (``diffusion/coupled_t.py``): ``stratified`` = StraTS, one rate per
    stratum of the global batch of each optimiser step (docs/spec.md 3.4); ``symmetric`` = SyRM, rows paired as t
    and 1 - t inside each micro-batch (docs/spec.md 3.7, an interpretation). Both compose with any t-sampler and
    mask generator."""
    eps: float = 1e-3
    """Mask probability floor: pi(t) = (1 - eps) t + eps."""
    isad: ISADConfig = field(default_factory=ISADConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def check(self, config) -> None:
        require(0.0 <= self.eps < 1.0, "variance.eps", self.eps, "must be in [0, 1)")
        for section in (self.isad, self.ema, self.probe, self.monitor):
            section.check()
        self.t_sampler.check(config)
        self.masks.check(config)
        require(self.ema.bins == 0 or self.t_sampler.unbiased, "variance.ema.bins", self.ema.bins,
                f"the EMA control variate needs an unbiased t-sampler (not {self.t_sampler.name})")
        if config.train.objective != "mdm":
            require(isinstance(self.masks, BernoulliMasksConfig), "variance.masks", self.masks.name,
                    "mask generators apply to the mdm objective only (train.objective = arm)")
            require(isinstance(self.t_sampler, UniformTConfig), "variance.t_sampler", self.t_sampler.name,
                    "t-samplers apply to the mdm objective only (train.objective = arm)")
