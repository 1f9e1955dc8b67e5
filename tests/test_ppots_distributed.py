"""P-POTS + MIRROR on 2 ZeRO-3 CPU ranks (one deepspeed launch, ``ppots_worker.py``), checked against one
in-process rank: identical p(t) on every rank equal to a fit of the pooled statistics, world-size-independent
offline estimate and noise, and a resume that restores the sampler. And on 2 gloo processes: a fit that fails on
rank 0 keeps the current p(t) on every rank."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ppots_worker import SETTINGS

from conftest import REPO, free_port, read_scalars, run_deepspeed, tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.diffusion.ppots import PPOTSSampler
from mdm_scale.training.trainer import Trainer

pytestmark = pytest.mark.distributed
SHARED = ("density", "z", "statistics", "refits")  # the same on every rank; "pending" is each rank's own


def assert_same(a: dict, b: dict, keys=SHARED) -> None:
    for key in keys:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_two_rank_ppots_service_matches_pooled_fit_world_size_and_resume(synth_dir, tmp_path, dist_env):
    proc = run_deepspeed([str(tmp_path), str(synth_dir)], ranks=2, script="tests/ppots_worker.py")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "P-POTS offline estimate: 3 sequences x 16 t x 2 mask draws" in proc.stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Every rank samples from the bit-identical p(t) after the offline fit and after every refit.
    for stage in ("initial", "final", "restored", "resumed_final"):
        assert_same(ranks[0][stage], ranks[1][stage])
    assert ranks[0]["initial"]["refits"] == 1 and ranks[0]["final"]["refits"] == 3
    assert ranks[0]["resumed_final"]["refits"] == 4
    assert not torch.equal(ranks[0]["initial"]["density"], ranks[0]["final"]["density"])  # refits moved p

    # ... equal to a fit of the pooled statistics in this one process (replaying each refit's sum over ranks).
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "one", **SETTINGS,
                                                                  **{"train.grad_accum": 2}))
    replay = PPOTSSampler(cfg.seed, cfg.variance.t_sampler)
    replay.load_state_dict(ranks[0]["initial"])
    assert len(ranks[0]["pending"]) == 2
    for local0, local1 in zip(ranks[0]["pending"], ranks[1]["pending"]):
        replay.update(local0 + local1)
    assert torch.equal(replay.density.values, ranks[0]["final"]["density"])
    assert np.array_equal(replay.z, ranks[0]["final"]["z"].numpy())

    # One rank with 2 accumulated micro-batches: the same offline estimate and fit, and the same noise for
    # every sample of the first step (keys are sample indices, not ranks).
    one = Trainer(cfg, dist_env)
    assert_same(one.objective.t_sampler.state_dict(), ranks[0]["initial"])
    drawn = {int(i): (d, row) for r in ranks for d in r["draws"][:1] for row, i in enumerate(d["sample_index"])}
    for micro in range(2):
        noisy = one.objective.corrupt(one.loader.micro_batch_at(0, micro))
        for row, index in enumerate(one.loader.micro_batch_at(0, micro).sample_index.tolist()):
            theirs, their_row = drawn.pop(index)
            assert noisy.t[row] == theirs["t"][their_row] and noisy.weight[row] == theirs["weight"][their_row]
            assert torch.equal(noisy.input_ids[noisy.row_sample == row],
                               theirs["input_ids"][theirs["row_sample"] == their_row])
    assert not drawn  # every sample of the step was compared

    # TensorBoard: the p(t) figure, the drawn t, importance-weight statistics and the refit count.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = tmp_path / "run" / "tensorboard"
    acc = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {f"t_sampler/{k}" for k in ("refits", "weight_max", "weight_mean", "weight_ess")} <= set(tags["scalars"])
    assert "t_sampler/drawn_t" in tags["histograms"] and "t_sampler/density" in tags["images"]
    refits = read_scalars(tb_dir, "t_sampler/refits")
    assert (refits[2], refits[4], refits[6]) == (2.0, 3.0, 4.0)

    # The resumed run starts from exactly the saved sampler, including each rank's pending statistics.
    for r in ranks:
        assert_same(r["restored"], r["final"], keys=(*SHARED, "pending"))
        assert r["final"]["pending"].abs().sum() > 0


FAILED_FIT = """
import datetime, os, sys, numpy as np, torch, torch.distributed as dist
from mdm_scale.config.variance import PPOTSConfig
from mdm_scale.diffusion import ppots
from mdm_scale.diffusion.epr import EPRFit
from mdm_scale.distributed.env import shutdown_distributed
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
fit_epr = ppots.fit_epr
if rank == 0:  # the fit ends at k = 3000: log w spans 3000, so the density underflows to 0 near t = 0
    ppots.fit_epr = lambda *args, **kwargs: EPRFit(np.array([0.5, -1.0, 0.2, 1.0, 0.3, 3000.0, 0.8]), 0.0)
sampler = ppots.PPOTSSampler(3, PPOTSConfig(bins=4, refit_every=1))
record = {"uniform": sampler.density.values.clone()}
for step in (1, 2):
    sampler.add(torch.tensor([0.1, 0.4, 0.6, 0.9]), torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1), None)
    sampler.on_optimizer_step(step)
    record[step] = (sampler.density.values.clone(), sampler.refits)
    ppots.fit_epr = fit_epr
torch.save(record, os.path.join(sys.argv[1], f"rank{rank}.pt"))
shutdown_distributed()  # exiting with the group alive can abort in gloo's threads after the work is done
"""


def test_a_fit_that_fails_on_rank_zero_keeps_the_density_on_every_rank(tmp_path):
    """Rank 0's refit lands on an EPR curve whose log-range underflows (``PiecewiseLinearDensity`` refuses a zero
    node): rank 0 says why, every rank keeps the current p(t) and goes on; the next refit succeeds on both.
    (Planted: without the failure flag, rank 0 raises and rank 1 waits in the broadcast until gloo's 30 s
    timeout: both exit with errors.)"""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", FAILED_FIT, str(tmp_path)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "RANK": str(rank)})
             for rank in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "P-POTS refit 1: the fit failed (ValueError: a piecewise-linear density needs >= 2 finite, positive " \
           "node values); every rank keeps the current p(t)" in outputs[0][0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for record in ranks:
        assert torch.equal(record[1][0], record["uniform"]) and record[1][1] == 0
        assert record[2][1] == 1 and not torch.equal(record[2][0], record["uniform"])
    assert torch.equal(ranks[0][2][0], ranks[1][2][0])
