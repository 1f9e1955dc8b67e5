"""ZeRO stages 1-3: DeepSpeed's optimizer keeps its partitions, state and checkpoints; only its update is fused.

What DeepSpeed 0.19.8 runs in ``engine.step()`` with bf16, per parameter of this rank's partition:

- stages 1-2 (``DeepSpeedZeroOptimizer.step``): an Inf/NaN check of every gradient (two reductions each and a host
  synchronisation), the norm with every gradient cast to fp64 first (``get_grad_norm_direct``), the gradient
  flattened, cast to an fp32 copy and multiplied by the clipping factor, FusedAdam over the fp32 partition, and the
  fp32 partition copied into the bf16 one;
- stage 3 (``DeepSpeedZeroOptimizer_Stage3.step``): the norm with the same fp64 casts, then per sub-group the
  flatten and fp32 cast, the clipping multiply (always, even by 1), FusedAdam and the copy to bf16.

``use_fused_step`` replaces that work with the three passes of ``adamw.py``: the norm of the low-precision
gradient partition (accumulated in fp32, one synchronisation, which also decides whether the step is applied), and
one fused update per group (stages 1-2) or sub-group (stage 3) that reads the low-precision gradient and writes the
fp32 partition, the moments (the inner optimizer's own state tensors, in its format) and the low-precision
partition. Everything else is DeepSpeed's: gradient reduction, the all-gather of the updated partitions, overflow
bookkeeping, checkpoints (so universal checkpoints and elastic resume are unchanged). At stages 1-2 the gradient
partition is concatenated once (DeepSpeed keeps it as a list of views); at stage 3 it already lies in one buffer
and is read in place.

Stages 1-2 get a new ``step`` (the parts to fuse are inline in DeepSpeed's); stage 3 keeps DeepSpeed's ``step`` and
gets five of the methods it calls, active only while that step runs. On one rank, where every parameter is
persistent and views its own partition (``config/deepspeed_json.py``), the stage-3 step also skips DeepSpeed's
release of every parameter before the update and its gather of the persistent ones after it: the update writes
what the parameters view (10 ms of host time per step for the 1.1B model, docs/benchmarks.md).

Offloaded optimizers and parameters, fp16 loss scaling, MoE and Muon are not covered (the schema refuses
``train.optimizer: fused`` with offload).
"""

from __future__ import annotations

import math
from functools import wraps

import torch
import torch.distributed as dist

from mdm_scale.training.optimizer.adamw import apply_updates, clip_coefficient, flat, flat_update, global_norm


