"""The P-POTS offline estimate before the first training step (SPEC section 3.1), spread over all ranks.

Design: ``ppots_x0`` training sequences (the first ones of the training order) x ``ppots_bins`` values of t
(the bin centres) x ``ppots_masks`` mask draws, each a no-grad forward row (two with MIRROR: the loss is then
the pair mean, the quantity training weights). Job j is (x0 = j // (bins masks), bin = (j // masks) mod bins,
draw = j mod masks); its masks are keyed by (seed, j, ``Stream.PPOTS_MASK``), so they do not depend on the
world size. Rank r takes the sequences x0 = r, r + W, ... (disjoint x0), in chunks of ``micro_batch_size``
jobs; every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively), padding with
repeats that are not recorded.

Pooling: each rank writes its jobs' losses into a zero tensor with one slot per job, and one all-reduce sums
them. Every slot has exactly one non-zero contribution, so the sum is exact, and every rank then forms the
per-bin sums (count, sum, sum of squares, MIRROR pairs) from the same tensor in the same order: the
statistics, and hence the EPR fit (``PPOTSSampler.update``: rank 0 fits with ``ppots_restarts`` random
starts and broadcasts), are bit-identical on every rank and for every world size. The all-reduced tensor has
one float per job (6,400 for the defaults), sent once.
"""

from __future__ import annotations

import math
import time

import torch

from mdm_scale.data.loader import DataStream, collate
from mdm_scale.diffusion.noise import Stream
from mdm_scale.diffusion.ppots import bin_centres, bin_statistics
from mdm_scale.diffusion.t_samplers import TSampler
from mdm_scale.distributed.env import all_reduce_sum


class GridT(TSampler):
    """The offline estimate's fixed t: job j sits at the centre of bin (j // masks) mod bins, weight 1."""

    def __init__(self, bins: int, masks: int):
        super().__init__(seed=0)
        self.centres = torch.from_numpy(bin_centres(bins)).to(torch.float32)
        self.bins, self.masks = bins, masks

    def sample(self, sample_index: torch.Tensor, stream: int = Stream.T) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.centres[(sample_index // self.masks) % self.bins]
        return t, torch.ones_like(t)


@torch.no_grad()
def offline_statistics(trainer) -> torch.Tensor:
    """Per-bin statistics (bins, 5) of the initial model's losses, identical on every rank."""
    cfg, variance, env = trainer.cfg, trainer.cfg.variance, trainer.env
    bins, masks, n_x0 = variance.ppots_bins, variance.ppots_masks, variance.ppots_x0
    jobs_per_x0 = bins * masks
    examples = DataStream(len(trainer.data.train), cfg.seed).example_ids(range(n_x0))
    grid_t = GridT(bins, masks)
    losses = torch.zeros(n_x0 * jobs_per_x0, dtype=torch.float64, device=env.device)
    pair_sq = torch.zeros_like(losses)
    paired = torch.zeros_like(losses)

    mine = [j for x0 in range(env.rank, n_x0, env.world_size) for j in range(x0 * jobs_per_x0, (x0 + 1) * jobs_per_x0)]
    chunk = cfg.train.micro_batch_size
    forwards = math.ceil(math.ceil(n_x0 / env.world_size) * jobs_per_x0 / chunk)
    trainer.engine.eval()
    for f in range(forwards):
        jobs = mine[f * chunk:(f + 1) * chunk]
        recorded = len(jobs)
        jobs = jobs + [mine[-1] if mine else 0] * (chunk - recorded)  # filler: same work, not recorded
        batch = collate(trainer.data.train, [examples[j // jobs_per_x0] for j in jobs], jobs, trainer.pad_id,
                        cfg.data.pad_to_multiple_of, cfg.data.seq_len)
        noisy = trainer.objective.corrupt(batch, Stream.T, Stream.PPOTS_MASK, t_sampler=grid_t).to(env.device)
        out = trainer.engine(**noisy.model_inputs())
        row_loss = noisy.row_losses(out.token_ce)
        index = torch.tensor(jobs[:recorded], dtype=torch.long, device=env.device)
        grad_target = variance.ppots_target == "grad"
        values = noisy.sample_grad_norms(out.token_ce) if grad_target else noisy.sample_losses(row_loss)
        losses[index] = values[:recorded].double()
        pair = None if grad_target else noisy.pair_sq_diff(row_loss)
        if pair is not None:
            pair = pair[:recorded].double()
            pair_sq[index] = torch.nan_to_num(pair, nan=0.0)
            paired[index] = (~torch.isnan(pair)).double()
    trainer.engine.train()
    pooled = all_reduce_sum(torch.stack([losses, pair_sq, paired])).cpu()
    t = grid_t.sample(torch.arange(n_x0 * jobs_per_x0))[0]
    paired = cfg.variance.mirror is True and variance.ppots_target == "loss"
    pair = torch.where(pooled[2] > 0, pooled[1], float("nan")) if paired else None
    return bin_statistics(t, pooled[0], pair, bins, variance.ppots_loss_max)


def initial_fit(trainer) -> None:
    """Run the offline estimate and the first EPR fit if the run uses P-POTS with ``ppots_x0 > 0``."""
    variance = trainer.cfg.variance
    if trainer.cfg.train.objective != "mdm" or variance.t_sampler != "ppots" or variance.ppots_x0 == 0:
        return
    start = time.perf_counter()
    statistics = offline_statistics(trainer)
    sampler = trainer.objective.t_sampler
    sampler.update(statistics, device=trainer.env.device)
    per_rank = math.ceil(variance.ppots_x0 / trainer.env.world_size) * variance.ppots_bins * variance.ppots_masks
    trainer.info(f"P-POTS offline estimate: {variance.ppots_x0} sequences x {variance.ppots_bins} t x "
                 f"{variance.ppots_masks} mask draws ({per_rank} draws per rank), EPR fit with "
                 f"{variance.ppots_restarts} starts, {time.perf_counter() - start:.1f} s")
