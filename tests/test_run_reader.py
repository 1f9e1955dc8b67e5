"""``training/run_reader.py``: a run directory, its checkpoints, one checkpoint and its export read the same; the
weights of a checkpoint follow the ZeRO stage its manifest records, whatever DeepSpeed named the shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mdm_scale.training.checkpoint import MANIFEST, CheckpointError
from mdm_scale.training.optimizer.universal import MODEL_STATES
from mdm_scale.training.run_reader import consolidated_state_dict, read_run


def test_every_source_kind_gives_the_same_configuration_step_tokenizer_and_weights(tiny_export):
    run_dir, export_dir = tiny_export
    step_dir = run_dir / "checkpoints" / "step_00000002"
    sources = {name: read_run(path) for name, path in (("run", run_dir), ("checkpoints", run_dir / "checkpoints"),
                                                        ("step", step_dir), ("export", export_dir))}
    assert [s.is_checkpoint for s in sources.values()] == [True, True, True, False]
    assert {s.path for name, s in sources.items() if name != "export"} == {step_dir}
    reference = sources["step"]
    assert reference.config.train.zero_stage == 3 and reference.step == 2
    weights = reference.state_dict()
    assert all(t.numel() > 0 and t.dtype == torch.float32 for t in weights.values())  # not ZeRO-3 placeholders
    for name, source in sources.items():
        assert (source.config, source.step, source.causal) == (reference.config, 2, False), name
        assert source.tokenizer().get_vocab() == reference.tokenizer().get_vocab(), name
        got = source.state_dict()
        assert got.keys() == weights.keys(), name
        for key, tensor in weights.items():
            assert torch.equal(got[key], tensor), (name, key)


def test_a_directory_that_is_no_model_is_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        read_run(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_run(tmp_path)


def test_bf16_zero_shards_read_like_the_others(tiny_export, tmp_path):
    """A bf16 run on GPU names its ZeRO optimizer shards ``bf16_zero_pp_rank_*`` (the model-state files keep
    their names); the fp32 master weights are consolidated from them as from ``zero_pp_rank_*`` shards."""
    run_dir, _ = tiny_export
    step_dir = run_dir / "checkpoints" / "step_00000002"
    renamed = tmp_path / "checkpoints" / step_dir.name
    shutil.copytree(step_dir, renamed)
    shards = sorted(renamed.glob("zero_pp_rank_*_optim_states.pt"))
    assert shards
    for shard in shards:
        shard.rename(shard.with_name("bf16_" + shard.name))
    expected, got = consolidated_state_dict(step_dir), consolidated_state_dict(renamed)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


class _NotATensor:  # a pickled class: torch.load(weights_only=True) must refuse to build it
    pass


def _stage_0_checkpoint(step: Path, module: dict, **extra) -> None:
    step.mkdir(parents=True)
    torch.save({"module": module, **extra}, step / MODEL_STATES)
    (step / MANIFEST).write_text(json.dumps({"step": 1, "zero_stage": 0, "files": {}, "shapes": {}}))


def test_stage_0_weights_come_from_the_module_file_without_unpickling_code(tmp_path):
    """A bf16 run at stage 0 also writes ``bf16_zero_pp_rank_*`` shards of DeepSpeed's bf16 optimizer, which
    ``zero_to_fp32`` cannot read: the manifest's stage, not the file names, decides that the module file holds the
    weights."""
    weights = {"w": torch.arange(4, dtype=torch.bfloat16)}
    step = tmp_path / "step_00000001"
    _stage_0_checkpoint(step, weights, ds_config={"a": [1, 2]})
    torch.save({"optimizer_state_dict": {"single_partition_of_fp32_groups": []}},
               step / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    loaded = consolidated_state_dict(step)
    assert loaded["w"].dtype == torch.float32 and torch.equal(loaded["w"], weights["w"].float())
    unsafe = tmp_path / "unsafe" / "step_00000001"
    _stage_0_checkpoint(unsafe, weights, extra=_NotATensor())
    with pytest.raises(CheckpointError, match="weights_only=True"):
        consolidated_state_dict(unsafe)
