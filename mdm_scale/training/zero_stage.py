"""``train.zero_stage: auto`` made a number for the model a run builds (the trainer and the variance tool)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mdm_scale.config.deepspeed_json import choose_zero_stage
from mdm_scale.config.schema import Config
from mdm_scale.distributed.env import DistEnv
from mdm_scale.models.loading import count_parameters


def resolve_zero_stage(cfg: Config, tokenizer: PreTrainedTokenizerBase, mask_token_id: int | None,
                       hf_config: PretrainedConfig | None, env: DistEnv, log: Callable[[str], None],
                       resumed_stage: int | None = None) -> Config:
    """``cfg`` with ``train.zero_stage: auto`` replaced by the stage ``choose_zero_stage`` picks for this model,
    world size and GPU (logged), and for the stage of the checkpoint it resumes (``resumed_stage``: partitions of
    stages 1-3 cannot load at stage 0); any other setting is returned as it is."""
    if cfg.train.zero_stage != "auto":
        return cfg
    parameters = count_parameters(cfg, tokenizer, mask_token_id, hf_config)
    device_bytes = torch.cuda.get_device_properties(env.device).total_memory if env.on_gpu else None
    stage, why = (3, "model.path: parameters not counted before loading") if parameters is None else \
        choose_zero_stage(parameters, env.world_size, device_bytes, resumed_stage)
    log(f"train.zero_stage auto -> {stage} ({why})")
    return replace(cfg, train=replace(cfg.train, zero_stage=stage))
