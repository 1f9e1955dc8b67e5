"""``mdm-scale variance --checkpoint``: the sharded ZeRO-3 load and the consolidated (zero_to_fp32) load of the
same training checkpoint measure the same model."""

from __future__ import annotations

import pytest

from conftest import tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.training.checkpoint import CheckpointError
from mdm_scale.training.trainer import Trainer
from mdm_scale.variance.runner import ToolSettings, run_variance


def test_checkpoint_weights_load_through_either_path(synth_dir, tmp_path, dist_env):
    train = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "run",
                                                                    **{"train.max_steps": 3}))
    Trainer(train, dist_env).fit()
    settings = ToolSettings(methods=["standard"], num_x0=4, num_t=2, num_masks=2, grad_dim=0)
    reports = {}
    for stage in (3, 0):
        cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "unused",
                                                                      **{"train.zero_stage": stage}))
        reports[stage] = run_variance(cfg, settings, tmp_path / f"zero{stage}" / "report.json",
                                      str(tmp_path / "run"), env=dist_env)
    untrained = run_variance(cfg, settings, tmp_path / "init" / "report.json", env=dist_env)
    loaded = [reports[s]["methods"]["standard"]["loss"]["mean"] for s in (3, 0)]
    assert loaded[0] == pytest.approx(loaded[1], rel=1e-5)
    assert untrained["methods"]["standard"]["loss"]["mean"] != pytest.approx(loaded[0], rel=1e-3)
    with pytest.raises(CheckpointError, match="no such directory"):
        run_variance(cfg, settings, tmp_path / "x" / "report.json", str(tmp_path / "missing"), env=dist_env)


def test_zero_shards_are_found_under_both_deepspeed_names(tmp_path):
    """A bf16 run on GPU writes ``bf16_zero_pp_rank_*`` shards; they are read through zero_to_fp32 on any device."""
    from mdm_scale.variance.runner import has_zero_shards

    (tmp_path / "mp_rank_00_model_states.pt").touch()
    assert not has_zero_shards(tmp_path)
    (tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    assert has_zero_shards(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    assert has_zero_shards(plain)
