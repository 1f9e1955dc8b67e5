"""Generate the DeepSpeed JSON from the run configuration.

Everything DeepSpeed needs is derived from ``train.*``; the ``deepspeed:`` section of the YAML is merged last,
so any DeepSpeed key can be set or overridden there (e.g. ``zero_optimization.stage3_prefetch_bucket_size``).
The learning-rate schedule is not in the JSON: ``training/lr_schedule.py`` hands DeepSpeed a ``LambdaLR`` so
that warm-up and decay are exactly the documented formulas (DeepSpeed's own schedulers start at lr 0 and
cannot decay linearly to a floor). A ``scheduler`` section in ``deepspeed:`` replaces it.
"""

from __future__ import annotations

import sys
from typing import Any

from mdm_scale.config.loader import deep_merge
from mdm_scale.config.schema import Config


def resolve_precision(config: Config, on_gpu: bool) -> str:
    if config.train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return config.train.precision


STAGE0_BYTES = 18
"""Model-state bytes per parameter at ZeRO stage 0 with bf16: parameters and gradients (2 + 2), the flat gradient
``train.optimizer: fused`` concatenates (2), fp32 master weights and two Adam moments (4 + 4 + 4). DeepSpeed's own
stage-0 optimizer holds an fp32 copy of the gradient instead (up to 6 bytes more while it steps), which the other
half of the memory absorbs."""


def choose_zero_stage(parameters: int, world_size: int, device_bytes: int | None,
                      resumed_stage: int | None = None) -> tuple[int, str]:
    """``train.zero_stage: auto``: the fastest stage whose model states fit within half of the GPU's memory (the
    other half for activations and buffers), and the reason, for a model of ``parameters`` parameters.

    On one GPU that is stage 0: stages 1-3 partition over one rank, which saves no memory and costs work (gradient
    buckets and, at ZeRO-3, per-parameter gradient hooks; one H100, docs/benchmarks.md: stage 0 ahead of 3 by 3%;
    one H200: ahead of 2 by 3%). On several GPUs it is stage 2, which keeps the bf16 parameters whole on every rank
    (2 bytes each) and partitions gradients, fp32 master weights and the two moments (16 bytes in all) over the
    ranks, N (2 + 16 / W) bytes per rank: it divides the optimizer step over the ranks for the communication of
    stage 0's all-reduce (reduce-scatter plus all-gather). When that does not fit, and on CPU (``device_bytes``
    None), stage 3. A run resuming a checkpoint of stage ``resumed_stage`` >= 1 does not move to stage 0, which
    cannot load ZeRO partitions (stage 2 instead when it fits).
    """
    if device_bytes is None:
        return 3, "no GPU: the CPU path uses stage 3"
    half = device_bytes / 2
    verdict = "model states {:.1f} GiB per rank {} half of " + f"{device_bytes / 2**30:.0f} GiB"
    zero0 = parameters * STAGE0_BYTES
    if world_size == 1 and zero0 <= half:
        fits = verdict.format(zero0 / 2**30, "within") + " at stage 0"
        if not resumed_stage:
            return 0, fits
        return 2, f"{fits}, but stage 0 cannot load the stage-{resumed_stage} checkpoint this run resumes"
    zero2 = parameters * (2 + 16 / world_size)
    if zero2 <= half:
        return 2, verdict.format(zero2 / 2**30, "within") + " at stage 2"
    return 3, verdict.format(zero2 / 2**30, "over") + " at stage 2"


def uses_flat_adamw(config: Config) -> bool:
    """``train.optimizer: fused`` at stage 0: ``FlatAdamW`` is DeepSpeed's client optimizer (``training/optimizer``),
    owning the master weights, the precision cast, clipping and the gradient all-reduce."""
    return config.train.optimizer == "fused" and config.train.zero_stage == 0


def build_deepspeed_config(config: Config, world_size: int, on_gpu: bool) -> dict[str, Any]:
    t = config.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,  # mdm-scale logs itself
        "wall_clock_breakdown": False,
        "bf16": {"enabled": resolve_precision(config, on_gpu) == "bf16"},
        "zero_optimization": _zero_section(config, world_size),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.adam_beta1, t.adam_beta2],
                "eps": t.adam_eps,
                "weight_decay": t.weight_decay,
                # FusedAdam needs CUDA; on CPU the plain torch AdamW runs (no op build).
                "torch_adam": not on_gpu and not t.offload_optimizer,
            },
        },
    }
    if uses_flat_adamw(config):
        # The client optimizer does the precision, clipping and update: the engine runs in fp32 mode, so that it
        # neither wraps the optimizer nor casts the model (the trainer casts it), and clips nothing itself.
        ds.update(gradient_clipping=0.0, bf16={"enabled": False})
        del ds["optimizer"]
    return deep_merge(ds, config.deepspeed)


def _zero_section(config: Config, world_size: int) -> dict[str, Any]:
    t = config.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=int(5e8))
    if t.zero_stage == 3:
        # memory_efficient_linear (DeepSpeed's default: on) replaces torch.nn.functional.linear for the whole
        # process with a function that keeps every linear layer's input for backward, also where the weight is
        # frozen (LoRA's base layers), which torch's own linear does not: off, the activations are the ones the
        # memory plan counts (tests/test_memory_plan.py) and nothing outside the engine is patched.
        zero.update(stage3_prefetch_bucket_size=int(5e8), stage3_param_persistence_threshold=int(1e5),
                    stage3_gather_16bit_weights_on_model_save=False, memory_efficient_linear=False)
        if world_size == 1 and not t.offload_params:
            # On one rank a gathered parameter is a view of its own partition (DeepSpeed's no-gather path), so
            # keeping every parameter gathered ("persistent") costs no memory and skips the fetch and release
            # bookkeeping of every block in forward and backward; the fused step then also skips releasing and
            # re-gathering them around the update (training/optimizer/zero.py). docs/benchmarks.md measures it.
            zero["stage3_param_persistence_threshold"] = sys.maxsize
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero

