"""Fixed-seed training losses of tiny in-process runs, pinned: the noise services and the nested ``variance``
sections changed no behaviour.

The expected values were computed with main's code at commit ac45eb8, *before* those changes, by the same runs
spelled in the old flat keys (``variance.t_sampler=ppots``, ``variance.mirror=true``, ``variance.ppots_x0=2``,
``variance.ppots_bins=8``, ``variance.ppots_masks=2``, ``variance.ppots_refit_every=2``; ``variance.mirror=auto``,
``variance.ppots_refit_every=2``, ``variance.probe_every=1``, ``variance.probe_fraction=...``, ``train.grad_accum=2``)
on the tiny model of ``conftest.tiny_overrides`` for 8 steps: each step's mean micro-batch loss and ``mirror: auto``'s
decisions (the online monitor's pooled sums were pinned too, until issue 26 replaced its estimators). Here they are
spelled in the new keys (P-POTS's old cadence was also the monitor's: ``variance.monitor.every=2``). The tolerance,
1e-4 relative, allows another CPU's float rounding; a change of the noise moves these values by far more.
"""

from __future__ import annotations

import pytest

from conftest import tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.diffusion.online_variance import VarianceMonitor
from mdm_scale.training.trainer import Trainer

AUTO = {"variance.masks": "auto", "variance.monitor.every": 2, "train.grad_accum": 2}
CASES = {
    "uniform": ({}, [4.37919283, 2.72621799, 2.9005537, 3.70296502, 3.37558317, 3.36249661, 2.77444029, 2.69149017],
                []),
    "ppots+mirror": (
        {"variance.t_sampler": {"name": "ppots", "x0": 2, "bins": 8, "masks": 2, "refit_every": 2},
         "variance.masks": "mirror", "variance.monitor.every": 2},
        [2.19297504, 4.52662277, 2.6533854, 0.0429824367, 3.41544557, 7.25141335, 2.3835609, 2.49515033], []),
    "auto": (
        {**AUTO, "variance.probe": {"every": 1, "fraction": 1.0}},
        [3.70240712, 3.57221305, 3.67986727, 2.94266391, 3.18336368, 3.47699094, 2.76304948, 3.58573925], []),
    "auto, switching at every refit": (
        {**AUTO, "variance.probe": {"every": 1, "fraction": 0.5}},
        [3.70240712, 3.57221305, 3.44065666, 3.2760303, 2.85067987, 3.11336792, 3.22837257, 3.30933523],
        [(2, True), (4, False), (6, True), (8, False)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_losses_equal_those_of_the_code_before_the_refactor(case, synth_dir, tmp_path, dist_env, monkeypatch):
    settings, losses, decisions = CASES[case]
    if case.endswith("every refit"):
        monkeypatch.setattr(VarianceMonitor, "_decide", lambda self, report: not self.mirror_on)
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path, **{
        "train.max_steps": 8, "logging.tensorboard": False, **settings}))
    trainer = Trainer(cfg, dist_env)
    got = []
    for _ in range(8):
        loss, counts = trainer.train_step()
        got.append(float(loss) / float(counts[0]))
    assert got == pytest.approx(losses, rel=1e-4)
    assert trainer.service(VarianceMonitor).decisions == decisions
