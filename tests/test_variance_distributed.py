"""``mdm-scale variance`` on 2 ZeRO-3 ranks equals the 1-rank result on the same samples and checkpoint (one launch):
rank 0 reads the checkpoint and the weights reach rank 1's partitions (``run_reader.load_weights``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_deepspeed, tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.training.trainer import Trainer
from mdm_scale.variance.runner import ToolSettings, run_variance

pytestmark = pytest.mark.distributed

FLAGS = {"methods": "standard,mirror,syrm,strats", "x0": 8, "t-draws": 2, "masks": 2, "grad-dim": 31,
         "strats-batch": 4}


def test_two_rank_report_equals_one_rank_report(synth_dir, tmp_path, dist_env):
    overrides = tiny_overrides(synth_dir, tmp_path / "run", **{"train.max_steps": 2})
    checkpoint = Trainer(load_config(["configs/quickstart.yaml"], overrides), dist_env).fit()["checkpoint"]
    args = ["variance", "measure", "--config", "configs/quickstart.yaml", "--checkpoint", checkpoint,
            "--out", str(tmp_path / "two" / "report.json")]
    for item in overrides:
        args += ["--set", item]
    for flag, value in FLAGS.items():
        args += [f"--{flag}", str(value)]
    proc = run_deepspeed(args, ranks=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    for name in ("report_abc_loss.png", "report_abc_grad.png", "report_loss_vs_t.png"):
        assert (tmp_path / "two" / name).stat().st_size > 1000
    assert any((tmp_path / "two" / "report_tensorboard").iterdir())

    settings = ToolSettings(methods=FLAGS["methods"].split(","), num_x0=8, num_t=2, num_masks=2, grad_dim=31,
                            strats_batch=4)
    one = run_variance(load_config(["configs/quickstart.yaml"], overrides), settings,
                       Path(tmp_path / "one" / "report.json"), checkpoint, env=dist_env)
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    assert two["settings"]["checkpoint"] == one["settings"]["checkpoint"] == checkpoint
    for name, method in one["methods"].items():
        for quantity in ("loss", "grad"):
            for term in ("A", "B", "C", "total", "direct"):
                assert two["methods"][name][quantity][term] == pytest.approx(method[quantity][term], rel=1e-4,
                                                                             abs=1e-9), (name, quantity, term)
        assert two["methods"][name]["t_curve"]["t"] == method["t_curve"]["t"]
