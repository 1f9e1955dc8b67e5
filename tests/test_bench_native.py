"""The ``llada`` subject of ``tools/bench/throughput.py`` at a tiny shape on the CPU, in this process: the random
LLaDA-format checkpoint it writes (bf16 shards) loads through the native loader and trains."""

from __future__ import annotations

import json

import torch

from mdm_scale.models.native import load_native, native_config
from mdm_scale.models.safetensors_dir import INDEX, SafetensorsDir
from tools.bench import throughput
from tools.bench.common import parameter_count
from tools.bench.llada_checkpoint import preset_config, write_random_llada

TINY = ["--preset", "tiny", "--vocab", "64", "--seq-len", "64", "--micro-batch", "2", "--warmup", "1", "--steps", "2",
        "--breakdown-steps", "0"]


def test_random_llada_checkpoint_is_sharded_bf16_of_the_preset_shape(tmp_path):
    config = preset_config("tiny", vocab=64)
    write_random_llada(tmp_path, config, max_shard_bytes=20_000)
    files = SafetensorsDir(tmp_path)
    assert (tmp_path / INDEX).is_file() and len({files.file_of(n) for n in files.names()}) > 2
    assert {files.get(n).dtype for n in files.names()} == {torch.bfloat16}
    model = load_native(tmp_path, native_config(tmp_path, "llada"))
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config)
    assert model.config.hidden_size == config.hidden_size and model.config.mask_token_id == 2


def test_llada_subject_trains_through_the_native_loader_and_reuses_its_checkpoint(tmp_path, dist_env, capsys):
    args = throughput.parse_args([*TINY, "--out", str(tmp_path / "bench"), "--worker", "llada",
                                  "--result", str(tmp_path / "result.json")])
    throughput._llada_checkpoint(args)
    checkpoint = tmp_path / "bench_llada_tiny"
    assert args.checkpoint_dir == str(checkpoint) and (checkpoint / "config.json").is_file()
    written = (checkpoint / "model.safetensors").stat().st_mtime_ns
    throughput._llada_checkpoint(args)
    assert "reusing the checkpoint" in capsys.readouterr().out
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == written
    throughput.run_worker(args)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["source_format"] == "llada" and result["tokens_per_s_per_gpu"] > 0
    assert result["parameters"] == parameter_count(preset_config("tiny", vocab=64))
