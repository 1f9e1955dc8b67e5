"""One AdamW step over flat buffers in one pass over memory, and the gradient norm that clips it.

For every element, with g the gradient in the model's precision, c the gradient scale (the clipping coefficient,
times 1/W where the caller summed gradients over W ranks) and t the step count after it was incremented:

    g'  = c g                                           (in fp32)
    m  <- beta1 m + (1 - beta1) g'
    v  <- beta2 v + (1 - beta2) g'^2
    p  <- p - lr ( (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + wd p )
    out <- p                                            (the model's copy, in its precision)

These are the formulas of DeepSpeed's FusedAdam in AdamW mode (``ops/csrc/adam/multi_tensor_adam.cu``), the
optimizer the JSON's ``AdamW`` selects on CUDA; ``torch.optim.AdamW`` computes the same update with the decay
applied as ``p (1 - lr wd)`` and the denominator as ``sqrt(v) / sqrt(1 - beta2^t) + eps`` (equal up to rounding).
The clipping coefficient is ``min(1, max_norm / (||g|| + 1e-6))`` (``clip_coefficient``), DeepSpeed's and
``torch.nn.utils.clip_grad_norm_``'s.

On CUDA the update is compiled (``torch.compile``) into one kernel that reads the low-precision gradient, the fp32
master weight and both moments (2 + 12 bytes per parameter) and writes the master, the moments and the
low-precision copy (12 + 2 bytes): 28 bytes per parameter, against a cast of the gradient to fp32, a separate
clipping pass and a copy back in DeepSpeed's optimizers. Elsewhere (CPU) the same function runs eagerly. The
hyper-parameters travel as one small tensor (``SCALARS``), so a new learning rate never recompiles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

SCALARS = ("lr", "weight_decay", "beta1", "beta2", "eps", "bias_correction1", "bias_correction2", "grad_scale")
"""The per-group numbers each update reads, in this order."""

NORM_EPS = 1e-6
"""Added to the gradient norm before it divides the clipping threshold (DeepSpeed, torch)."""


def adamw_update(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 out: torch.Tensor, scalars: torch.Tensor) -> None:
    """The update of the module docstring on 1-D tensors of one length, in place; ``scalars`` holds ``SCALARS``
    (fp32, on the tensors' device)."""
    lr, weight_decay, beta1, beta2, eps, correction1, correction2, scale = scalars.unbind()
    g = grad.float() * scale
    m = exp_avg * beta1 + g * (1 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1 - beta2)
    p = master - lr * ((m / correction1) / (torch.sqrt(v / correction2) + eps) + weight_decay * master)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    master.copy_(p)
    out.copy_(p)


@functools.cache
def _compiled_update():
    return torch.compile(adamw_update, dynamic=True, fullgraph=True)


def update_kernel(device: torch.device):
    """``adamw_update`` compiled into one kernel on CUDA, eager elsewhere."""
    return _compiled_update() if device.type == "cuda" else adamw_update


@dataclass
class FlatUpdate:
    """One AdamW update of a flat fp32 master buffer: its gradient (any float dtype), moments, the low-precision
    buffer it writes and its group's hyper-parameters; ``step`` is the step count after this update."""

    master: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    out: torch.Tensor
    group: dict
    step: int

    def scalars(self, grad_scale: float) -> list[float]:
        beta1, beta2 = self.group["betas"]
        return [self.group["lr"], self.group["weight_decay"], beta1, beta2, self.group["eps"],
                1.0 - beta1 ** self.step, 1.0 - beta2 ** self.step, grad_scale]


@torch.no_grad()
def apply_updates(updates: list[FlatUpdate], grad_scale: float) -> None:
    """Run ``updates`` (one kernel each). Their hyper-parameters go to the device in one copy from pinned memory,
    which does not wait for the device (a copy from pageable memory would wait for the queued kernels)."""
    if not updates:
        return
    device = updates[0].master.device
    scalars = torch.tensor([u.scalars(grad_scale) for u in updates], dtype=torch.float32)
    if device.type == "cuda":
        scalars = scalars.pin_memory().to(device, non_blocking=True)
    kernel = update_kernel(device)
    for update, row in zip(updates, scalars):
        kernel(update.master, update.grad, update.exp_avg, update.exp_avg_sq, update.out, row)


def _counts_steps_in_tensors(optimizer: torch.optim.Optimizer) -> bool:
    """torch's Adam/AdamW keep the step count as a tensor; DeepSpeed's FusedAdam and ``FlatAdamW`` as an int."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def adam_state(optimizer: torch.optim.Optimizer, master: torch.Tensor, group: dict) -> dict:
    """``optimizer.state[master]``, created as the optimizer itself would at its first step: zero moments and the
    step count in the optimizer's type (FusedAdam starts from the group's count, if any). The state, and so every
    checkpoint, keeps the optimizer's own format."""
    state = optimizer.state[master]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32) if _counts_steps_in_tensors(optimizer) \
            else group.get("step", 0)
        state["exp_avg"] = torch.zeros_like(master)
        state["exp_avg_sq"] = torch.zeros_like(master)
    return state


def match_step_types(optimizer) -> None:
    """Give every step count in the state of ``optimizer`` (or of the torch optimizer a DeepSpeed wrapper holds as
    ``.optimizer``) the type its own step expects. A universal checkpoint stores ints; a checkpoint written with
    torch's AdamW (CPU) holds tensors."""
    inner = getattr(optimizer, "optimizer", optimizer)
    as_tensor = _counts_steps_in_tensors(inner)
    for state in inner.state.values():
        if "step" in state:
            count = int(state["step"])
            state["step"] = torch.tensor(float(count), dtype=torch.float32) if as_tensor else count


def advance_step(state: dict) -> int:
    """Add one to ``state['step']`` in its own type (tensor or int); returns the new count."""
    if torch.is_tensor(state["step"]):
        state["step"].add_(1)
    else:
        state["step"] += 1
    return int(state["step"])


def flat_update(optimizer: torch.optim.Optimizer, group: dict, master: torch.Tensor, grad: torch.Tensor,
                out: torch.Tensor) -> FlatUpdate:
    """The update of ``master`` (a parameter of ``optimizer`` in ``group``) with its state, step advanced."""
    state = adam_state(optimizer, master, group)
    return FlatUpdate(master, grad, state["exp_avg"], state["exp_avg_sq"], out, group, advance_step(state))


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``tensors`` end to end as one 1-D tensor: a view when they already lie so in one storage (ZeRO-3's gradient
    partitions), else a copy (``torch.cat``)."""
    first = tensors[0]
    offset = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    adjacent = True
    for t in tensors:
        if not (t.is_contiguous() and t.dtype == first.dtype and t.untyped_storage().data_ptr() == storage
                and t.storage_offset() == offset):
            adjacent = False
            break
        offset += t.numel()
    if not adjacent:
        return torch.cat([t.reshape(-1) for t in tensors])
    total = offset - first.storage_offset()
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (total,))


@torch.no_grad()
def global_norm(grads: list[torch.Tensor], group=None, divide_by: float = 1.0) -> float:
    """The 2-norm of all ``grads`` together (accumulated in fp32, each read once), summed over the ranks of
    ``group`` when it has several, divided by ``divide_by``. A host float: this is the step's one synchronisation,
    which also decides whether the step is applied."""
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    return math.sqrt(float(squares)) / divide_by


def clip_coefficient(norm: float, max_norm: float) -> float:
    """``min(1, max_norm / (norm + 1e-6))``; 1 when clipping is off (``max_norm`` 0)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + NORM_EPS))
