"""The run configuration: one typed dataclass per concern.

A run is described by YAML files (``configs/*.yaml``) plus ``--set section.key=value`` overrides; ``loader.py``
turns them into a :class:`Config` and rejects unknown keys, wrong types and out-of-range values before any
expensive work. Each dataclass checks its own ranges in ``check()``; checks that need the world size (batch
arithmetic) live in ``loader.check_batch_arithmetic``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key (``section.key``) and value."""


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {why}")


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA, through ``peft``; ``models/lora.py``): the base weights stay frozen (bf16 on GPU)
    and each targeted linear layer W gets W + (alpha / rank) B A with A (rank x in) and B (out x rank), B starting
    at zero, so training starts from the base model. Only the adapters (and ``modules_to_save``) are trained and
    held by the optimizer."""

    rank: int = 0
    """Adapter rank r; 0 = no LoRA (full fine-tuning)."""
    alpha: float = 32.0
    """Scale numerator: the adapter's update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on each adapter's input (costs one activation copy per targeted layer; 0 = none)."""
    target_modules: list[str] = field(default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    """Linear layers to adapt, by name (a module matches when its name ends with one). The built-in model's are
    ``qkv_proj`` (q, k and v fused), ``o_proj``, ``gate_up_proj`` and ``down_proj``; an unknown name fails,
    listing the linear layers that exist."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapters, e.g. ``[embed_tokens, lm_head]``."""

    def check(self) -> None:
        _require(self.rank >= 0, "model.lora.rank", self.rank, "must be >= 0 (0 = no LoRA)")
        _require(self.alpha > 0, "model.lora.alpha", self.alpha, "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "model.lora.dropout", self.dropout, "must be in [0, 1)")
        _require(self.rank == 0 or len(self.target_modules) > 0, "model.lora.target_modules", self.target_modules,
                 "name at least one linear layer")


@dataclass
class ModelConfig:
    """Which network to train (``mdm_scale/models``)."""

    preset: str = "tiny"
    """Built-in bidirectional transformer preset (``config/presets.py``); used when ``path`` is not set."""
    path: str | None = None
    """Local Hugging Face directory: an mdm-scale export, any masked LM (BERT, ModernBERT, ...), or LLaDA."""
    trust_remote_code: bool = False
    """Run modelling code shipped inside ``path`` (needed for LLaDA checkpoints). Off unless you ask."""
    mask_token_id: int | None = None
    """[MASK] id; by default the tokenizer's mask token, then the model config's ``mask_token_id``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Architecture fields to change on top of the preset, e.g. ``{num_hidden_layers: 4}``."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (less memory, about 1/3 more compute)."""
    checkpoint_blocks: int | None = None
    """Built-in model, with ``activation_checkpointing``: recompute only the first this many blocks (selective
    checkpointing: the others keep their activations, trading memory for the recompute); null = every block."""
    fused_kernels: bool | None = None
    """Built-in model: fuse RMSNorm, rotary and SwiGLU with torch.compile (``models/kernels.py``);
    ``null`` = on with CUDA, off on CPU."""
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """Built-in model: the scaled-dot-product-attention kernel; ``auto`` lets PyTorch choose."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters instead of full fine-tuning (``model.lora.rank > 0``)."""

    def check(self) -> None:
        from mdm_scale.config.presets import PRESETS

        if self.path is None:
            _require(self.preset in PRESETS, "model.preset", self.preset, f"choose one of {sorted(PRESETS)}")
        _require(self.mask_token_id is None or self.mask_token_id >= 0, "model.mask_token_id",
                 self.mask_token_id, "must be >= 0")
        _require(self.checkpoint_blocks is None or self.checkpoint_blocks >= 0, "model.checkpoint_blocks",
                 self.checkpoint_blocks, "must be >= 0")
        _require(self.checkpoint_blocks is None or self.activation_checkpointing, "model.checkpoint_blocks",
                 self.checkpoint_blocks, "needs model.activation_checkpointing = true")
        self.lora.check()


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token blocks (``mdm_scale/data``)."""

    train_file: str = "data/synth/train.jsonl"
    """Local JSONL or parquet. SFT records ``{"prompt", "response"}``; pretraining records ``{"text"}``."""
    eval_file: str | None = None
    """Held-out file in the same format; if unset, ``eval_fraction`` of the training records is held out."""
    eval_fraction: float = 0.0
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    task: Literal["auto", "sft", "pretrain"] = "auto"
    """``auto`` picks ``sft`` when the first record has ``prompt``/``response`` and ``pretrain`` for ``text``."""
    tokenizer: str = "char"
    """A local HF tokenizer directory, or ``char`` to build a character tokenizer from the training file."""
    seq_len: int = 256
    """Maximum tokens per sequence (SFT) or block length (pretraining)."""
    response_eos_pad: int = 0
    """SFT: append EOS tokens to every response until it has this many tokens (EOS included, and in the loss, as
    LLaDA's SFT pads with EOS), so that a diffusion model learns to end its answer inside a fixed generation
    window; use the same value as ``--gen-length`` when evaluating. 0 = one EOS only. A response needs room for
    at least one EOS, so one of this many tokens or more is over-long and follows ``data.overlong`` (truncated
    to the window without EOS, or dropped), counted in the data report."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """SFT records longer than ``seq_len``: cut the response, or drop the record. Both are counted."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A malformed, empty or over-long-prompt record stops the run with file and line, or is skipped and counted."""
    chat_template: bool = False
    """Wrap SFT prompts with the tokenizer's chat template (the tokenizer must have one)."""
    pad_to_multiple_of: int = 8
    """Right-pad each SFT micro-batch to a multiple of this (pretraining blocks are never padded)."""
    group_by_length: bool = True
    """Within each optimiser step, put sequences of similar length into the same micro-batch (less padding;
    the step's samples and their noise are unchanged)."""
    packing: bool = False
    """SFT, built-in model, mdm objective: pack several records into each row of ``seq_len`` tokens
    (``data/packing.py``). ``train.micro_batch_size`` then counts rows, each record attends only to itself,
    rotary positions restart per record, and every record keeps its own t, masks, weight and answer-length
    normalisation keyed by its stream position, so per-record losses equal the unpacked ones; the micro-batch
    loss is the sum of its records' losses over the expected number of records per micro-batch (an unbiased
    estimate of the same mean over sequences). ``group_by_length`` does not apply; held-out evaluation stays
    unpacked."""

    def check(self) -> None:
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _require(self.seq_len >= 8, "data.seq_len", self.seq_len, "must be >= 8")
        _require(self.response_eos_pad >= 0, "data.response_eos_pad", self.response_eos_pad, "must be >= 0")
        _require(self.pad_to_multiple_of >= 1, "data.pad_to_multiple_of", self.pad_to_multiple_of, "must be >= 1")
        _require(bool(self.train_file), "data.train_file", self.train_file, "must name a file")


@dataclass
class TrainConfig:
    """The optimisation loop (``mdm_scale/training``)."""

    objective: Literal["mdm", "arm"] = "mdm"
    """``mdm``: the masked-diffusion loss (docs/spec.md section 1). ``arm``: next-token loss with causal attention."""
    max_steps: int = 100
    output_dir: str = "runs/default"
    micro_batch_size: int = 8
    """Sequences per rank per forward (before MIRROR doubles the rows)."""
    grad_accum: int = 1
    global_batch_size: int | None = None
    """If set, must equal micro_batch_size x grad_accum x world size; checked before any model is built."""
    lr: float = 3e-4
    lr_schedule: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of ``lr`` (linear and cosine schedules)."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 turns clipping off."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    zero_stage: int | Literal["auto"] = 3
    """DeepSpeed ZeRO stage 0-3, or ``auto``: on GPU, stage 2 when one rank holds the bf16 parameters plus its
    share of gradients, fp32 master weights and Adam moments, N (2 + 16 / world size) bytes, within half of the
    GPU's memory, else stage 3; on CPU stage 3. The choice is logged (``training/trainer.py``)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: fp32 master weights, Adam moments and the update's gradients live in pinned host memory."""
    offload_params: bool = False
    """ZeRO-3 only: the bf16 parameters live in pinned host memory too."""
    memory_check: bool = True
    """Refuse to start, in seconds and with one line, when the memory plan (``training/memory_plan.py``, printed
    at start) does not fit the GPU or the host; false only prints the plan and tries anyway."""
    eval_every: int = 50
    """Steps between evaluations of the held-out diffusion loss; 0 evaluates only at the end."""
    eval_samples: int = 256
    """Held-out sequences per evaluation (the first ones of the eval set, split over ranks); 0 uses all."""
    log_every: int = 10
    save_every: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 2
    """How many complete checkpoints to keep (older ones are deleted after a new one is complete)."""
    resume: str = "auto"
    """``auto``: continue from the newest complete checkpoint in output_dir if there is one; ``never``;
    or a checkpoint directory."""
    max_nonfinite_steps: int = 10
    """Optimiser steps in a row whose loss or gradient is NaN/Inf (each one skipped and counted) before the run
    stops, saving the last good state (``training/faults.py``)."""

    def check(self) -> None:
        _require(self.max_steps >= 1, "train.max_steps", self.max_steps, "must be >= 1")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", self.micro_batch_size, "must be >= 1")
        _require(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        _require(self.global_batch_size is None or self.global_batch_size >= 1, "train.global_batch_size",
                 self.global_batch_size, "must be >= 1")
        _require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _require(0 <= self.warmup_steps < self.max_steps or self.warmup_steps == 0, "train.warmup_steps",
                 self.warmup_steps, "must be smaller than train.max_steps")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"train.{key}", value, "must be in [0, 1)")
        _require(self.adam_eps > 0, "train.adam_eps", self.adam_eps, "must be > 0")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        _require(self.zero_stage in (0, 1, 2, 3, "auto"), "train.zero_stage", self.zero_stage,
                 "must be 0, 1, 2, 3 or auto")
        _require(not self.offload_params or self.zero_stage == 3, "train.offload_params", self.offload_params,
                 "parameter offload needs train.zero_stage = 3")
        _require(not self.offload_optimizer or self.zero_stage != 0, "train.offload_optimizer",
                 self.offload_optimizer, "optimizer offload needs train.zero_stage >= 1")
        for key in ("eval_every", "eval_samples", "save_every"):
            value = getattr(self, key)
            _require(value >= 0, f"train.{key}", value, "must be >= 0")
        _require(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _require(self.keep_last >= 1, "train.keep_last", self.keep_last, "must be >= 1")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", self.max_nonfinite_steps,
                 "must be >= 1")
        _require(bool(self.output_dir), "train.output_dir", self.output_dir, "must name a directory")


@dataclass
class VarianceConfig:
    """The diffusion noise: how t and the masks are drawn (``mdm_scale/diffusion``, docs/spec.md sections 1-3)."""

    t_sampler: Literal["uniform", "ppots", "clipped"] = "uniform"
    """Distribution of the masking rate t per sequence: ``uniform``; ``ppots`` (t ~ p(t) with weight
    1/p(t), p fitted to the loss: ``diffusion/ppots.py``, docs/spec.md section 3.1); ``clipped``: t ~ U[clip_low,
    clip_high] with weight 1, the BD3-LM baseline, *biased* (``diffusion/clipped_t.py``)."""
    mirror: bool | Literal["auto"] = False
    """MIRROR antithetic mask pairs (docs/spec.md section 3.2): two rows per sequence in the same forward. ``auto``:
    switch MIRROR on or off at every refit (``ppots_refit_every``) by the measured rule "MIRROR pays at equal
    rows iff E[(L1 - L2)^2] / 2 > Var(L)" (``diffusion/online_variance.py``), starting off; while on, a
    micro-batch holds ``micro_batch_size / 2`` sequences, so the rows per step stay fixed."""
    mirror_plus_threshold: float | None = None
    """MIRROR only: sequences with t >= this use one mask (saves compute where the pair's anti-correlation is
    weak; the paper's "mirror_plus" used 0.9). null = always two masks."""
    eps: float = 1e-3
    """Mask probability floor: pi(t) = (1 - eps) t + eps."""
    ppots_x0: int = 10
    """P-POTS offline estimate before the first step: training sequences used (split over ranks); 0 skips
    it (p starts uniform and is fitted at the first refit)."""
    ppots_masks: int = 10
    """P-POTS offline estimate: mask draws per (sequence, t) (each draw is a pair with MIRROR)."""
    ppots_bins: int = 64
    """P-POTS t-bins of the statistics; the offline estimate evaluates t at the bin centres."""
    ppots_forward_tokens: int | None = None
    """P-POTS offline estimate: token budget of one no-grad forward. A forward holds (t, mask) draws of one
    sequence: up to this // data.seq_len rows (half as many draws with MIRROR's pairs), at least
    train.micro_batch_size draws (``training/ppots_estimate.py``). null: 65,536 on GPU; on CPU one
    micro-batch of draws (large forwards measured slower per row there under ZeRO-3)."""
    ppots_restarts: int = 20
    """Random starts of the first EPR fit (later refits start from the current parameters)."""
    ppots_refit_every: int = 50
    """Optimiser steps between refits from the training losses (one all-reduce each); 0 = never refit."""
    ppots_half_life: float = 200.0
    """Half-life in optimiser steps of the accumulated statistics; 0 = no decay."""
    ppots_mix_uniform: float = 0.0
    """Defensive mixing p <- (1 - lambda) p + lambda with the uniform density."""
    ppots_max_weight: float | None = None
    """Cap on the importance weight 1/p(t), enforced by mixing in just enough uniform density (stays unbiased)."""
    ppots_target: Literal["loss", "grad"] = "loss"
    """What P-POTS fits p(t) proportional to sqrt(E[x^2 | t]) of: ``loss``, the per-sequence loss l (the paper);
    ``grad``, a per-sequence gradient-norm proxy, the norm of the gradient of l with respect to its masked
    tokens' logits (``NoisyBatch.sample_grad_norms``, no extra backward). Measured in docs/variance.md."""
    ppots_loss_max: float | None = None
    """Clamp per-sequence losses at this value in the P-POTS statistics only (the official code used 10)."""
    t_coupling: Literal["independent", "stratified", "symmetric"] = "independent"
    """How the rates of one batch are coupled (``diffusion/coupled_t.py``): ``stratified`` = StraTS, one rate per
    stratum of the global batch of each optimiser step (docs/spec.md 3.4); ``symmetric`` = SyRM, rows paired as t and
    1 - t inside each micro-batch (docs/spec.md 3.7, an interpretation). Both compose with any t_sampler and MIRROR."""
    clip_low: float = 0.3
    """Clipped t-sampler: lower end beta of U[beta, omega]."""
    clip_high: float = 0.8
    """Clipped t-sampler: upper end omega of U[beta, omega]."""
    isad_token_ids: list[int] = field(default_factory=list)
    """ISAD (docs/spec.md 3.6): token ids masked with probability min(pi + isad_delta, 1), weighted by 1/q
    (Horvitz-Thompson); empty = off."""
    isad_delta: float = 0.2
    """ISAD: how much the mask probability of the chosen token ids is raised."""
    ema_bins: int = 0
    """EMA (docs/spec.md 3.5): per-t-bin moving-average baseline with this many bins, 0 = off. It is a control variate
    of the logged loss only; the gradient is provably unchanged (``diffusion/ema_baseline.py``)."""
    ema_rate: float = 0.01
    """EMA: the baseline's moving-average rate eta."""
    probe_every: int = 25
    """Online A/B/C (``diffusion/online_variance.py``): every this many optimiser steps, a no-grad probe forward
    evaluates four rows (base mask, its antithetic mask, an independent mask, an independent rate and mask) of
    the selected sequences; 0 = no probe (V and MIRROR's pair statistic are still measured). The estimates are
    pooled and logged every ``ppots_refit_every`` steps, for any t_sampler. At 25 the probe costs 0.86% of the
    step time at the 1.1B shape (one probe step: 63 ms against 293 ms steps, docs/benchmarks.md)."""
    probe_fraction: float = 0.0625
    """Online A/B/C: fraction of the sequences of a probe step that the probe measures (chosen by a keyed draw
    per global sample index). Cost: about (4/3) probe_fraction / probe_every of the training compute."""

    def check(self) -> None:
        _require(0.0 <= self.eps < 1.0, "variance.eps", self.eps, "must be in [0, 1)")
        _require(self.mirror_plus_threshold is None or self.mirror is True, "variance.mirror_plus_threshold",
                 self.mirror_plus_threshold, "needs variance.mirror = true")
        _require(self.mirror_plus_threshold is None or 0.0 < self.mirror_plus_threshold <= 1.0,
                 "variance.mirror_plus_threshold", self.mirror_plus_threshold, "must be in (0, 1]")
        for key in ("ppots_x0", "ppots_refit_every"):
            _require(getattr(self, key) >= 0, f"variance.{key}", getattr(self, key), "must be >= 0")
        for key in ("ppots_masks", "ppots_restarts"):
            _require(getattr(self, key) >= 1, f"variance.{key}", getattr(self, key), "must be >= 1")
        _require(self.ppots_forward_tokens is None or self.ppots_forward_tokens >= 1, "variance.ppots_forward_tokens",
                 self.ppots_forward_tokens, "must be >= 1 or null")
        _require(self.ppots_masks >= 2 or self.mirror is True, "variance.ppots_masks", self.ppots_masks,
                 "must be >= 2 without MIRROR (the mask variance needs two draws)")
        _require(2 <= self.ppots_bins <= 4096, "variance.ppots_bins", self.ppots_bins, "must be in [2, 4096]")
        _require(self.ppots_half_life >= 0, "variance.ppots_half_life", self.ppots_half_life, "must be >= 0")
        _require(0.0 <= self.ppots_mix_uniform < 1.0, "variance.ppots_mix_uniform", self.ppots_mix_uniform,
                 "must be in [0, 1)")
        _require(self.ppots_max_weight is None or self.ppots_max_weight > 1.0, "variance.ppots_max_weight",
                 self.ppots_max_weight, "must be > 1 (p(t) = 1 everywhere is the uniform density)")
        _require(self.ppots_loss_max is None or self.ppots_loss_max > 0, "variance.ppots_loss_max",
                 self.ppots_loss_max, "must be > 0")
        _require(0.0 <= self.clip_low < self.clip_high <= 1.0, "variance.clip_low", (self.clip_low, self.clip_high),
                 "need 0 <= clip_low < clip_high <= 1")
        _require(0.0 < self.isad_delta < 1.0, "variance.isad_delta", self.isad_delta, "must be in (0, 1)")
        _require(all(i >= 0 for i in self.isad_token_ids), "variance.isad_token_ids", self.isad_token_ids,
                 "token ids must be >= 0")
        _require(self.probe_every >= 0, "variance.probe_every", self.probe_every, "must be >= 0")
        _require(0.0 <= self.probe_fraction <= 1.0, "variance.probe_fraction", self.probe_fraction,
                 "must be in [0, 1]")
        if self.mirror == "auto":
            _require(self.ppots_refit_every > 0, "variance.ppots_refit_every", self.ppots_refit_every,
                     "variance.mirror = auto decides at each refit: must be > 0")
            _require(self.probe_every > 0 and self.probe_fraction > 0, "variance.probe_every",
                     (self.probe_every, self.probe_fraction),
                     "variance.mirror = auto measures MIRROR's pairs with the probe while MIRROR is off: "
                     "probe_every and probe_fraction must be > 0")
            _require(self.t_coupling != "stratified", "variance.t_coupling", self.t_coupling,
                     "StraTS stratifies a fixed global batch of sequences, which variance.mirror = auto changes")
        _require(self.ema_bins >= 0, "variance.ema_bins", self.ema_bins, "must be >= 0")
        _require(0.0 < self.ema_rate <= 1.0, "variance.ema_rate", self.ema_rate, "must be in (0, 1]")
        _require(self.ema_bins == 0 or self.t_sampler != "clipped", "variance.ema_bins", self.ema_bins,
                 "the EMA control variate needs an unbiased t_sampler (not clipped)")


@dataclass
class LoggingConfig:
    """Console and TensorBoard output (``training/metrics.py``)."""

    tensorboard: bool = True
    tensorboard_dir: str | None = None
    """Default: ``<train.output_dir>/tensorboard``."""
    progress_bar: Literal["auto", "always", "never"] = "auto"
    """``auto`` shows a progress bar only when rank 0's stderr is a terminal."""


@dataclass
class Config:
    """A whole run. ``deepspeed`` holds extra DeepSpeed JSON keys, merged last over the generated config."""

    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        _require(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2^63)")
        for section in (self.model, self.data, self.train, self.variance):
            section.check()
        _require(self.train.objective == "mdm" or self.variance.mirror is False, "variance.mirror",
                 self.variance.mirror, "MIRROR masks apply to the mdm objective only (train.objective = arm)")
        _require(self.train.objective == "mdm" or not self.data.packing, "data.packing", self.data.packing,
                 "packed rows need the mdm objective (train.objective = arm would need causal document masks)")
        _require(self.variance.mirror != "auto" or not self.data.packing, "variance.mirror", self.variance.mirror,
                 "variance.mirror = auto changes the sequences per micro-batch, which packed rows (data.packing) "
                 "do not have")
        _require(self.train.objective == "mdm" or self.variance.t_sampler == "uniform", "variance.t_sampler",
                 self.variance.t_sampler, "t-samplers apply to the mdm objective only (train.objective = arm)")
        _require(self.variance.mirror != "auto" or self.train.micro_batch_size % 2 == 0, "train.micro_batch_size",
                 self.train.micro_batch_size, "variance.mirror = auto halves the micro-batch while MIRROR is on: "
                 "must be even")
