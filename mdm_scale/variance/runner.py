"""``mdm-scale variance``: measure the A/B/C decomposition of each method on a model and its training data.

For each method: U units of data x0 (drawn with replacement from the training set by a keyed generator, the
same x0 for every method), J rate draws per unit, K mask draws per (unit, rate) (docs/spec.md section 2.1). Each cell
(u, j, k) is one forward (and, for the gradient, one backward) of the unit's sequences through the run's
DeepSpeed engine, with the noise keys of a training step: sample index (u J + j) g + i for member i of a unit of
g sequences (so for StraTS, (unit, rate draw) plays the role of an optimiser step), and the k-th mask draw from
an independently keyed mask generator. The per-cell quantities are

    loss: the unit's estimate of the training loss, mean_i w(t_i) l_i (exactly the loss the engine differentiates)
    grad: a count-style sketch of that loss's full gradient (``sketch.py``), dimension --grad-dim

Units are split over ranks (unit u on rank u mod W, every rank runs the same number of cells, as ZeRO-3 needs);
per-unit summaries are all-gathered and decomposed identically on every rank (``decomposition.py``), so the
result does not depend on the world size except through floating-point summation inside the model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mdm_scale.config.methods import VARIANCE_DEFAULT
from mdm_scale.config.schema import Config, ConfigError
from mdm_scale.config.variance import UniformTConfig
from mdm_scale.core.noise import keyed_generator
from mdm_scale.data.loader import collate
from mdm_scale.distributed.env import DistEnv, barrier, init_distributed
from mdm_scale.training.checkpoint import CheckpointError, rank_state, resolve_checkpoint
from mdm_scale.variance.decomposition import UnitSummary, decompose, summarize_unit
from mdm_scale.variance.methods import Method, build_method
from mdm_scale.variance.sketch import GradientSketch

_DATA_WORD = 0x58304441


@dataclass
class ToolSettings:
    """The sampling plan (command-line flags of ``mdm-scale variance``)."""

    methods: list[str] = field(default_factory=lambda: list(VARIANCE_DEFAULT))
    num_x0: int = 64
    """--x0: sequences of data; a method with units of g sequences has num_x0 / g units."""
    num_t: int = 8
    """--t-draws: masking-rate draws J per unit."""
    num_masks: int = 4
    """--masks: mask draws K per (unit, rate)."""
    grad_dim: int = 1021
    """--grad-dim: sketch dimension d of the gradient; 0 measures the loss only."""
    strats_batch: int = 16
    """--strats-batch: the global batch G that StraTS stratifies (its unit)."""
    t_bins: int = 10
    """Bins of t for the loss-against-t curves."""

    def check(self, methods: list[Method], world: int) -> None:
        for flag, value, low in (("--x0", self.num_x0, 2), ("--t-draws", self.num_t, 2), ("--masks", self.num_masks, 2),
                                 ("--grad-dim", self.grad_dim, 0), ("--strats-batch", self.strats_batch, 1)):
            if value < low:
                raise ConfigError(f"{flag} = {value}: must be >= {low}")
        for m in methods:
            units = self.num_x0 // m.group
            if self.num_x0 % m.group or units < 2 or units % world:
                raise ConfigError(f"--x0 = {self.num_x0}: method {m.name!r} needs a multiple of {m.group * world} "
                                  f"(its unit of {m.group} sequences x {world} ranks) with at least 2 units")


@dataclass
class MethodResult:
    loss: list[tuple[int, UnitSummary]]
    grad: list[tuple[int, UnitSummary]]
    curve: list[tuple[float, float, float]]  # (t, mask-mean of the unweighted loss l, its mask variance)
    samples: list[tuple[float, float]]  # (t, l) of every cell and sequence: the draws that can fit P-POTS


class VarianceRun:
    """Holds the engine and data of one run; ``measure`` runs one method on this rank's units."""

    def __init__(self, trainer, settings: ToolSettings):
        self.trainer, self.settings = trainer, settings
        self.engine, self.env, self.data = trainer.engine, trainer.env, trainer.data.train
        cfg = trainer.cfg
        generator = keyed_generator(cfg.seed, _DATA_WORD)
        self.examples = torch.randint(len(self.data), (settings.num_x0,), generator=generator).tolist()
        self.sketch = GradientSketch(self.engine.module, settings.grad_dim, cfg.seed, self.env.device) \
            if settings.grad_dim else None

    def measure(self, method: Method) -> MethodResult:
        s, cfg = self.settings, self.trainer.cfg
        g = method.group
        units = s.num_x0 // g
        num_t = s.num_t if method.random_t else 1
        num_masks = s.num_masks if method.random_masks else 1
        objectives = [method.objective(k, self.trainer.mask_token_id) for k in range(num_masks)]
        result = MethodResult([], [], [], [])
        for u in range(self.env.rank, units, self.env.world_size):
            members = self.examples[u * g:(u + 1) * g]
            loss = np.zeros((num_t, num_masks, 1))
            grad = np.zeros((num_t, num_masks, s.grad_dim)) if self.sketch else None
            per_sample = np.zeros((num_t, num_masks, g))
            rates = np.zeros((num_t, g))
            for j in range(num_t):
                index = [(u * num_t + j) * g + i for i in range(g)]
                batch = collate(self.data, members, index, self.trainer.pad_id, cfg.data.pad_to_multiple_of,
                                cfg.data.seq_len)
                for k, objective in enumerate(objectives):
                    noisy = objective.corrupt(batch).to(self.env.device)
                    if self.sketch is not None:
                        self.sketch.active = True
                        out = self.engine(**noisy.model_inputs())
                        self.engine.backward(out.loss)
                        self.sketch.active = False
                        grad[j, k] = self.sketch.take().cpu().numpy()
                    else:
                        with torch.no_grad():
                            out = self.engine(**noisy.model_inputs())
                    losses = noisy.sample_losses(noisy.row_losses(out.token_ce.float())).double().cpu()
                    loss[j, k, 0] = float((losses * noisy.weight.double().cpu()).mean())
                    per_sample[j, k] = losses.numpy()
                rates[j] = noisy.t.cpu().numpy()
            result.loss.append((u, summarize_unit(loss)))
            if grad is not None:
                result.grad.append((u, summarize_unit(grad)))
            if method.random_t:
                variances = per_sample.var(axis=1, ddof=1) if num_masks > 1 else np.zeros_like(rates)
                result.curve += list(zip(rates.ravel(), per_sample.mean(axis=1).ravel(), variances.ravel()))
                result.samples += list(zip(np.repeat(rates[:, None], num_masks, 1).ravel(), per_sample.ravel()))
        return gather(result)


