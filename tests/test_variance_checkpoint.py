"""``mdm-scale variance --checkpoint``: a ZeRO-3 model and a whole (stage 0) model loaded with the same training
checkpoint measure the same model, and the tool writes its report and nothing else (no output directory, run files
or checkpoints of its own)."""

from __future__ import annotations

import pytest

from conftest import tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.training.checkpoint import CheckpointError
from mdm_scale.training.trainer import Trainer
from mdm_scale.variance.runner import ToolSettings, run_variance


def test_checkpoint_weights_load_at_either_stage_and_only_the_report_is_written(synth_dir, tmp_path, dist_env):
    train = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "run",
                                                                    **{"train.max_steps": 3}))
    Trainer(train, dist_env).fit()
    written_by_training = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    settings = ToolSettings(methods=["standard"], num_x0=4, num_t=2, num_masks=2, grad_dim=0)
    reports = {}
    for stage in (3, 0):
        cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "unused",
                                                                      **{"train.zero_stage": stage}))
        reports[stage] = run_variance(cfg, settings, tmp_path / f"zero{stage}" / "report.json",
                                      str(tmp_path / "run"), env=dist_env)
        names = {p.name for p in (tmp_path / f"zero{stage}").iterdir()}
        assert names == {"report.json", "report_abc_loss.png", "report_loss_vs_t.png", "report_tensorboard"}, names
    untrained = run_variance(cfg, settings, tmp_path / "init" / "report.json", env=dist_env)
    assert not (tmp_path / "unused").exists()  # the config's train.output_dir: never made by the tool
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == written_by_training
    loaded = [reports[s]["methods"]["standard"]["loss"]["mean"] for s in (3, 0)]
    assert loaded[0] == pytest.approx(loaded[1], rel=1e-5)
    assert untrained["methods"]["standard"]["loss"]["mean"] != pytest.approx(loaded[0], rel=1e-3)
    with pytest.raises(CheckpointError, match="no such directory"):
        run_variance(cfg, settings, tmp_path / "x" / "report.json", str(tmp_path / "missing"), env=dist_env)
