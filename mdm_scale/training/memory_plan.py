"""The memory plan: what one rank will hold, estimated from the configuration before anything is built.

The trainer prints it at start (rank 0) and refuses, with one line naming the numbers and the changes that would
fit, when it does not fit the GPU or the host (``train.memory_check: false`` only prints). Nothing here allocates:
the model is counted on the meta device (with its LoRA adapters, which also checks ``model.lora``).

Notation: P parameters, T of them trained (all, or the LoRA adapters plus ``modules_to_save``), W ranks, e bytes
per parameter and activation element (2 for bf16, 4 for fp32), l layers, d width, f SwiGLU width, k the
key/value width, h heads, V vocabulary, n the tokens of one micro-batch (rows x data.seq_len; MIRROR's two rows
per sequence both count), c = min(head chunk, n).

**Model states** (per rank, DeepSpeed 0.19's layout, read from its optimizers):
- weights e P, divided by W at ZeRO-3 (on the host with ``offload_params``);
- gradients e T: at ZeRO-3 one flat partition e T / W allocated up front; at stages 0-2 they appear during the
  backward pass as activations are freed, so they count at the optimizer step, not at the backward peak
  (e T / W from stage 2 on);
- fp32 master weights 4 T and Adam moments 8 T, divided by W from stage 1 on (none of the master copy for an fp32
  run at stage 0); on the host with ``offload_optimizer``;
- the update's fp32 gradient during the optimizer step (bf16 runs): 4 T at stage 0, 4 T / W at stages 1-2,
  4 min(T / W, sub_group_size) at ZeRO-3 (on the host with ``offload_optimizer``).

**Activations** kept for the backward pass, bytes per token of one transformer block of the built-in model
(counted with ``saved_tensors_hooks``, ``tests/test_memory_plan.py``; fused kernels):

    block = e (2 d + 3 d + 3 k + 2 f + [d] + [d] + [f] + [d, GPU only] + LoRA ranks) + 4 h + 8

2 d: the block's input and the mid-block residual; 3 d + 3 k: the qkv projection (kept whole: v is a view of
it), rotated q and k and attention's output (with grouped-query attention, k < d, 4 d instead: q, the repeated
k and v, and the output); 2 f: the gate/up product; each bracket is the input of a linear layer whose
weight trains or is adapted (qkv, gate/up, down, o; a frozen layer keeps no input); o_proj's input is a view of
attention's output on CPU and a copy on GPU (cuDNN's layout; this term makes the measured 1.1B slope, 1.50 MiB
per token, match to 0.3%, docs/benchmarks.md); 4 h + 8: attention's log-sum-exp and the two RMSNorm statistics
in fp32. Eager kernels (the CPU default) keep each RMSNorm's fp32 input and, if its weight trains, its fp32
output (+2 (8 d - e d), or +2 (4 d - e d) with frozen norms) and SwiGLU's silu output (+e f). LoRA adds e r per
adapted layer (the rank-r product) and, with dropout, e x its input width (the mask; the dropped copy replaces
the input, except o_proj's on CPU, which is then new). A checkpointed block keeps only its input (e d); the
backward pass then recomputes one block at a time. Outside the blocks: the final norm's input (e d + 4) and the
token ids (8). Other architectures (``model.path``) get the same formula from their config's widths, an
approximation.

**Working sets** on top of the saved activations, the larger of
- the masked-only head (``models/masked_head.py``): 8 c V for the fp32 logits of one chunk and one fp32
  temporary, plus 4 V d for the fp32 weight-gradient accumulator if the head trains; c assumes every position
  may be masked (t near 1). The full-logits path (``loss_head: full``, other Hugging Face models) holds
  e n V + 8 n V instead;
- one block's backward: e n 3 f (the gate/up gradients), plus one recomputed block when blocks are
  checkpointed.

**DeepSpeed's buffers**: ZeRO-3 e (reduce_bucket_size + min(stage3_prefetch_bucket_size, P) + the largest
gathered unit: a block, the embedding or the head); stages 1-2 on several ranks e reduce_bucket_size; stage 0 on
several ranks e min(5e8, T) for the all-reduce bucket. On CPU the reduce bucket counts at most T elements (its
untouched pages are never resident).

Device peak = buffers + max(static states + saved activations + working set, static states + gradients + the
update's fp32 gradient).

**Host memory** per process: a baseline (Python, torch, DeepSpeed, CUDA's host libraries), plus the larger of
building the model (stages 0-2 build it whole in fp32 on the host, 4 P, before moving it to the GPU; ZeRO-3 builds
it partitioned) and the offloaded states: fp32 master, moments and update gradient, plus the bf16 gradient
partition at ZeRO-3, 18 T / W bytes (16 T / W at stages 1-2), and the weights e P / W with ``offload_params``,
all times 1.5 for pinned buffers (``PINNED_FACTOR``; DeepSpeed's estimator uses the same bytes and factor). A CPU
run holds everything on the host. The processes of one host share its memory.

Not modelled: the P-POTS offline estimate and the online probe (no-grad forwards, smaller than a training step's
saved activations at the same tokens), compilation workspaces, NCCL's buffers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from mdm_scale.config.deepspeed_json import build_deepspeed_config, resolve_precision
from mdm_scale.config.schema import Config, ConfigError

GIB = 2**30
GPU_USABLE = 0.95
"""Fraction of a GPU's memory the plan may fill: the rest is the CUDA context and the caching allocator's
fragmentation (measured reserved/allocated ratios 1.07-1.14 leave this margin on the edge cases of
docs/benchmarks.md)."""
CARD_80GB = int(79.1 * GIB)
"""What an 80 GB card (H100, A100) reports as its memory: the unit of the plan's "needs N GPUs"."""
HOST_BASELINE = {"cuda": 3 * GIB, "cpu": 1 * GIB}
"""Host memory of one process before the model: Python, torch, DeepSpeed (and CUDA's host libraries)."""
PINNED_FACTOR = 1.5
"""Host memory of offloaded states over their bytes: pinned allocations are rounded up to powers of two and
DeepSpeed stages copies (its estimator ``estimate_zero3_model_states_mem_needs`` uses the same 1.5). Without it
the issue's 7B run offloaded on a 125 GiB host would have been planned at ~100 GiB; the kernel killed it."""
FIX_LORA_RANK = 16
"""The LoRA rank the plan proposes as a fix (dllm's and peft's usual choice)."""


