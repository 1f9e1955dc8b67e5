"""Where the time of ``engine.step()`` goes: the optimizer step split into its pieces, for either optimizer path.

``StepProfile(engine, fused)`` wraps, while it is entered, ``engine.step`` and the functions and methods that
``engine.step()`` calls for the engine's optimizer (DeepSpeed's stage-0 ``FP16_Optimizer``, its ZeRO-1/2 and ZeRO-3
optimizers, ``train.optimizer: fused``'s ``FlatAdamW`` and fused ZeRO steps; see ``targets``) with timers: CUDA events
on a GPU, read after one synchronisation at the end, so the steps run as they would without the profile (host
timers on CPU). ``summary()`` gives per step (mean over the profiled steps):

- ``step_ms``: ``engine.step()`` in all;
- ``pieces_ms``: each piece, e.g. ``grad norm``, ``clip (multiply)``, ``FusedAdam``, ``fused update``, ``all-gather``;
  pieces nest (``optimizer.step`` holds the optimizer's pieces);
- ``unattributed_ms``: the time inside a piece outside its children, named by position, e.g.
  ``optimizer.step: between flatten grads and clip (multiply)`` (DeepSpeed's inline fp32 cast there) or
  ``optimizer.step: after FusedAdam`` (its inline copy to bf16).

``top_ops(run_step)`` runs one training step with ``engine.step()`` under ``torch.profiler`` and returns the
operators of that optimizer step by device time (the kernels behind each piece: casts, copies, norms, multiply,
the Adam kernel), and can write its Chrome trace.
"""

from __future__ import annotations

import importlib
import time
from collections import defaultdict
from pathlib import Path

import torch

# (owner, attribute, label): owner "engine", "optimizer" (engine.optimizer), "inner" (the torch optimizer a DeepSpeed
# wrapper holds), "overflow_checker" (FP16_Optimizer's), or "module:<dotted module>" for a module-level function.
COMMON = [("optimizer", "step", "optimizer.step"), ("engine", "lr_scheduler.step", "lr schedule"),
          ("optimizer", "zero_grad", "zero_grad")]
TARGETS = {
    ("deepspeed", "FP16_Optimizer"): [
        ("overflow_checker", "has_overflow", "overflow check"),
        ("module:deepspeed.runtime.fp16.fused_optimizer", "_flatten_dense_tensors", "flatten grads"),
        ("module:deepspeed.runtime.fp16.fused_optimizer", "get_flattened_grad_norm", "grad norm"),
        ("optimizer", "unscale_and_clip_grads", "clip (multiply)"), ("inner", "step", "FusedAdam"),
        ("module:deepspeed.runtime.fp16.fused_optimizer", "_unflatten_dense_tensors", "unflatten")],
    ("deepspeed", "DeepSpeedZeroOptimizer"): [
        ("optimizer", "check_overflow", "overflow check"), ("optimizer", "scaled_global_norm", "grad norm"),
        ("optimizer", "flatten", "flatten grads"), ("optimizer", "unscale_and_clip_grads", "clip (multiply)"),
        ("optimizer", "_optimizer_step", "FusedAdam"),
        ("module:deepspeed.runtime.zero.stage_1_and_2", "all_gather_dp_groups", "all-gather"),
        ("optimizer", "_update_model_bit16_weights", "param views")],
    ("deepspeed", "DeepSpeedZeroOptimizer_Stage3"): [
        ("optimizer", "_partition_all_parameters", "partition params"), ("optimizer", "_get_norm_groups", "grad norm"),
        ("optimizer", "_prepare_sub_group", "flatten + fp32 cast"),
        ("optimizer", "unscale_and_clip_grads", "clip (multiply)"), ("optimizer", "_optimizer_step", "FusedAdam"),
        ("optimizer", "_reassign_or_swap_out_partitioned_parameters", "copy to bf16"),
        ("optimizer", "_release_sub_group", "release sub-group"), ("optimizer", "_post_step", "post step")],
    ("deepspeed", "AdamW"): [("engine", "clip_fp32_gradients", "clip (engine)")],
    ("fused", "FlatAdamW"): [
        ("module:mdm_scale.training.optimizer.flat_adamw", "global_norm", "grad norm (+ sync)"),
        ("module:mdm_scale.training.optimizer.flat_adamw", "apply_updates", "fused update")],
    ("fused", "DeepSpeedZeroOptimizer"): [
        ("module:mdm_scale.training.optimizer.zero", "flat", "concatenate grads"),
        ("module:mdm_scale.training.optimizer.zero", "global_norm", "grad norm (+ sync)"),
        ("module:mdm_scale.training.optimizer.zero", "apply_updates", "fused update"),
        ("module:deepspeed.runtime.utils", "all_gather_dp_groups", "all-gather"),
        ("optimizer", "_update_model_bit16_weights", "param views")],
    ("fused", "DeepSpeedZeroOptimizer_Stage3"): [
        ("optimizer", "_partition_all_parameters", "partition params"),
        ("module:mdm_scale.training.optimizer.zero", "flat", "gradient views"),
        ("module:mdm_scale.training.optimizer.zero", "global_norm", "grad norm (+ sync)"),
        ("module:mdm_scale.training.optimizer.zero", "apply_updates", "fused update"),
        ("optimizer", "_unflatten_partitioned_parameters", "param views"),
        ("optimizer", "_release_sub_group", "release sub-group"), ("optimizer", "_post_step", "post step")],
}


