"""EMA (docs/spec.md 3.5): the per-t-bin baseline leaves every update exactly unchanged, and as a control variate of the
loss value it is unbiased and removes most of the masking-rate noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import read_scalars, tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.diffusion.ema_baseline import EMABaseline
from mdm_scale.training.trainer import Trainer


def test_control_variate_is_unbiased_and_lowers_the_loss_variance():
    """l = 3 - 2t + noise: the corrected batch loss has the same mean (paired difference within 4.5 SE of 0)
    and, once the baseline has tracked E[l | t], a much smaller variance."""
    gen = torch.Generator().manual_seed(0)
    ema = EMABaseline(bins=10, rate=0.05, device=torch.device("cpu"))
    raw, corrected = [], []
    for step in range(6000):
        t = torch.rand(4, generator=gen)
        loss = 3 - 2 * t + 0.1 * torch.randn(4, generator=gen)
        weight = torch.ones(4)
        if step >= 1000:
            raw.append(float(loss.mean()))
            corrected.append(float(loss.mean() - ema.correction(t, weight)))
        ema.update(t, loss)
    raw, corrected = np.array(raw), np.array(corrected)
    diff = raw - corrected
    assert abs(diff.mean()) < 4.5 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert corrected.var() < 0.2 * raw.var()


def test_update_moves_each_seen_bin_by_the_rate_and_restores_exactly():
    """Two bins of four: bin 0 holds two sequences (mean 3), bin 3 one (5), bins 1 and 2 none. With rate 0.25
    from a baseline of 1: b = (1.5, 1, 1, 2). A bf16 loss (a bf16 model's) updates the float32 baseline alike;
    the state round-trips, and an empty state (a checkpoint from before EMA) keeps the baseline."""
    ema = EMABaseline(bins=4, rate=0.25, device=torch.device("cpu"))
    ema.baseline = torch.ones(4)
    ema.update(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([2.0, 4.0, 5.0], dtype=torch.bfloat16))
    assert ema.baseline.dtype == torch.float32
    assert ema.baseline.tolist() == [1.5, 1.0, 1.0, 2.0]
    assert ema.correction(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 3.0])).item() == (1.5 + 6.0) / 2 - 5.5 / 4
    restored = EMABaseline(bins=4, rate=0.25, device=torch.device("cpu"))
    restored.load_state_dict(ema.state_dict())
    assert restored.baseline.dtype == torch.float32 and restored.baseline.tolist() == [1.5, 1.0, 1.0, 2.0]
    restored.load_state_dict({})
    assert restored.baseline.tolist() == [1.5, 1.0, 1.0, 2.0]


def test_training_with_the_ema_baseline_takes_exactly_the_same_steps(synth_dir, tmp_path, dist_env):
    runs = {}
    for bins in (0, 10):
        cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(
            synth_dir, tmp_path / f"ema{bins}", **{"variance.ema": {"bins": bins, "rate": 0.5},
                                                   "train.max_steps": 4, "train.eval_every": 0}))
        runs[bins] = Trainer(cfg, dist_env).fit()
    assert runs[10]["eval_loss"] == runs[0]["eval_loss"]  # same weights, bit for bit
    plain = read_scalars(runs[0]["tensorboard_dir"], "train/loss")
    adjusted = read_scalars(runs[10]["tensorboard_dir"], "train/loss")
    assert adjusted[1] == pytest.approx(plain[1], rel=1e-6)  # the baseline starts at 0
    assert any(abs(adjusted[s] - plain[s]) > 1e-4 for s in (2, 3, 4))  # ...and then corrects the logged loss