class MemoryPlanError(ConfigError):
    """The configuration does not fit this machine (the one-line message names the numbers and the fixes)."""


class ModelNotCountable(RuntimeError):
    """A ``model.path`` architecture that cannot be built on the meta device (its own code allocates)."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about the model, read from a meta-device instance."""

    parameters: int
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    heads: int
    vocab: int
    largest_unit: int
    """Parameters of the largest ZeRO-3 gather unit: a transformer block, the embedding or the head."""
    trained_inputs: int
    """Per block, the summed input widths of the linear layers whose inputs the backward keeps (trained weight
    or adapter), o_proj's apart: d + d + f with every layer trained."""
    output_projection_input: int
    """o_proj's input width if kept (d), else 0: on GPU a copy of attention's output, on CPU a view of it."""
    output_projection_dropout: bool
    """o_proj is adapted with dropout: its input is a new tensor on CPU too."""
    norms_train: bool
    """The RMSNorm weights train (not under LoRA): eager kernels then also keep each norm's fp32 output."""
    lora_ranks: int
    """Per block, the summed ranks of the adapted layers (elements per token their rank-r products keep)."""
    lora_dropout_inputs: int
    """Per block, the summed input widths of adapted layers with dropout (their dropped copy and mask)."""
    head_trains: bool
    masked_head: bool
    head_chunk: int
    builtin: bool


