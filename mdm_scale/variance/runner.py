"""``mdm-scale variance measure``: measure the A/B/C decomposition of each method on a model and its training data.

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

The tool builds only what it measures (``build_subject``): the training data, the model under the run's DeepSpeed
configuration (ZeRO-3 partitions it over the ranks) and its engine, with the weights of ``--checkpoint`` read by
``training/run_reader.py``. It writes nothing but the report: no output directory, no run files, no checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdm_scale.config.deepspeed_json import build_deepspeed_config
from mdm_scale.config.methods import VARIANCE_DEFAULT
from mdm_scale.config.schema import Config, ConfigError
from mdm_scale.core.noise import keyed_generator
from mdm_scale.data.build import build_data
from mdm_scale.data.cache import Ranks
from mdm_scale.data.examples import Examples
from mdm_scale.data.loader import collate
from mdm_scale.data.tokenizer import special_ids
from mdm_scale.distributed.env import DistEnv, all_gather_objects, barrier, init_distributed
from mdm_scale.models.loading import build_model, load_hf_config, resolve_mask_token_id
from mdm_scale.training.memory_plan import counted_parameters
from mdm_scale.training.run_reader import RunSource, load_weights, read_run
from mdm_scale.training.zero_stage import resolve_zero_stage
from mdm_scale.variance.decomposition import UnitSummary, decompose, summarize_unit
from mdm_scale.variance.methods import Method, build_method
from mdm_scale.variance.sketch import GradientSketch

_DATA_WORD = 0x58304441


@dataclass
class ToolSettings:
    """The sampling plan (command-line flags of ``mdm-scale variance measure``)."""

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


@dataclass
class Subject:
    """What the tool measures on: the model's DeepSpeed engine and the training set, with the ids the objective
    and the collation need."""

    cfg: Config
    env: DistEnv
    engine: Any
    data: Examples
    pad_id: int
    mask_token_id: int | None


def build_subject(cfg: Config, env: DistEnv, source: RunSource | None) -> Subject:
    """The data, the model (partitioned under ZeRO-3 as in training) and its engine; nothing else is built.

    ``source`` gives the weights: a training checkpoint's are read on rank 0 and loaded into the model before
    the engine is made (``run_reader.load_weights``), with the run's own tokenizer; a Hugging Face directory (an
    ``mdm-scale export``) becomes ``model.path`` and ``data.tokenizer``, so ZeRO-3 loads it partition by
    partition. Without ``source`` the model is the configuration's initial one (or ``model.path``), with the
    tokenizer a run of this configuration saved, if any, else one built from the data."""
    import deepspeed

    if source is not None and source.is_checkpoint:
        cfg = replace(cfg, data=replace(cfg.data, tokenizer=str(source.tokenizer_dir)))
    elif source is not None:
        cfg = replace(cfg, model=replace(cfg.model, path=str(source.path)),
                      data=replace(cfg.data, tokenizer=str(source.path)))
    data = build_data(cfg.data, cfg.seed, Path(cfg.train.output_dir) / "tokenizer", Ranks.of(env))
    pad_id, _ = special_ids(data.tokenizer)
    hf_config = load_hf_config(cfg)
    mask_token_id = resolve_mask_token_id(cfg, data.tokenizer, hf_config)
    parameters = counted_parameters(cfg, len(data.tokenizer), hf_config) if cfg.train.zero_stage == "auto" else None
    cfg = resolve_zero_stage(cfg, parameters, env, lambda text: _info(env, text))
    ds_config = build_deepspeed_config(cfg, env.world_size, env.on_gpu)
    model = build_model(cfg, data.tokenizer, mask_token_id, hf_config, ds_config, cfg.seed)
    if source is not None and source.is_checkpoint:
        load_weights(model, source.state_dict() if env.is_main else None, source.path, env)
        _info(env, f"variance: loaded the weights of {source.path}")
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    engine.eval()
    return Subject(cfg, env, engine, data.train, pad_id, mask_token_id)


def _info(env: DistEnv, text: str) -> None:
    if env.is_main:
        print(text, flush=True)


class VarianceRun:
    """Holds the subject (engine and data) of one measurement; ``measure`` runs one method on this rank's
    units."""

    def __init__(self, subject: Subject, settings: ToolSettings):
        self.subject, self.settings = subject, settings
        self.engine, self.env, self.data = subject.engine, subject.env, subject.data
        generator = keyed_generator(subject.cfg.seed, _DATA_WORD)
        self.examples = torch.randint(len(self.data), (settings.num_x0,), generator=generator).tolist()
        self.sketch = GradientSketch(self.engine.module, settings.grad_dim, subject.cfg.seed, self.env.device) \
            if settings.grad_dim else None

    def measure(self, method: Method) -> MethodResult:
        s, cfg = self.settings, self.subject.cfg
        g = method.group
        units = s.num_x0 // g
        num_t = s.num_t if method.random_t else 1
        num_masks = s.num_masks if method.random_masks else 1
        objectives = [method.objective(k, self.subject.mask_token_id) for k in range(num_masks)]
        result = MethodResult([], [], [], [])
        for u in range(self.env.rank, units, self.env.world_size):
            members = self.examples[u * g:(u + 1) * g]
            loss = np.zeros((num_t, num_masks, 1))
            grad = np.zeros((num_t, num_masks, s.grad_dim)) if self.sketch else None
            per_sample = np.zeros((num_t, num_masks, g))
            rates = np.zeros((num_t, g))
            for j in range(num_t):
                index = [(u * num_t + j) * g + i for i in range(g)]
                batch = collate(self.data, members, index, self.subject.pad_id, cfg.data.pad_to_multiple_of,
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
    parts = all_gather_objects(result)
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


def fit_ppots(sampler, source: RunSource | None, saved: dict | None, draws: list[tuple[float, float]] | None,
              env: DistEnv) -> str:
    """Give the P-POTS sampler its p(t): ``saved``, the state a P-POTS training run had fitted by checkpoint
    ``source``, or a fit (``PPOTSSampler.update``: E[l^2 | t-bin] -> EPR -> density) to the standard method's
    (t, l) draws on the same model and data. Every rank calls this (the fit is broadcast from rank 0)."""
    from mdm_scale.diffusion.ppots import bin_statistics

    if saved is not None:
        sampler.load_state_dict(saved)
        return f"the checkpoint {source.path}"
    t, loss = (torch.tensor(column, dtype=torch.float64) for column in zip(*draws))
    sampler.update(bin_statistics(t, loss, None, sampler.settings.bins), device=env.device)
    return f"a fit to the {len(draws)} (t, loss) draws of the standard method"


def run_variance(cfg: Config, settings: ToolSettings, out: Path, checkpoint: str | None = None,
                 env: DistEnv | None = None) -> dict:
    """Build the subject (with ``checkpoint``'s weights), measure every method, write the report."""
    from mdm_scale.variance.report import markdown_table, write_report

    env = env or init_distributed()
    names = sorted(settings.methods, key=lambda name: name != "standard")  # standard's draws can fit P-POTS
    methods = [build_method(name, cfg, settings.strats_batch) for name in names]
    settings.check(methods, env.world_size)
    source = read_run(checkpoint) if checkpoint else None
    saved = source.rank_state(0).get("t_sampler", {}) if source is not None else {}
    fitted = saved.get("refits", 0) > 0
    if any(m.uses_ppots for m in methods) and not fitted and "standard" not in names:
        raise ConfigError("--methods: ppots needs 'standard' too (its (t, loss) draws fit p(t)) or a --checkpoint "
                          "of a run trained with variance.t_sampler.name=ppots")
    subject = build_subject(cfg, env, source)
    run = VarianceRun(subject, settings)
    report = {"settings": {**settings.__dict__, "world_size": env.world_size,
                           "checkpoint": str(source.path) if source else None, "config_seed": cfg.seed},
              "methods": {}}
    draws = None
    for method in methods:
        _info(env, f"variance: measuring {method.name} ({settings.num_x0 // method.group} units of "
                     f"{method.group} sequence(s))")
        if method.uses_ppots:
            density_source = fit_ppots(method.t_sampler, source, saved if fitted else None, draws, env)
            _info(env, f"variance: P-POTS density from {density_source}")
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
            grid = torch.linspace(0, 1, 21)
            entry["ppots_density"] = {"source": density_source, "t": grid.tolist(),
                                      "p": method.t_sampler.density.pdf(grid).tolist()}
        report["methods"][method.name] = entry
        _info(env, f"variance: {method.name}: " + ", ".join(
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
