"""The P-POTS offline estimate before the first training step (docs/spec.md section 3.1), spread over all ranks.

Design (the keys of ``variance.t_sampler: {name: ppots}``): ``x0`` training sequences (the first ones of the
training order) x ``bins`` values of t (the bin centres) x ``masks`` mask draws, each a no-grad forward row (two
with MIRROR: the loss is then the pair mean, the quantity training weights). Job j is (x0 = j // (bins masks),
bin = (j // masks) mod bins, draw = j mod masks); its masks are keyed by (seed, j, ``Stream.PPOTS_MASK``), so they
do not depend on the world size. Rank r takes the sequences x0 = r, r + W, ... (disjoint x0).

Batching (``estimate_plan``): one forward holds jobs of one sequence only, so its rows share one length (no
padding) and its shape does not depend on the world size: a sequence's bins x masks jobs are cut into
``forwards_per_x0`` equal chunks of ``per_forward`` jobs, as large as ``forward_tokens`` allows (at
least ``train.micro_batch_size``; null: 65,536 tokens on GPU, one micro-batch on CPU). With the GPU default
(64 x 10 jobs, 192 tokens) that is 2 forwards of 320 rows per sequence instead of 10 of a 64-row micro-batch.
Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively), filling a short chunk,
or a rank with fewer sequences, with repeats that are not recorded.

Pooling: each rank writes its jobs' losses into a zero tensor with one slot per job, and one all-reduce sums
them. Every slot has exactly one non-zero contribution, so the sum is exact, and every rank then forms the
per-bin sums (count, sum, sum of squares, MIRROR pairs) from the same tensor in the same order: the
statistics, and hence the EPR fit (``PPOTSSampler.update``: rank 0 fits with ``restarts`` random
starts and broadcasts), are bit-identical on every rank and for every world size. The all-reduced tensor has
one float per job (6,400 for the defaults), sent once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from mdm_scale.config.variance import PPOTSConfig
from mdm_scale.core.noise import Stream
from mdm_scale.data.loader import DataStream, collate
from mdm_scale.diffusion.ppots import bin_centres, bin_statistics
from mdm_scale.diffusion.t_samplers import TSampler
from mdm_scale.distributed.env import all_reduce_sum
from mdm_scale.models.kernels import eager_kernels


class GridT(TSampler):
    """The offline estimate's fixed t: job j sits at the centre of bin (j // masks) mod bins, weight 1."""

    def __init__(self, bins: int, masks: int):
        super().__init__(seed=0)
        self.centres = torch.from_numpy(bin_centres(bins)).to(torch.float32)
        self.bins, self.masks = bins, masks

    def sample(self, sample_index: torch.Tensor, stream: int = Stream.T) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.centres[(sample_index // self.masks) % self.bins]
        return t, torch.ones_like(t)


@dataclass(frozen=True)
class EstimatePlan:
    """How the offline estimate's jobs are cut into forwards (the same shapes for every world size)."""

    jobs_per_x0: int  # bins x masks
    per_forward: int  # jobs in one forward, all of one sequence
    forwards_per_x0: int
    forwards: int  # per rank, the same on every rank


GPU_FORWARD_TOKENS = 65536
"""``forward_tokens: null`` on GPU (on CPU: one micro-batch of draws per forward)."""


def estimate_plan(cfg, world_size: int, on_gpu: bool) -> EstimatePlan:
    ppots: PPOTSConfig = cfg.variance.t_sampler
    jobs_per_x0 = ppots.bins * ppots.masks
    rows_per_job = cfg.variance.masks.rows_per_sequence
    tokens = ppots.forward_tokens or (GPU_FORWARD_TOKENS if on_gpu else 1)
    budget = max(cfg.train.micro_batch_size, tokens // (cfg.data.seq_len * rows_per_job))
    per_forward = math.ceil(jobs_per_x0 / math.ceil(jobs_per_x0 / budget))  # equal chunks, fewest forwards
    forwards_per_x0 = math.ceil(jobs_per_x0 / per_forward)
    return EstimatePlan(jobs_per_x0, per_forward, forwards_per_x0, math.ceil(ppots.x0 / world_size) * forwards_per_x0)


def forward_jobs(plan: EstimatePlan, f: int, rank: int, world_size: int, n_x0: int) -> tuple[list[int], int]:
    """Rank ``rank``'s jobs of its forward ``f`` (always ``per_forward`` of them) and how many lead the list
    to be recorded; the rest are filler (repeats: the same work, not recorded)."""
    x0 = rank + (f // plan.forwards_per_x0) * world_size
    source = x0 if x0 < n_x0 else 0  # a rank out of sequences repeats sequence 0's work
    start = source * plan.jobs_per_x0 + (f % plan.forwards_per_x0) * plan.per_forward
    jobs = list(range(start, min(start + plan.per_forward, (source + 1) * plan.jobs_per_x0)))
    recorded = len(jobs) if x0 < n_x0 else 0
    return jobs + [jobs[-1]] * (plan.per_forward - len(jobs)), recorded


@torch.no_grad()
def offline_statistics(trainer) -> torch.Tensor:
    """Per-bin statistics (bins, 5) of the initial model's losses, identical on every rank."""
    cfg, ppots, env = trainer.cfg, trainer.cfg.variance.t_sampler, trainer.env
    bins, masks, n_x0 = ppots.bins, ppots.masks, ppots.x0
    plan = estimate_plan(cfg, env.world_size, env.on_gpu)
    examples = DataStream(len(trainer.data.train), cfg.seed).example_ids(range(n_x0))
    grid_t = GridT(bins, masks)
    losses = torch.zeros(n_x0 * plan.jobs_per_x0, dtype=torch.float64, device=env.device)
    pair_sq = torch.zeros_like(losses)
    paired = torch.zeros_like(losses)
    grad_target = ppots.target == "grad"

    trainer.engine.eval()
    with eager_kernels(trainer.engine.module):  # shapes training never runs: compiling them costs more
        for f in range(plan.forwards):
            jobs, recorded = forward_jobs(plan, f, env.rank, env.world_size, n_x0)
            batch = collate(trainer.data.train, [examples[j // plan.jobs_per_x0] for j in jobs], jobs, trainer.pad_id,
                            cfg.data.pad_to_multiple_of, cfg.data.seq_len)
            noisy = trainer.objective.corrupt(batch, Stream.T, Stream.PPOTS_MASK, t_sampler=grid_t).to(env.device)
            out = trainer.engine(**noisy.model_inputs())
            row_loss = noisy.row_losses(out.token_ce)
            index = torch.tensor(jobs[:recorded], dtype=torch.long, device=env.device)
            values = noisy.sample_grad_norms(out.token_ce) if grad_target else noisy.sample_losses(row_loss)
            losses[index] = values[:recorded].double()
            pair = None if grad_target else noisy.pair_sq_diff(row_loss)
            if pair is not None:
                pair = pair[:recorded].double()
                pair_sq[index] = torch.nan_to_num(pair, nan=0.0)
                paired[index] = (~torch.isnan(pair)).double()
    trainer.engine.train()
    pooled = all_reduce_sum(torch.stack([losses, pair_sq, paired])).cpu()
    t = grid_t.sample(torch.arange(n_x0 * plan.jobs_per_x0))[0]
    with_pairs = cfg.variance.masks.rows_per_sequence == 2 and not grad_target
    pair = torch.where(pooled[2] > 0, pooled[1], float("nan")) if with_pairs else None
    return bin_statistics(t, pooled[0], pair, bins, ppots.loss_max)


def initial_fit(trainer) -> None:
    """Run the offline estimate and the first EPR fit if the run uses P-POTS with ``x0 > 0``."""
    ppots = trainer.cfg.variance.t_sampler
    if trainer.cfg.train.objective != "mdm" or not isinstance(ppots, PPOTSConfig) or ppots.x0 == 0:
        return
    start = time.perf_counter()
    statistics = offline_statistics(trainer)
    sampler = trainer.objective.t_sampler
    sampler.update(statistics, device=trainer.env.device)
    plan = estimate_plan(trainer.cfg, trainer.env.world_size, trainer.env.on_gpu)
    trainer.info(f"P-POTS offline estimate: {ppots.x0} sequences x {ppots.bins} t x {ppots.masks} mask draws "
                 f"({plan.forwards} forwards of {plan.per_forward} draws per rank), EPR fit with {ppots.restarts} "
                 f"starts, {time.perf_counter() - start:.1f} s")
