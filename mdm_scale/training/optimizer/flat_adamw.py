"""ZeRO stage 0: AdamW over flat fp32 master buffers, handed to DeepSpeed as the client optimizer.

At stage 0 DeepSpeed's bf16 path wraps any optimizer in its ``FP16_Optimizer``, whose step checks every gradient
for Inf/NaN (a pass and a host synchronisation), casts each gradient to fp32 and copies it into a flat buffer,
takes the norm, multiplies the flat gradient by the clipping factor (even when it is 1), runs FusedAdam and copies
the master weights back parameter by parameter; before that, the engine all-reduces the gradients through
flatten / copy-back buckets even on one rank. ``FlatAdamW`` does the same update with three passes over the
gradient: concatenate each group's gradients (one flat low-precision buffer), the norm (the one synchronisation,
which also tells whether the step is applied), and the fused update of ``adamw.py`` that writes the master, the
moments and the model's low-precision copy at once. The model's parameters are views into one low-precision
buffer per group, so that copy is a single write.

The engine runs in fp32 mode (the JSON's bf16 section off, ``build_deepspeed_config``), so it neither wraps nor
casts; the trainer has cast the parameters, and this optimizer does what the engine would otherwise do: the
all-reduce of the gradients (a sum over ranks in the parameters' precision, divided out in the update's scale),
clipping (``gradient_clipping`` is 0 in the JSON), skipping a step whose gradient norm is not finite (``overflow``,
read by ``engine.was_step_applied()``) and reporting the norm (``_global_grad_norm``).

Checkpoints hold the state in the layout of DeepSpeed's ``FP16_Optimizer`` (the inner optimizer's state dict, one
flat tensor per group, and ``fp32_groups_flat``), so a bf16 stage-0 checkpoint written by either optimizer resumes
with the other, and ``universal.py`` converts both alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mdm_scale.training.optimizer.adamw import apply_updates, clip_coefficient, flat_update, global_norm

INNER_STATE, MASTERS, CLIP = "optimizer_state_dict", "fp32_groups_flat", "clip_grad"
"""The keys of DeepSpeed's FP16_Optimizer state dict (``deepspeed.checkpoint.constants``)."""


class FlatAdamW(torch.optim.Optimizer):
    """``param_groups``: the trainer's groups of model parameters (already in the model's precision), each with
    its ``weight_decay``; ``max_grad_norm`` 0 turns clipping off; ``process_group``: the data-parallel ranks."""

    def __init__(self, param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, max_grad_norm: float, process_group=None):
        self.model_groups = [list(g["params"]) for g in param_groups if g["params"]]
        self.lp_flat = []
        masters = []
        for params in self.model_groups:
            buffer = torch.cat([p.detach().reshape(-1) for p in params])
            offset = 0
            for p in params:
                p.data = buffer.narrow(0, offset, p.numel()).view_as(p)
                offset += p.numel()
            self.lp_flat.append(buffer)
            masters.append(buffer.to(torch.float32, copy=True))
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [m]}
                  for g, m in zip((g for g in param_groups if g["params"]), masters)]
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=True))
        self.max_grad_norm, self.process_group = max_grad_norm, process_group
        self.overflow = False
        self._global_grad_norm: float | None = None

    @property
    def masters(self) -> list[torch.Tensor]:
        return [g["params"][0] for g in self.param_groups]

    def _world(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_initialized() else 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        for params in self.model_groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = []
        for params in self.model_groups:
            grads.append(torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
                                    for p in params]))
            for p in params:
                p.grad = None
        world = self._world()
        if world > 1:
            for g in grads:
                dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self.process_group)
        norm = global_norm(grads, divide_by=world)
        self.overflow = not math.isfinite(norm)
        if self.overflow:
            self._global_grad_norm = math.inf
            return None
        self._global_grad_norm = norm
        updates = [flat_update(self, group, group["params"][0], g, lp)
                   for group, g, lp in zip(self.param_groups, grads, self.lp_flat)]
        apply_updates(updates, clip_coefficient(norm, self.max_grad_norm) / world)
        return None

    # ---- checkpoints: FP16_Optimizer's layout -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {INNER_STATE: super().state_dict(), MASTERS: self.masters, CLIP: self.max_grad_norm}

    def load_state_dict(self, state_dict: dict) -> None:
        if MASTERS not in state_dict:
            raise ValueError("this stage-0 checkpoint holds one optimizer state per parameter (DeepSpeed's fp32 stage "
                             "0), which train.optimizer=fused does not read at stage 0; resume it with "
                             "train.optimizer=deepspeed, or at ZeRO stage 1-3")
        super().load_state_dict(state_dict[INNER_STATE])
        for master, saved, lp in zip(self.masters, state_dict[MASTERS], self.lp_flat, strict=True):
            master.copy_(saved)
            lp.copy_(master)
