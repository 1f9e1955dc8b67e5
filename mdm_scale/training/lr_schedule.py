"""Learning-rate schedule: linear warm-up, then linear or cosine decay to ``min_lr_ratio * lr``, or constant.

For optimiser step s (0-based), W warm-up steps and S total steps:

    factor(s) = (s + 1) / W                                    for s < W
    p = (s - W) / max(1, S - W)
    linear:   factor = m + (1 - m) (1 - p)
    cosine:   factor = m + (1 - m) (1 + cos(pi p)) / 2
    constant: factor = 1

The first step already trains (factor > 0). DeepSpeed steps the scheduler once per optimiser step and saves its
state in checkpoints.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from mdm_scale.config.schema import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    m = cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return m + (1.0 - m) * (1.0 - progress)
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(cfg: TrainConfig):
    """What ``deepspeed.initialize(lr_scheduler=...)`` takes: a callable from optimizer to scheduler."""

    def build(optimizer: Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    return build