@dataclass(frozen=True)
class Machine:
    """Memory this rank may use: ``device_bytes`` None means a CPU run (the device is the host)."""

    device_bytes: int | None
    host_available: int
    ranks_per_host: int
    device_name: str = "cpu"


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank (``host_total``: per host)."""

    weights: int
    gradients: int
    optimizer: int
    update: int
    activations: int
    working: int
    buffers: int
    device_peak: int
    host_per_rank: int
    host_total: int
    offloaded: int


@dataclass(frozen=True)
class MemoryPlan:
    cfg: Config
    world_size: int
    shape: ModelShape
    machine: Machine
    estimate: Estimate
    vocab_source: str = ""
    """Where the vocabulary size came from (the tokenizer may be built only after the plan)."""

    @property
    def zero_stage(self) -> int:
        return self.cfg.train.zero_stage

    @property
    def device_budget(self) -> int | None:
        return None if self.machine.device_bytes is None else int(GPU_USABLE * self.machine.device_bytes)

    @property
    def fits_device(self) -> bool:
        return self.device_budget is None or self.estimate.device_peak <= self.device_budget

    @property
    def fits_host(self) -> bool:
        return self.estimate.host_total <= self.machine.host_available

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    def lines(self) -> list[str]:
        e, s, cfg = self.estimate, self.shape, self.cfg
        t = cfg.train
        lora = f", LoRA rank {cfg.model.lora.rank}" if cfg.model.lora.rank else ""
        offload = "".join([", optimizer offloaded" if t.offload_optimizer else "",
                           ", parameters offloaded" if t.offload_params else ""])
        where = f"GPU {self.machine.device_name}, {_g(self.machine.device_bytes)} ({_g(self.device_budget)} usable)" \
            if self.machine.device_bytes is not None else "CPU (the host holds everything)"
        blocks = _checkpointed(cfg, s.layers)
        lines = [
            f"memory plan (per rank; {self.world_size} rank(s), ZeRO-{self.zero_stage}, "
            f"{resolve_precision(cfg, self.machine.device_bytes is not None)}{lora}{offload}; {where}):",
            f"  model: {s.parameters / 1e9:.2f}B parameters, {s.trainable / 1e6:.1f}M trained, vocabulary {s.vocab}"
            f"{f' ({self.vocab_source})' if self.vocab_source else ''}",
            f"  model states: weights {_g(e.weights)}, gradients {_g(e.gradients)}, fp32 master + Adam moments "
            f"{_g(e.optimizer)}, update gradient {_g(e.update)}",
            f"  activations: {_rows(cfg)} x {cfg.data.seq_len} tokens, {blocks}/{s.layers} blocks checkpointed: "
            f"{_g(e.activations)} kept, {_g(e.working)} working set (head or one block's backward)",
            f"  DeepSpeed buffers {_g(e.buffers)}; peak {_g(e.device_peak)} on the "
            f"{'GPU' if self.machine.device_bytes is not None else 'host'}",
            f"  host: {_g(e.host_per_rank)} per process ({_g(e.offloaded)} offloaded) x {self.machine.ranks_per_host} "
            f"= {_g(e.host_total)} of {_g(self.machine.host_available)} available",
        ]
        if not cfg.model.lora.rank:
            lines.append(f"  full fine-tuning at this micro-batch needs {gpus_needed(self, CARD_80GB)} x 80 GB "
                         f"GPU(s) at ZeRO-3")
        lines.append(f"  verdict: {'fits' if self.fits else 'does NOT fit'}")
        return lines

    def refusal(self) -> str:
        """The one-line error: the numbers, then each single change that would fit, with its estimate."""
        e = self.estimate
        if not self.fits_device:
            problem = f"needs {_g(e.device_peak)} per GPU but {self.machine.device_name} has " \
                      f"{_g(self.device_budget)} usable ({GPU_USABLE:.0%} of {_g(self.machine.device_bytes)})"
        else:
            problem = f"needs {_g(e.host_total)} of host memory ({self.machine.ranks_per_host} process(es) x " \
                      f"{_g(e.host_per_rank)}, {_g(e.offloaded)} of it offloaded states) but the host has " \
                      f"{_g(self.machine.host_available)} available"
        parts = (f"weights {_g(e.weights)}, gradients {_g(e.gradients)}, optimizer {_g(e.optimizer)}, "
                 f"activations {_g(e.activations)} + {_g(e.working)}, buffers {_g(e.buffers)}")
        fixes = fixes_that_fit(self)
        advice = "fits with: " + "; ".join(map(str, fixes)) if fixes else "no single change fits this machine"
        if self.machine.device_bytes is None and not self.cfg.model.lora.rank:
            advice += f"; on 80 GB GPUs it needs {gpus_needed(self, CARD_80GB)} (ZeRO-3)"
        return (f"memory plan: {self.shape.parameters / 1e9:.2f}B parameters at ZeRO-{self.zero_stage} {problem} "
                f"({parts}); {advice}; or set train.memory_check=false to try anyway")


def _g(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f} GiB"


def _rows(cfg: Config) -> int:
    """Rows of one forward: MIRROR doubles the sequences (``masks: auto`` halves them first, so it counts 1)."""
    return cfg.train.micro_batch_size * cfg.variance.masks.rows_per_sequence


def _checkpointed(cfg: Config, layers: int) -> int:
    if not cfg.model.activation_checkpointing:
        return 0
    blocks = cfg.model.checkpoint_blocks
    return layers if blocks is None else min(blocks, layers)


# ---- the model, counted on the meta device ------------------------------------------------------------------
def model_shape(cfg: Config, vocab_size: int, hf_config) -> ModelShape:
    """Count the model ``cfg`` builds (with LoRA) on the meta device: no memory, a second at 8B."""
    from mdm_scale.models.lora import add_lora
    from mdm_scale.models.modeling_mdm import Block, MDMForMaskedDiffusion

    with torch.device("meta"):
        model = _meta_model(cfg, vocab_size, hf_config)
        if cfg.model.lora.rank:
            add_lora(model, cfg.model.lora, cfg.seed)
    config = model.config
    d = _config_value(config, "hidden_size", "d_model", "n_embd")
    heads = _config_value(config, "num_attention_heads", "n_heads", "n_head")
    kv = getattr(config, "num_key_value_heads", None) or heads
    blocks = [m for m in model.modules() if isinstance(m, Block)] or _repeated_blocks(model)
    block = blocks[0] if blocks else model
    trained_inputs, o_input, lora_ranks, dropout_inputs, o_dropout = _block_linear_terms(block)
    norms = [m for m in block.modules() if "norm" in type(m).__name__.lower()]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else (model.model.get_output_embeddings() if hasattr(model, "model") else None)
    units = [sum(p.numel() for p in m.parameters()) for m in (*blocks[:1], *embeddings, *([head] if head else []))]
    builtin = isinstance(model, MDMForMaskedDiffusion)
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        layers=_config_value(config, "num_hidden_layers", "n_layers", "n_layer"), hidden=d,
        intermediate=getattr(config, "intermediate_size", None) or 4 * d,
        kv_width=kv * (d // heads), heads=heads, vocab=config.vocab_size,
        largest_unit=max(units) if units else 0,
        trained_inputs=trained_inputs, output_projection_input=o_input, lora_ranks=lora_ranks,
        lora_dropout_inputs=dropout_inputs, output_projection_dropout=o_dropout,
        norms_train=any(p.requires_grad for m in norms for p in m.parameters()),
        head_trains=head is not None and any(p.requires_grad for p in head.parameters()),
        masked_head=builtin and getattr(config, "loss_head", "masked") == "masked",
        head_chunk=getattr(config, "head_chunk_tokens", 8192), builtin=builtin)


def counted_parameters(cfg: Config, vocab_size: int, hf_config) -> int | None:
    """Parameters of the model ``cfg`` builds (``model_shape``), or None for a ``model.path`` architecture that
    cannot be built on the meta device."""
    try:
        return model_shape(cfg, vocab_size, hf_config).parameters
    except ModelNotCountable:
        return None


def _meta_model(cfg: Config, vocab_size: int, hf_config) -> nn.Module:
    from transformers import AutoModel, AutoModelForMaskedLM

    from mdm_scale.models.configuration_mdm import MDMConfig
    from mdm_scale.models.loading import builtin_config
    from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

    if hf_config is None:
        return MDMForMaskedDiffusion(builtin_config(cfg, vocab_size, None))
    if hf_config.model_type == MDMConfig.model_type:
        return MDMForMaskedDiffusion(hf_config)
    remote = cfg.model.trust_remote_code
    try:
        try:
            return AutoModelForMaskedLM.from_config(hf_config, trust_remote_code=remote)
        except ValueError:  # LLaDA registers its LM head model only as AutoModel
            return AutoModel.from_config(hf_config, trust_remote_code=remote)
    except Exception as err:  # any failure of another project's modelling code: no plan, not a failed run
        raise ModelNotCountable(f"{type(err).__name__}: {err}") from err


def _config_value(config, *names: str) -> int:
    """The first of ``names`` that ``config`` has (another project's config may name its width ``d_model``);
    ModelNotCountable if it has none."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ModelNotCountable(f"its config ({type(config).__name__}) has none of {', '.join(names)}")


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The longest ``nn.ModuleList`` of another architecture: its transformer layers."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _block_linear_terms(block: nn.Module) -> tuple[int, int, int, int, bool]:
    """Per block: (input widths the backward keeps, except o_proj's; o_proj's; LoRA ranks; input widths of
    adapted layers with dropout; o_proj adapted with dropout). A linear layer's input is kept when its weight
    trains or it is adapted."""
    from peft.tuners.lora import LoraLayer

    kept = kept_o = ranks = dropped = 0
    o_dropout = False
    inside_adapters: set[int] = set()
    for name, module in block.named_modules():
        if id(module) in inside_adapters:
            continue
        width = 0
        if isinstance(module, LoraLayer):
            inside_adapters.update(id(sub) for sub in module.modules())
            width = module.get_base_layer().in_features
            ranks += sum(module.r.values())
            if any(not isinstance(drop, nn.Identity) for drop in module.lora_dropout.values()):
                dropped += width
                o_dropout = o_dropout or name.endswith("o_proj")
        elif isinstance(module, nn.Linear) and module.weight.requires_grad:
            width = module.in_features
        if name.endswith("o_proj"):
            kept_o += width
        else:
            kept += width
    return kept, kept_o, ranks, dropped, o_dropout


# ---- the arithmetic -----------------------------------------------------------------------------------------
def activation_bytes_per_token(shape: ModelShape, e: int, on_gpu: bool, fused: bool) -> int:
    """Bytes one token keeps for the backward pass in one non-checkpointed block (the module docstring's formula)."""
    d, f, k = shape.hidden, shape.intermediate, shape.kv_width
    attention = 4 * d if k != d else 3 * d + 3 * k
    copied = on_gpu or shape.output_projection_dropout
    elements = 2 * d + attention + 2 * f + shape.trained_inputs + shape.lora_ranks + \
        (shape.output_projection_input if copied else 0)
    bytes_ = e * (elements + shape.lora_dropout_inputs) + 4 * shape.heads + 8
    if not fused:
        bytes_ += 2 * ((8 if shape.norms_train else 4) * d - e * d) + e * f
    return bytes_


def estimate(cfg: Config, world_size: int, shape: ModelShape, machine: Machine) -> Estimate:
    on_gpu = machine.device_bytes is not None
    e = 2 if resolve_precision(cfg, on_gpu) == "bf16" else 4
    t = cfg.train
    P, T, W, stage = shape.parameters, shape.trainable, world_size, t.zero_stage
    zero = build_deepspeed_config(cfg, W, on_gpu)["zero_optimization"]
    offload_opt, offload_params = t.offload_optimizer and stage >= 1, t.offload_params and stage == 3

    weights = e * P // (W if stage == 3 else 1)
    grads_static = e * T // W if stage == 3 else 0
    grads_step = e * T // (W if stage >= 2 else 1)
    master = 0 if (e == 4 and stage == 0) else 4 * T // (W if stage >= 1 else 1)
    moments = 8 * T // (W if stage >= 1 else 1)
    if e == 4:  # an fp32 run's gradients are already fp32
        update = 0
    elif stage == 0:
        update = 4 * T
    elif stage == 3:
        update = 4 * min(T // W, int(zero.get("sub_group_size", 10**9)))
    else:
        update = 4 * T // W
    offloaded = 0
    if offload_opt:  # DeepSpeed's own estimator's bytes per trained parameter, times its buffer factor
        offloaded += int(PINNED_FACTOR * (18 if stage == 3 else 16) * T / W)
        master = moments = update = grads_static = 0
    if offload_params:
        offloaded += int(PINNED_FACTOR * weights)
        weights = 0
    static = weights + grads_static + master + moments

    n = _rows(cfg) * cfg.data.seq_len
    fused = cfg.model.fused_kernels if cfg.model.fused_kernels is not None else on_gpu
    per_block = activation_bytes_per_token(shape, e, on_gpu, fused)
    k = _checkpointed(cfg, shape.layers)
    d, V = shape.hidden, shape.vocab
    kept = n * ((shape.layers - k) * per_block + k * e * d + e * d + 12)
    if shape.masked_head:
        head = 8 * min(shape.head_chunk, n) * V + e * min(shape.head_chunk, n) * d
    else:
        head = (e + 8) * n * V
    head += 4 * V * d if shape.head_trains else 0
    block_backward = e * n * 3 * shape.intermediate + (n * per_block if k else 0)
    working = max(head, block_backward)

    # DeepSpeed allocates the reduce bucket whole; host pages are only resident once written (CPU runs: at most T)
    bucket = int(zero.get("reduce_bucket_size", 5 * 10**8))
    bucket = bucket if on_gpu else min(bucket, T)
    if stage == 3:
        buffers = e * (bucket + min(int(zero.get("stage3_prefetch_bucket_size", 5 * 10**8)), P) + shape.largest_unit)
    elif W == 1:
        buffers = 0
    elif stage == 0:
        buffers = e * min(5 * 10**8, T)
    else:
        buffers = e * bucket
    backward_peak = static + kept + working
    step_peak = static + (grads_step if stage < 3 else 0) + update
    device_peak = buffers + max(backward_peak, step_peak)

    baseline = HOST_BASELINE["cuda" if on_gpu else "cpu"]
    if on_gpu:
        build = 4 * P if stage < 3 else 4 * shape.largest_unit
        host_per_rank = baseline + max(build, offloaded)
    else:
        host_per_rank = baseline + device_peak + offloaded
    return Estimate(weights, grads_step if stage < 3 else grads_static, master + moments, update, kept, working,
                    buffers, device_peak, host_per_rank, host_per_rank * machine.ranks_per_host, offloaded)


def make_plan(cfg: Config, world_size: int, shape: ModelShape, machine: Machine, vocab_source: str = ""
              ) -> MemoryPlan:
    """The plan for ``cfg``, whose ``train.zero_stage`` is a number (the trainer resolves ``auto`` first:
    ``training/zero_stage.py``)."""
    return MemoryPlan(cfg, world_size, shape, machine, estimate(cfg, world_size, shape, machine), vocab_source)


# ---- fixes --------------------------------------------------------------------------------------------------
def gpus_needed(plan: MemoryPlan, card_bytes: int, limit: int = 4096) -> str:
    """The fewest GPUs of ``card_bytes`` that hold this configuration at ZeRO-3 (activations do not shrink with
    more GPUs, so some configurations never fit: then "more than ``limit``")."""
    cfg = replace(plan.cfg, train=replace(plan.cfg.train, zero_stage=3, offload_optimizer=False, offload_params=False))
    machine = Machine(card_bytes, 2**62, 1, "80 GB")
    for w in _candidate_world_sizes(limit):
        if make_plan(cfg, w, plan.shape, machine).fits_device:
            return str(w)
    return f"more than {limit}"


def _candidate_world_sizes(limit: int) -> list[int]:
    return list(range(1, 17)) + [2**i for i in range(5, int(math.log2(limit)) + 1)]


@dataclass(frozen=True)
class Fix:
    """One change of the configuration (or of the number of GPUs) and the plan it gives."""

    change: str
    plan: MemoryPlan

    def __str__(self) -> str:
        e = self.plan.estimate
        host = f", host {_g(e.host_total)}" if e.offloaded else ""
        return f"{self.change} ({_g(e.device_peak)}{host})"


def fixes_that_fit(plan: MemoryPlan) -> list[Fix]:
    """Each single change that makes the plan fit this machine: more GPUs (ZeRO-3), optimizer offload, LoRA, the
    largest smaller micro-batch, the fewest checkpointed blocks."""
    cfg, t, m = plan.cfg, plan.cfg.train, plan.machine
    candidates: list[tuple[str, str, Config, int, ModelShape]] = []  # (kind, change, config, world size, model)
    if m.device_bytes is not None:
        zero3 = replace(cfg, train=replace(t, zero_stage=3))
        candidates += [("gpus", f"{w} GPUs at train.zero_stage=3", zero3, w, plan.shape)
                       for w in _candidate_world_sizes(4096) if w > plan.world_size]
        if not t.offload_optimizer:
            stage = "" if plan.zero_stage else " train.zero_stage=2"
            candidates.append(("offload", f"train.offload_optimizer=true{stage}",
                               replace(cfg, train=replace(t, offload_optimizer=True, zero_stage=plan.zero_stage or 2)),
                               plan.world_size, plan.shape))
    if not cfg.model.lora.rank:
        lora = replace(cfg, model=replace(cfg.model, lora=replace(cfg.model.lora, rank=FIX_LORA_RANK)))
        candidates.append(("lora", f"model.lora.rank={FIX_LORA_RANK}", lora, plan.world_size, _lora_shape(plan.shape)))
    for micro in range(t.micro_batch_size - 1, 0, -1):
        accum = t.micro_batch_size * t.grad_accum / micro
        keep = f" train.grad_accum={int(accum)}" if accum == int(accum) else ""
        candidates.append(("micro", f"train.micro_batch_size={micro}{keep}",
                           replace(cfg, train=replace(t, micro_batch_size=micro, global_batch_size=None)),
                           plan.world_size, plan.shape))
    if plan.shape.builtin:
        for blocks in range(_checkpointed(cfg, plan.shape.layers) + 1, plan.shape.layers + 1):
            model = replace(cfg.model, activation_checkpointing=True, checkpoint_blocks=blocks)
            candidates.append(("checkpointing", f"model.activation_checkpointing=true model.checkpoint_blocks={blocks}",
                               replace(cfg, model=model), plan.world_size, plan.shape))
    fixes, kinds = [], set()
    for kind, change, new, world, shape in candidates:  # the first that fits of each kind (fewest GPUs, ...)
        if kind not in kinds:
            candidate = make_plan(new, world, shape, m)
            if candidate.fits:
                fixes.append(Fix(change, candidate))
                kinds.add(kind)
    return fixes


def _lora_shape(shape: ModelShape) -> ModelShape:
    """The shape with rank-``FIX_LORA_RANK`` adapters on the default targets, without building anything: every
    linear layer of a built-in block adapted (qkv d -> d + 2k, o d -> d, gate/up d -> 2f, down f -> d)."""
    d, f, k, r, L = shape.hidden, shape.intermediate, shape.kv_width, FIX_LORA_RANK, shape.layers
    adapters = L * r * ((d + d + 2 * k) + (d + d) + (d + 2 * f) + (f + d))
    return replace(shape, trainable=adapters, parameters=shape.parameters + adapters, lora_ranks=4 * r,
                   trained_inputs=2 * d + f, output_projection_input=d, lora_dropout_inputs=0, head_trains=False,
                   output_projection_dropout=False, norms_train=False)


# ---- this machine -------------------------------------------------------------------------------------------
def this_machine(device: torch.device, world_size: int) -> Machine:
    """The GPU's memory (None on CPU), the host's available memory and how many ranks share this host."""
    import psutil

    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        ranks = int(local) if local else min(world_size, torch.cuda.device_count())
        return Machine(props.total_memory, psutil.virtual_memory().available, ranks, props.name)
    return Machine(None, psutil.virtual_memory().available, int(local) if local else world_size)


def vocab_for_plan(cfg: Config, hf_config, saved_tokenizer: Path) -> tuple[int, str]:
    """The vocabulary size the model will have, before the data is read, and where it came from: the model
    config's, the tokenizer directory's or the run's saved tokenizer; else (a character tokenizer not built
    yet, or a tokenizer directory that is missing, which the data step reports) the preset's, or 256."""
    from transformers import AutoTokenizer

    from mdm_scale.config.presets import PRESETS

    if hf_config is not None:
        return int(hf_config.vocab_size), "model.path"
    candidates = [(saved_tokenizer, "the run's tokenizer")]
    if cfg.data.tokenizer != "char":
        candidates.insert(0, (Path(cfg.data.tokenizer), "data.tokenizer"))
    for directory, source in candidates:
        if (directory / "tokenizer_config.json").is_file():
            return len(AutoTokenizer.from_pretrained(str(directory))), source
    fields = {**PRESETS[cfg.model.preset], **cfg.model.overrides}
    return int(fields.get("vocab_size", 256)), "estimated: the tokenizer is not built yet"
