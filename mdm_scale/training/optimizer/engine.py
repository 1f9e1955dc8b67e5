"""``deepspeed.initialize`` with the run's parameter groups, learning-rate schedule and optimizer path.

``train.optimizer: deepspeed`` hands DeepSpeed the groups and lets its JSON ``optimizer`` section build FusedAdam
(CUDA) or torch's AdamW (CPU), wrapped by DeepSpeed's stage-0 or ZeRO optimizer. ``fused`` keeps the same
update and replaces the work around it: at stage 0 ``FlatAdamW`` is the client optimizer (and the JSON runs the
engine in fp32 mode, with the parameters cast here); at stages 1-3 DeepSpeed's ZeRO optimizer gets the fused step
of ``zero.py``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from mdm_scale.config.deepspeed_json import resolve_precision, uses_flat_adamw
from mdm_scale.config.errors import ConfigError
from mdm_scale.config.schema import Config
from mdm_scale.training.lr_schedule import scheduler_factory
from mdm_scale.training.optimizer.flat_adamw import FlatAdamW
from mdm_scale.training.optimizer.groups import param_groups
from mdm_scale.training.optimizer.zero import use_fused_step

PRECISION = {"bf16": torch.bfloat16, "fp32": torch.float32}


def require_cpu_adam(cfg: Config) -> None:
    """With ``train.offload_optimizer`` the ZeRO optimizer steps on the host with DeepSpeed's CPU Adam, an op
    DeepSpeed compiles on first use (about a minute, then cached). Load it now, before the data and the model are
    built, so a host where it does not compile (no C++ compiler; CPU flags the compiler rejects, as in DeepSpeed
    issue 7556) stops the run at once, with the compiler's first error, instead of when the engine is built."""
    if not cfg.train.offload_optimizer:
        return
    from deepspeed.ops.op_builder import CPUAdamBuilder

    try:
        CPUAdamBuilder().load(verbose=False)
    except Exception as err:  # torch's extension build raises RuntimeError with the compiler's output
        lines = str(err).splitlines() or [repr(err)]
        first = next((line.strip() for line in lines if "error:" in line), lines[0][:200])
        raise ConfigError(f"config key 'train.offload_optimizer' = True: DeepSpeed's CPU Adam op (cpu_adam) does not "
                          f"build on this host ({first}); fix the compiler set-up (`ds_report` lists the ops), or "
                          f"train without optimizer offload (LoRA, more GPUs)") from err


def initialize_engine(model: nn.Module, cfg: Config, ds_config: dict, on_gpu: bool):
    """The DeepSpeed engine for ``model`` (the JSON from ``build_deepspeed_config``)."""
    import deepspeed

    t = cfg.train
    groups = [g.as_torch() for g in param_groups(model, t.weight_decay)]
    scheduler = None if "scheduler" in ds_config else scheduler_factory(t)
    optimizer = None
    if uses_flat_adamw(cfg):
        dtype = PRECISION[resolve_precision(cfg, on_gpu)]
        for p in model.parameters():  # what the engine's bf16 mode does: parameters only, buffers keep theirs
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        optimizer = partial(FlatAdamW, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                            weight_decay=t.weight_decay, max_grad_norm=t.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                           config=ds_config, lr_scheduler=scheduler)
    if optimizer is not None:
        engine.enable_backward_allreduce = False  # FlatAdamW all-reduces its flat gradient itself
    elif t.optimizer == "fused":
        use_fused_step(engine.optimizer)
    return engine