def use_fused_step(optimizer) -> None:
    """Fuse the update of DeepSpeed's ZeRO optimizer ``optimizer`` (``engine.optimizer`` at stage 1, 2 or 3)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if getattr(optimizer, "loss_scale", 1.0) != 1.0:
        raise ValueError("the fused optimizer step supports bf16 and fp32 (no loss scaling)")
    if getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False):
        raise ValueError("the fused optimizer step runs on the device (no optimizer offload)")
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        _fuse_stage3(optimizer)
    elif isinstance(optimizer, DeepSpeedZeroOptimizer):
        optimizer.step = _stage12_step.__get__(optimizer)
    else:
        raise TypeError(f"no fused step for {type(optimizer).__name__}")


def _stage12_step(self, closure=None) -> None:
    """``DeepSpeedZeroOptimizer.step`` without offload, fused (see the module docstring)."""
    from deepspeed.runtime.utils import all_gather_dp_groups
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    self.micro_step_id = INITIAL_MICRO_STEP_ID
    grads = []
    for i in range(len(self.bit16_groups)):
        self.free_grad_in_param_list(self.params_not_in_partition[i])
        grads.append(flat(self.averaged_gradients[i]))  # partition_size[i] values, its zero padding included
        self.free_grad_in_param_list(self.params_in_partition[i])
        self.averaged_gradients[i] = None
        self.all_grad_tensors[i] = None
    norm = global_norm(grads, self.dp_process_group)
    self.overflow = not math.isfinite(norm)
    self._update_scale(self.overflow)
    if self.overflow:
        self._global_grad_norm = math.inf
        self.zero_grad(set_to_none=True)
        return
    self._global_grad_norm = norm
    updates = []
    for i, grad in enumerate(grads):
        partition = self.parallel_partitioned_bit16_groups[i][dist.get_rank(group=self.real_dp_process_group[i])]
        updates.append(flat_update(self.optimizer, self.optimizer.param_groups[i],
                                   self.single_partition_of_fp32_groups[i], grad, partition))
    apply_updates(updates, clip_coefficient(norm, self.clip_grad))
    self.optimizer._opt_called = True  # what the inner optimizer's own step tells torch's LR scheduler
    all_gather_dp_groups(groups_flat=self.bit16_groups_flat,
                         partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                         dp_process_group=self.real_dp_process_group,
                         start_alignment_factor=self.nccl_start_alignment_factor,
                         allgather_bucket_size=self.allgather_bucket_size)
    for i in range(len(self.bit16_groups)):
        self._update_model_bit16_weights(i)


def _fuse_stage3(opt) -> None:
    """Replace, for the duration of ``opt.step``, the norm, the gradient preparation, the clipping, the inner
    optimizer's step and the copy to bf16 of DeepSpeed's stage-3 step by the fused norm and update."""
    grads: dict[int, torch.Tensor] = {}
    clip: list[float] = []
    original = {name: getattr(opt, name) for name in ("step", "_get_norm_groups", "_prepare_sub_group",
                                                      "unscale_and_clip_grads", "_optimizer_step",
                                                      "_reassign_or_swap_out_partitioned_parameters",
                                                      "_partition_all_parameters", "persistent_parameters")}

    def norm_groups():
        grads.clear()
        grads.update({i: flat(opt.averaged_gradients[i]) for i in range(len(opt.fp16_groups))})
        norm = global_norm(list(grads.values()), opt.dp_process_group)
        clip[:] = [clip_coefficient(norm, opt.clip_grad)]
        return [torch.tensor(norm, dtype=torch.float32, device=opt.device)]

    def prepare_sub_group(sub_group, timer_names):
        opt.averaged_gradients[sub_group] = None  # the update reads the low-precision partition in ``grads``

    def unscale_and_clip_grads(sub_group, total_norm):
        pass  # folded into the update's gradient scale

    def optimizer_step(sub_group):
        group = opt.optimizer.param_groups[opt.sub_group_to_group_id[sub_group]]
        update = flat_update(opt.optimizer, group, opt.fp32_partitioned_groups_flat[sub_group], grads.pop(sub_group),
                             opt.fp16_partitioned_groups_flat[sub_group])
        apply_updates([update], clip[0])
        opt.optimizer._opt_called = True  # what the inner optimizer's own step tells torch's LR scheduler

    def reassign(sub_group):
        opt._unflatten_partitioned_parameters(sub_group)  # the update already wrote the bf16 partition

    fused = {"_get_norm_groups": norm_groups, "_prepare_sub_group": prepare_sub_group,
             "unscale_and_clip_grads": unscale_and_clip_grads, "_optimizer_step": optimizer_step,
             "_reassign_or_swap_out_partitioned_parameters": reassign}

    one_rank = dist.get_world_size(group=opt.dp_process_group) == 1

    @wraps(original["step"])
    def step(closure=None):
        patches = dict(fused)
        if one_rank and _updated_in_place(opt.module):
            # DeepSpeed releases every parameter before the update and gathers the persistent ones after it; here
            # each one views the partition that the update writes, so both would only cost host time.
            patches.update(_partition_all_parameters=lambda: None, persistent_parameters=[])
        for name, value in patches.items():
            setattr(opt, name, value)
        try:
            return original["step"](closure)
        finally:
            for name in patches:
                setattr(opt, name, original[name])
            grads.clear()

    opt.step = step


def _updated_in_place(module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` is gathered, persistent and a view of its own partition: the case of
    one rank with every parameter persistent (``config/deepspeed_json.py``), where DeepSpeed's gather is a view
    (``NoGatherHandle``) and the update's write to the partition is the parameter's new value."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return all(p.ds_persist and p.ds_status == ZeroParamStatus.AVAILABLE and p.data_ptr() == p.ds_tensor.data_ptr()
               and p.numel() == p.ds_tensor.numel() for p in module.parameters())
