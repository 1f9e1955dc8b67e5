"""Generate the DeepSpeed JSON from the run configuration.

Everything DeepSpeed needs is derived from ``train.*``; the ``deepspeed:`` section of the YAML is merged last,
so any DeepSpeed key can be set or overridden there (e.g. ``zero_optimization.stage3_prefetch_bucket_size``).
The learning-rate schedule is not in the JSON: ``training/lr_schedule.py`` hands DeepSpeed a ``LambdaLR`` so
that warm-up and decay are exactly the documented formulas (DeepSpeed's own schedulers start at lr 0 and
cannot decay linearly to a floor). A ``scheduler`` section in ``deepspeed:`` replaces it.
"""

from __future__ import annotations

from typing import Any

from mdm_scale.config.loader import deep_merge
from mdm_scale.config.schema import Config


def resolve_precision(config: Config, on_gpu: bool) -> str:
    if config.train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return config.train.precision


def choose_zero_stage(parameters: int, world_size: int, device_bytes: int | None) -> tuple[int, str]:
    """``train.zero_stage: auto``: the stage and the reason, for a model of ``parameters`` parameters.

    ZeRO-3 gathers every block's parameters before its forward and backward and releases them after, through
    per-module hooks; on one GPU, or whenever each rank can hold the whole bf16 model, that is work for nothing.
    Stage 2 keeps the bf16 parameters whole on every rank (2 bytes each) and partitions gradients, fp32 master
    weights and the two Adam moments (2 + 4 + 4 + 4 bytes plus the fp32 gradient of the update, 16 in all) over
    the ranks, so it needs N (2 + 16 / W) bytes per rank. It is chosen when that is at most half of the GPU's
    memory (the other half for activations and buffers); otherwise, and on CPU (``device_bytes`` None),
    stage 3.
    """
    if device_bytes is None:
        return 3, "no GPU: the CPU path uses stage 3"
    need = parameters * (2 + 16 / world_size)
    verdict = f"model states {need / 2**30:.1f} GiB per rank {{}} half of {device_bytes / 2**30:.0f} GiB"
    if need <= device_bytes / 2:
        return 2, verdict.format("within")
    return 3, verdict.format("over")


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
        "zero_optimization": _zero_section(config),
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
    return deep_merge(ds, config.deepspeed)


def _zero_section(config: Config) -> dict[str, Any]:
    t = config.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=int(5e8))
    if t.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(5e8), stage3_param_persistence_threshold=int(1e5),
                    stage3_gather_16bit_weights_on_model_save=False)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero

