"""Which parameters AdamW decays: matrices (embeddings, projections) with ``train.weight_decay``, vectors (norm
weights, biases) without. Frozen parameters (``requires_grad`` False) are in no group."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class ParamGroup:
    names: list[str]
    params: list[nn.Parameter]
    weight_decay: float

    def as_torch(self) -> dict:
        """The group as a torch / DeepSpeed optimizer takes it."""
        return {"params": self.params, "weight_decay": self.weight_decay}


def param_groups(model: nn.Module, weight_decay: float) -> list[ParamGroup]:
    """The non-empty groups in model order (DeepSpeed drops empty ones, so these are the optimizer's groups).
    A parameter's rank is that of its full shape (``ds_shape`` under ZeRO-3, where ``shape`` is a placeholder)."""
    decayed, plain = ParamGroup([], [], weight_decay), ParamGroup([], [], 0.0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = decayed if len(getattr(p, "ds_shape", p.shape)) >= 2 else plain
            group.names.append(name)
            group.params.append(p)
    return [g for g in (decayed, plain) if g.params]
