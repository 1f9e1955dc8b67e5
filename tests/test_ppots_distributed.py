"""P-POTS + MIRROR on 2 ZeRO-3 CPU ranks (one deepspeed launch, ``ppots_worker.py``), checked against one
in-process rank: identical p(t) on every rank equal to a fit of the pooled statistics, world-size-independent
offline estimate and noise, and a resume that restores the sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ppots_worker import SETTINGS

from conftest import read_scalars, run_deepspeed, tiny_overrides
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