def gather(result: MethodResult) -> MethodResult:
    """Every rank's units, sorted by unit, on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, result)
    else:
        parts = [result]
    return MethodResult(sorted((x for p in parts for x in p.loss), key=lambda x: x[0]),
                        sorted((x for p in parts for x in p.grad), key=lambda x: x[0]),
                        sorted(x for p in parts for x in p.curve), sorted(x for p in parts for x in p.samples))


def t_curves(curve: list[tuple[float, float, float]], bins: int) -> dict:
    """Mean over samples, per t-bin, of the mask-mean and mask-variance of the unweighted loss (docs/spec.md 2.1: the
    P-POTS inputs g(t) and v(t))."""
    if not curve:
        return {}
    t, mean, var = (np.array(c) for c in zip(*curve))
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(t, edges) - 1, 0, bins - 1)
    out = {"t": [], "loss_mean": [], "loss_mask_var": [], "count": []}
    for b in range(bins):
        chosen = which == b
        if chosen.any():
            out["t"].append(float((edges[b] + edges[b + 1]) / 2))
            out["loss_mean"].append(float(mean[chosen].mean()))
            out["loss_mask_var"].append(float(var[chosen].mean()))
            out["count"].append(int(chosen.sum()))
    return out


def fit_ppots(sampler, ckpt: Path | None, saved: dict | None, draws: list[tuple[float, float]] | None,
              env: DistEnv) -> str:
    """Give the P-POTS sampler its p(t): ``saved``, the state a P-POTS training run had fitted by checkpoint
    ``ckpt``, or a fit (``PPOTSSampler.update``: E[l^2 | t-bin] -> EPR -> density) to the standard method's
    (t, l) draws on the same model and data. Every rank calls this (the fit is broadcast from rank 0)."""
    from mdm_scale.diffusion.ppots import bin_statistics

    if saved is not None:
        sampler.load_state_dict(saved)
        return f"the checkpoint {ckpt}"
    t, loss = (torch.tensor(column, dtype=torch.float64) for column in zip(*draws))
    sampler.update(bin_statistics(t, loss, None, sampler.settings.bins), device=env.device)
    return f"a fit to the {len(draws)} (t, loss) draws of the standard method"


def has_zero_shards(ckpt: Path) -> bool:
    """Whether ``ckpt`` holds ZeRO optimizer shards: ``zero_pp_rank_*`` files, or ``bf16_zero_pp_rank_*`` from
    DeepSpeed's bf16 optimizer (a bf16 run on GPU writes those; the same config on CPU expects the others, so
    such a checkpoint is read through ``zero_to_fp32`` rather than the engine)."""
    return any(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))


def load_weights(trainer, ckpt: Path) -> None:
    """Model weights only. A ZeRO-3 engine loads the sharded checkpoint directly (same world size as the run
    that wrote it); other stages load the consolidated fp32 weights (DeepSpeed's ``zero_to_fp32``), so a
    checkpoint from any number of ranks can be measured on one GPU with ``--set train.zero_stage=0``."""
    manifest = trainer.checkpoints.verify(ckpt)
    if manifest is not None:
        raise CheckpointError(f"--checkpoint {ckpt}: {manifest}")
    if trainer.cfg.train.zero_stage == 3 or not has_zero_shards(ckpt):
        trainer.checkpoints.load(trainer.engine, ckpt, trainer.shapes, global_batch=None)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        trainer.engine.module.load_state_dict(state, strict=True)
    trainer.info(f"variance: loaded the weights of {ckpt}")


def run_variance(cfg: Config, settings: ToolSettings, out: Path, checkpoint: str | None = None,
                 env: DistEnv | None = None) -> dict:
    """Build the engine (loading ``checkpoint``'s weights), measure every method, write the report."""
    from mdm_scale.training.trainer import Trainer
    from mdm_scale.variance.report import markdown_table, write_report

    env = env or init_distributed()
    names = sorted(settings.methods, key=lambda name: name != "standard")  # standard's draws can fit P-POTS
    methods = [build_method(name, cfg, settings.strats_batch) for name in names]
    settings.check(methods, env.world_size)
    ckpt = resolve_checkpoint(checkpoint) if checkpoint else None
    saved = rank_state(ckpt, 0).get("t_sampler", {}) if ckpt is not None else {}
    fitted = saved.get("refits", 0) > 0
    if any(m.uses_ppots for m in methods) and not fitted and "standard" not in names:
        raise ConfigError("--methods: ppots needs 'standard' too (its (t, loss) draws fit p(t)) or a --checkpoint "
                          "of a run trained with variance.t_sampler.name=ppots")
    work = out.parent / (out.stem + "_work")
    if env.is_main and (work / "checkpoints").exists():
        shutil.rmtree(work / "checkpoints")
    barrier()
    data = cfg.data
    if ckpt is not None and data.tokenizer == "char" and (ckpt.parent.parent / "tokenizer").is_dir():
        data = replace(data, tokenizer=str(ckpt.parent.parent / "tokenizer"))  # the run's own ids
    run_cfg = replace(cfg, data=data, train=replace(cfg.train, output_dir=str(work), resume="never"),
                      variance=replace(cfg.variance, t_sampler=UniformTConfig()),  # the methods bring their own
                      logging=replace(cfg.logging, tensorboard=False))
    trainer = Trainer(run_cfg, env)
    if ckpt is not None:
        load_weights(trainer, ckpt)
    trainer.engine.eval()
    run = VarianceRun(trainer, settings)
    report = {"settings": {**settings.__dict__, "world_size": env.world_size,
                           "checkpoint": str(ckpt) if ckpt else None, "config_seed": cfg.seed},
              "methods": {}}
    draws = None
    for method in methods:
        trainer.info(f"variance: measuring {method.name} ({settings.num_x0 // method.group} units of "
                     f"{method.group} sequence(s))")
        if method.uses_ppots:
            source = fit_ppots(method.t_sampler, ckpt, saved if fitted else None, draws, env)
            trainer.info(f"variance: P-POTS density from {source}")
        result = run.measure(method)
        if method.name == "standard":
            draws = result.samples
        num_t = settings.num_t if method.random_t else 1
        num_masks = settings.num_masks if method.random_masks else 1
        entry = {"group": method.group,
                 "loss": decompose([s for _, s in result.loss], num_t, num_masks, method.group)}
        if result.grad:
            entry["grad"] = decompose([s for _, s in result.grad], num_t, num_masks, method.group)
        entry["t_curve"] = t_curves(result.curve, settings.t_bins)
        if method.uses_ppots:
            entry["ppots_density"] = {"source": source, "t": np.linspace(0, 1, 21).tolist(), "p": method.t_sampler
                                      .density.pdf(torch.linspace(0, 1, 21)).tolist()}
        report["methods"][method.name] = entry
        trainer.info(f"variance: {method.name}: " + ", ".join(
            f"{k}={entry['loss'][k]:.4g}" for k in ("A", "B", "C", "total", "direct")))
    report["comparisons"] = comparisons(report["methods"])
    if env.is_main:
        write_report(report, out)
        print(markdown_table(report), flush=True)
    barrier()
    return report


def comparisons(methods: dict) -> dict:
    """The paper's two claims, as ratios against the standard estimator (when both were measured)."""
    out = {}
    std = methods.get("standard")
    if std is None:
        return out
    for quantity in ("loss", "grad"):
        if quantity not in std:
            continue
        ratios = {}
        for name, entry in methods.items():
            if name != "standard" and quantity in entry:
                ratios[name] = {term: _ratio(entry[quantity][term], std[quantity][term])
                                for term in ("A", "B", "C", "total")}
                ratios[name]["A+B"] = _ratio(entry[quantity]["A"] + entry[quantity]["B"],
                                             std[quantity]["A"] + std[quantity]["B"])
        out[quantity] = ratios
    return out


def _ratio(x: float, y: float) -> float | None:
    return float(x / y) if y != 0 else None


__all__ = ["ToolSettings", "run_variance"]
