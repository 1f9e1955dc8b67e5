"""A ZeRO stage-0 checkpoint in DeepSpeed's universal layout, so that it resumes at stage 1, 2 or 3 on any number
of ranks (DeepSpeed's ``ds_to_universal`` reads only ZeRO partitions).

A stage-0 checkpoint holds everything in ``mp_rank_00_model_states.pt``: the module (in the model's precision) and
the optimizer's state in one of two layouts,

- flat (``FlatAdamW``, and DeepSpeed's ``FP16_Optimizer`` that wraps FusedAdam with bf16): per parameter group one
  fp32 master tensor (``fp32_groups_flat``) and one state ``{step, exp_avg, exp_avg_sq}`` (the inner optimizer's
  state dict), the group's parameters end to end in model order;
- per parameter (DeepSpeed's fp32 stage 0, which runs torch's AdamW or FusedAdam unwrapped): one state per
  parameter; the master weights are the module's own (fp32).

The universal layout (``deepspeed/checkpoint/ds_to_universal.py``, read by the ZeRO optimizers'
``load_hp_checkpoint_state``): ``zero/<parameter name>/{fp32,exp_avg,exp_avg_sq}.pt`` (``{"param": full-shape
fp32 tensor}``) and ``step.pt``, ``zero/optimizer_state.pt`` (the groups' hyper-parameters, the clipping
threshold, DeepSpeed's version, and the step count where stage 3 reads it), and the model-states file under the
names stages 1-2 and 3 look for, without its optimizer state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mdm_scale.training.optimizer.flat_adamw import CLIP, INNER_STATE, MASTERS

MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of the module's weights (whole at stage 0; ``training/run_reader.py`` reads it too)."""
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def stage0_parameter_states(optimizer: dict, module: dict[str, torch.Tensor],
                            groups: list[list[str]]) -> tuple[dict[str, dict], list[dict]]:
    """Per parameter name ``{fp32, exp_avg, exp_avg_sq, step}`` (full shapes, fp32) and the groups'
    hyper-parameters, from a stage-0 optimizer state dict; ``groups`` names the parameters of each optimizer group
    in order (``groups.param_groups``)."""
    flat = MASTERS in optimizer
    inner = optimizer[INNER_STATE] if flat else optimizer
    saved_groups = inner["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups and this model "
                         f"{len(groups)}")
    states = {}
    for index, (names, saved) in enumerate(zip(groups, saved_groups)):
        shapes = [module[name].shape for name in names]
        if flat:
            state = inner["state"].get(saved["params"][0], {})
            master = optimizer[MASTERS][index]
            numel = sum(s.numel() for s in shapes)
            if master.numel() != numel:
                raise ValueError(f"the checkpoint's optimizer group {index} holds {master.numel()} values and this "
                                 f"model's {numel}")
            pieces = {"fp32": _split(master, shapes),
                      **{key: _split(state[key], shapes) if key in state else [None] * len(names) for key in MOMENTS}}
            for i, name in enumerate(names):
                states[name] = {key: pieces[key][i] for key in pieces} | {"step": state.get("step", 0)}
        else:
            if len(saved["params"]) != len(names):
                raise ValueError(f"the checkpoint's optimizer group {index} has {len(saved['params'])} parameters and "
                                 f"this model's {len(names)}")
            for name, shape, key in zip(names, shapes, saved["params"]):
                state = inner["state"].get(key, {})
                states[name] = {"fp32": module[name].float(), "step": state.get("step", 0),
                                **{m: state[m].reshape(shape).float() if m in state else None for m in MOMENTS}}
    for state in states.values():
        for key in MOMENTS:
            if state[key] is None:  # never stepped
                state[key] = torch.zeros_like(state["fp32"])
        state["step"] = int(state["step"])
    return states, [{k: v for k, v in g.items() if k != "params"} for g in saved_groups]


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(flat.narrow(0, offset, n).reshape(shape).float().clone())
        offset += n
    return out


def write_universal(step_dir: Path, target: Path, groups: list[list[str]]) -> None:
    """Write stage-0 checkpoint ``step_dir`` in the universal layout under ``target``."""
    import deepspeed

    checkpoint = torch.load(step_dir / MODEL_STATES, map_location="cpu", weights_only=True)
    optimizer = checkpoint["optimizer"]
    states, hyper = stage0_parameter_states(optimizer, checkpoint["module"], groups)
    zero = target / "zero"
    for name, state in states.items():
        folder = zero / name
        folder.mkdir(parents=True)
        for key in ("fp32", *MOMENTS):
            torch.save({"param": state[key]}, folder / f"{key}.pt")
        torch.save(state["step"], folder / "step.pt")
    for name, tensor in checkpoint["module"].items():  # as ds_to_universal: the model's other values (tied names)
        if not (zero / name).is_dir():
            (zero / name).mkdir(parents=True)
            torch.save({"param": tensor.float()}, zero / name / "fp32.pt")
    step = next(iter(states.values()))["step"] if states else 0
    clip = optimizer.get(CLIP, checkpoint.get("ds_config", {}).get("gradient_clipping", 0.0))
    torch.save({"param_groups": hyper, INNER_STATE: {"state": {0: {"step": step}}, "param_groups": hyper},
                "ds_version": deepspeed.__version__, "clip_grad": clip, "dynamic_loss_scale": False,
                "overflow": False}, zero / "optimizer_state.pt")
    model_states = {**checkpoint, "optimizer": None}
    for name in (MODEL_STATES, ZERO3_MODEL_STATES):
        torch.save(model_states, target / name)