def targets(engine, fused: bool) -> list[tuple[object, str, str]]:
    """``(object, attribute, label)`` of everything timed for this engine's optimizer."""
    optimizer = engine.optimizer
    spec = COMMON + TARGETS.get(("fused" if fused else "deepspeed", type(optimizer).__name__), [])
    found = []
    for owner, attribute, label in spec:
        if owner.startswith("module:"):
            obj = importlib.import_module(owner.split(":", 1)[1])
        else:
            obj = {"engine": engine, "optimizer": optimizer, "inner": getattr(optimizer, "optimizer", None),
                   "overflow_checker": getattr(optimizer, "overflow_checker", None)}[owner]
        *path, name = attribute.split(".")
        for part in path:
            obj = getattr(obj, part, None)
        if obj is not None and callable(getattr(obj, name, None)):
            found.append((obj, name, label))
    return found


class StepProfile:
    def __init__(self, engine, fused: bool):
        self.engine = engine
        self.cuda = torch.cuda.is_available()
        self.targets = [(engine, "step", "engine.step"), *targets(engine, fused)]
        self.calls: list[dict] = []  # label, parent index (None for engine.step), start and end marks
        self._stack: list[int] = []
        self._saved: list[tuple[object, str, bool, object]] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)

    def _timed(self, fn, label: str):
        def timed(*args, **kwargs):
            call = {"label": label, "parent": self._stack[-1] if self._stack else None, "start": self._mark()}
            self.calls.append(call)
            self._stack.append(len(self.calls) - 1)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                call["end"] = self._mark()

        return timed

    def __enter__(self) -> StepProfile:
        for obj, name, label in self.targets:
            own = name in getattr(obj, "__dict__", {})
            self._saved.append((obj, name, own, getattr(obj, "__dict__", {}).get(name)))
            setattr(obj, name, self._timed(getattr(obj, name), label))
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, own, previous in reversed(self._saved):
            if own:
                setattr(obj, name, previous)
            else:
                delattr(obj, name)
        self._saved.clear()

    def summary(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        steps = [i for i, c in enumerate(self.calls) if c["parent"] is None]
        pieces, gaps = defaultdict(float), defaultdict(float)
        children = defaultdict(list)
        for i, call in enumerate(self.calls):
            if call["parent"] is not None:
                children[call["parent"]].append(i)
                pieces[call["label"]] += self._ms(call["start"], call["end"])
        for parent, kids in children.items():  # the time of each piece outside its children, by position
            owner = self.calls[parent]
            end, previous = owner["start"], None
            for kid in (self.calls[k] for k in kids):
                where = f"before {kid['label']}" if previous is None else f"between {previous} and {kid['label']}"
                gaps[f"{owner['label']}: {where}"] += self._ms(end, kid["start"])
                end, previous = kid["end"], kid["label"]
            gaps[f"{owner['label']}: after {previous}"] += self._ms(end, owner["end"])
        n = max(len(steps), 1)
        total = sum(self._ms(self.calls[i]["start"], self.calls[i]["end"]) for i in steps)
        return {"steps": len(steps), "step_ms": total / n,
                "pieces_ms": {k: v / n for k, v in pieces.items()},
                "unattributed_ms": {k: v / n for k, v in gaps.items() if v / n >= 0.05}}


def top_ops(engine, run_step, trace: Path | None = None, limit: int = 20) -> list[dict]:
    """Run ``run_step()`` (one training step) with its ``engine.step()`` under torch.profiler; the operators of
    that optimizer step with the most self time on the device (on the host without CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    step = engine.step
    holder = {}

    def profiled_step(*args, **kwargs):
        with profile(activities=activities) as prof:
            result = step(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        holder["prof"] = prof
        return result

    own = "step" in vars(engine)
    engine.step = profiled_step
    try:
        run_step()
    finally:
        if own:
            engine.step = step
        else:
            del engine.step
    prof = holder["prof"]
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:limit]
    return [{"op": e.key, "ms": getattr(e, key) / 1e3, "calls": e.count} for e in rows]


def describe(subject: str, profile: dict) -> list[str]:
    """Two markdown lines: the pieces of ``engine.step()`` (ms per step, largest first, unattributed time in
    brackets), then its top operators."""
    pieces = sorted([*profile["pieces_ms"].items(), *((f"({k})", v) for k, v in profile["unattributed_ms"].items())],
                    key=lambda kv: -kv[1])
    ops = ", ".join(f"{o['op']} {o['ms']:.1f}" for o in profile["top_ops"][:8])
    return [f"`{subject}`: engine.step() {profile['step_ms']:.1f} ms over {profile['steps']} steps; pieces: "
            + "; ".join(f"{k} {v:.1f}" for k, v in pieces), f"top operators of one engine.step() (ms): {ops}"]
