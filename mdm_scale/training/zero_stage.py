"""``train.zero_stage: auto`` made a number for the model a run builds (the trainer and the variance tool)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from mdm_scale.config.deepspeed_json import choose_zero_stage
from mdm_scale.config.schema import Config
from mdm_scale.distributed.env import DistEnv


def resolve_zero_stage(cfg: Config, parameters: int | None, env: DistEnv, log: Callable[[str], None],
                       resumed_stage: int | None = None) -> Config:
    """``cfg`` with ``train.zero_stage: auto`` replaced by the stage ``choose_zero_stage`` picks for a model of
    ``parameters`` parameters (the memory plan's count on the meta device; None: not countable), this world size
    and GPU (logged), and for the stage of the checkpoint it resumes (``resumed_stage``: partitions of stages 1-3
    cannot load at stage 0); any other setting is returned as it is."""
    if cfg.train.zero_stage != "auto":
        return cfg
    device_bytes = torch.cuda.get_device_properties(env.device).total_memory if env.on_gpu else None
    stage, why = (3, "model.path: parameters not counted before loading") if parameters is None else \
        choose_zero_stage(parameters, env.world_size, device_bytes, resumed_stage)
    log(f"train.zero_stage auto -> {stage} ({why})")
    return replace(cfg, train=replace(cfg.train, zero_stage=stage))
