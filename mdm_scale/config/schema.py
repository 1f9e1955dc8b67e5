"""The run configuration: one typed dataclass per concern.

A run is described by YAML files (``configs/*.yaml``) plus ``--set section.key=value`` overrides; ``loader.py``
turns them into a :class:`Config` and rejects unknown keys, wrong types and out-of-range values before any
expensive work. Each dataclass checks its own ranges in ``check()``; checks that need the world size (batch
arithmetic) live in ``loader.check_batch_arithmetic``. The ``variance`` section, whose t-sampler and mask
generator are chosen by name among registered kinds, is ``variance.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mdm_scale.config.errors import ConfigError, require
from mdm_scale.config.variance import VarianceConfig

__all__ = ["Config", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "TrainConfig", "VarianceConfig"]


@dataclass
class ModelConfig:
    """Which network to train (``mdm_scale/models``)."""

    preset: str = "tiny"
    """Built-in bidirectional transformer preset (``config/presets.py``); used when ``path`` is not set."""
    path: str | None = None
    """Local directory to start from instead of a preset: a LLaDA or Dream checkpoint, or a LLaMA / Qwen2 /
    Qwen3 causal LM (adapted to diffusion: bidirectional attention, shifted logits), all read into the built-in
    model class (``models/formats.py``, docs/models.md); an mdm-scale export; or any transformers masked LM
    (BERT, ModernBERT, ...)."""
    trust_remote_code: bool = False
    """Run modelling code shipped inside ``path`` instead of reading it natively (LLaDA's own code; slower, no
    masked-only head or packing; refused for Dream, whose code returns unshifted logits). Off unless you ask."""
    mask_token_id: int | Literal["add"] | None = None
    """[MASK] id; by default the tokenizer's mask token, then the model config's ``mask_token_id``. For a causal
    LM that has none: an unused token id (e.g. a reserved special token), or ``add``: a new ``<|mask|>`` token
    (the model gets an embedding row for it if it has none, the mean of the others)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Architecture fields to change on top of the preset, e.g. ``{num_hidden_layers: 4}``; with ``path`` (a
    native checkpoint), settings such as ``{loss_head: full}`` on top of its config."""
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

    def check(self) -> None:
        from mdm_scale.config.presets import PRESETS

        if self.path is None:
            require(self.preset in PRESETS, "model.preset", self.preset, f"choose one of {sorted(PRESETS)}")
        require(self.mask_token_id in (None, "add") or self.mask_token_id >= 0, "model.mask_token_id",
                self.mask_token_id, "must be >= 0 or add")
        require(self.checkpoint_blocks is None or self.checkpoint_blocks >= 0, "model.checkpoint_blocks",
                 self.checkpoint_blocks, "must be >= 0")
        require(self.checkpoint_blocks is None or self.activation_checkpointing, "model.checkpoint_blocks",
                 self.checkpoint_blocks, "needs model.activation_checkpointing = true")


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
        require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        require(self.seq_len >= 8, "data.seq_len", self.seq_len, "must be >= 8")
        require(self.response_eos_pad >= 0, "data.response_eos_pad", self.response_eos_pad, "must be >= 0")
        require(self.pad_to_multiple_of >= 1, "data.pad_to_multiple_of", self.pad_to_multiple_of, "must be >= 1")
        require(bool(self.train_file), "data.train_file", self.train_file, "must name a file")


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
    """DeepSpeed ZeRO stage 0-3, or ``auto``, the fastest stage whose model states fit within half of the GPU's
    memory (``config/deepspeed_json.py``, ``choose_zero_stage``): on one GPU stage 0 (nothing to partition; 18
    bytes per parameter: bf16 parameters and gradients, their flat copy, fp32 master weights and two moments),
    on several stage 2 (bf16 parameters whole, the rest partitioned: N (2 + 16 / world size) bytes per rank; the
    optimizer step divided over the ranks), else stage 3; on CPU stage 3. Resuming a checkpoint of stage 1-3,
    ``auto`` never picks stage 0 (which cannot load one); a stage-0 checkpoint resumes at any stage and world
    size (``training/checkpoint.py``). The choice is logged (``training/trainer.py``)."""
    optimizer: Literal["deepspeed", "fused"] = "deepspeed"
    """How ``engine.step()`` applies the AdamW update (``training/optimizer``; the same update either way).
    ``deepspeed``: DeepSpeed's FusedAdam (CUDA) or torch AdamW (CPU) inside DeepSpeed's stage-0 or ZeRO optimizer.
    ``fused``: the update, clipping and bf16 copy in one pass per parameter group, after one fp32-accumulated
    gradient norm (at stage 0 a flat-buffer client optimizer, at stages 1-3 DeepSpeed's ZeRO optimizer with a
    fused step); not with ``offload_optimizer`` / ``offload_params``. With bf16 either setting resumes the other's
    checkpoints (at stage 0 in fp32, resume with the setting that wrote it)."""
    offload_optimizer: bool = False
    offload_params: bool = False
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
        require(self.max_steps >= 1, "train.max_steps", self.max_steps, "must be >= 1")
        require(self.micro_batch_size >= 1, "train.micro_batch_size", self.micro_batch_size, "must be >= 1")
        require(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        require(self.global_batch_size is None or self.global_batch_size >= 1, "train.global_batch_size",
                 self.global_batch_size, "must be >= 1")
        require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        require(0 <= self.warmup_steps < self.max_steps or self.warmup_steps == 0, "train.warmup_steps",
                 self.warmup_steps, "must be smaller than train.max_steps")
        require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            require(0.0 <= value < 1.0, f"train.{key}", value, "must be in [0, 1)")
        require(self.adam_eps > 0, "train.adam_eps", self.adam_eps, "must be > 0")
        require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        require(self.zero_stage in (0, 1, 2, 3, "auto"), "train.zero_stage", self.zero_stage,
                 "must be 0, 1, 2, 3 or auto")
        require(not self.offload_params or self.zero_stage == 3, "train.offload_params", self.offload_params,
                 "parameter offload needs train.zero_stage = 3")
        require(not self.offload_optimizer or self.zero_stage != 0, "train.offload_optimizer",
                 self.offload_optimizer, "optimizer offload needs train.zero_stage >= 1")
        require(self.optimizer != "fused" or not (self.offload_optimizer or self.offload_params), "train.optimizer",
                self.optimizer, "the fused step runs on the device; it does not combine with train.offload_optimizer "
                 "or train.offload_params (use train.optimizer=deepspeed)")
        for key in ("eval_every", "eval_samples", "save_every"):
            value = getattr(self, key)
            require(value >= 0, f"train.{key}", value, "must be >= 0")
        require(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        require(self.keep_last >= 1, "train.keep_last", self.keep_last, "must be >= 1")
        require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", self.max_nonfinite_steps,
                 "must be >= 1")
        require(bool(self.output_dir), "train.output_dir", self.output_dir, "must name a directory")


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
        require(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2^63)")
        for section in (self.model, self.data, self.train):
            section.check()
        self.variance.check(self)
        require(self.train.objective == "mdm" or not self.data.packing, "data.packing", self.data.packing,
                "packed rows need the mdm objective (train.objective = arm would need causal document masks)")
