"""Pretraining corpora larger than memory: ``mdm-scale data tokenize`` writes a token store, training reads it
memory-mapped in blocks of ``data.seq_len`` (data/store.py, data/examples.py), and a run whose private memory
is limited by the kernel to less than the store's size trains from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, free_port, run_deepspeed, tiny_overrides
from mdm_scale.cli import main
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import DataConfig, SourceConfig
from mdm_scale.data.build import build_data
from mdm_scale.data.loader import TrainLoader
from mdm_scale.data.records import DataError
from mdm_scale.data.store import publish
from mdm_scale.training.trainer import Trainer


def tokenize(source: Path, out: Path, *sets: str) -> dict:
    argv = ["data", "tokenize", "--input", str(source), "--out", str(out)]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    return json.loads((out / "index.json").read_text())


def test_a_tokenized_store_trains_block_by_block_and_resumes(synth_dir, tmp_path, dist_env, capsys):
    store = tmp_path / "store"
    index = tokenize(synth_dir / "pretrain.jsonl", store)
    assert index["task"] == "pretrain" and index["splits"]["main"]["examples"] == 200
    assert main(["data", "tokenize", "--input", str(synth_dir / "pretrain.jsonl"), "--out", str(store)]) == 2
    assert "exists" in capsys.readouterr().err

    data = build_data(DataConfig(train_files=[SourceConfig(str(store))], seq_len=64), 0, tmp_path / "run")
    tok = data.tokenizer
    stream = [t for line in (synth_dir / "pretrain.jsonl").read_text().splitlines()
              for t in tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(data.train) == len(stream) // 64
    for i in (0, 1, len(data.train) - 1):  # block i is tokens [64 i, 64 (i + 1)) of the texts joined with EOS
        ids, scored = data.train.example(i)
        assert ids.tolist() == stream[64 * i:64 * (i + 1)] and scored.all()
    other = build_data(DataConfig(train_files=[SourceConfig(str(store))], seq_len=100), 0, tmp_path / "run")
    assert len(other.train) == len(stream) // 100  # one store serves any block length

    sft = tmp_path / "sft"  # an SFT store serves the seq_len it was cut for, and says so otherwise
    tokenize(synth_dir / "eval.jsonl", sft, "data.seq_len=192")
    from_store = build_data(DataConfig(train_files=[SourceConfig(str(sft))], seq_len=192), 0, tmp_path / "sft_run")
    from_records = build_data(DataConfig(train_file=str(synth_dir / "eval.jsonl"), seq_len=192), 0, tmp_path / "r")
    assert [from_store.train.example(i)[0].tolist() for i in range(64)] == \
        [from_records.train.example(i)[0].tolist() for i in range(64)]
    with pytest.raises(DataError, match=r"data.train_files\[0\] \(.*sft\): the token store was made with "
                                        r"data.seq_len = 192, this run has 128"):
        build_data(DataConfig(train_files=[SourceConfig(str(sft))], seq_len=128), 0, tmp_path / "sft_run")

    out = tmp_path / "out"
    sets = tiny_overrides(synth_dir, out, **{"data.train_files": [{"path": str(store)}], "data.eval_file": None,
                                             "data.seq_len": 64, "train.max_steps": 3, "train.save_every": 3})
    first = Trainer(load_config(["configs/quickstart.yaml"], sets), dist_env).fit()
    resumed = Trainer(load_config(["configs/quickstart.yaml"], [*sets, "train.max_steps=5"]), dist_env)
    assert first["step"] == 3 and resumed.step == 3
    assert resumed.fit()["step"] == 5


@pytest.mark.distributed
def test_two_ranks_tokenize_one_store_equal_to_one_process(synth_dir, tmp_path):
    """``mdm-scale data tokenize`` under the deepspeed launcher: 2 ranks split the work (gloo gathers) and write
    one store whose examples and held-out split equal those of one process."""
    one = tmp_path / "one"
    tokenize(synth_dir / "train.jsonl", one, "data.eval_fraction=0.1")
    two = tmp_path / "two"
    proc = run_deepspeed(["data", "tokenize", "--input", str(synth_dir / "train.jsonl"), "--out", str(two), "--set",
                          "data.eval_fraction=0.1"], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index = json.loads((two / "index.json").read_text())
    assert len(index["splits"]["main"]["shards"]) == 2  # each rank wrote its part
    for split in ("main", "heldout"):
        stores = [build_data(DataConfig(train_files=[SourceConfig(str(s))], seq_len=256, eval_fraction=0.1), 42,
                             tmp_path / "unused") for s in (one, two)]  # 42: the seed data tokenize used
        data = [d.train if split == "main" else d.eval for d in stores]
        assert len(data[0]) > 0 and [data[0].example(i)[0].tolist() for i in range(len(data[0]))] == \
            [data[1].example(i)[0].tolist() for i in range(len(data[1]))]


LIMITED_RUN = """
import json, resource, sys
import numpy as np
import pytest
from mdm_scale.config.loader import load_config
from mdm_scale.distributed.env import init_distributed
from mdm_scale.training.trainer import Trainer

def private_memory():  # VmData: what RLIMIT_DATA limits (heap and private mappings; not file-backed pages)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData"))

env = init_distributed()
cfg = load_config(["configs/quickstart.yaml"], sys.argv[3:])
limit = private_memory() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
summary = Trainer(cfg, env).fit()
try:  # the control: reading the shard into memory must fail under this limit
    np.fromfile(sys.argv[2], dtype=np.uint16)
    control = "read"
except MemoryError:
    control = "MemoryError"
print(json.dumps({"step": summary["step"], "tokens": summary["tokens"], "control": control}))
"""


def test_training_reads_shards_larger_than_its_memory_limit(synth_dir, tmp_path):
    """The run's private memory may grow by 256 MiB once training starts (RLIMIT_DATA, enforced by the kernel);
    its training sources hold 1 GiB of tokens (a sparse shard: real size, no disk). It trains, drawing from both
    sources, and reading the shard into memory instead fails under the same limit."""
    small = tmp_path / "small"
    index = tokenize(synth_dir / "pretrain.jsonl", small)
    big, build = tmp_path / "big", tmp_path / ".big.build"
    build.mkdir()
    shard = build / "main-00000.tokens"
    with shard.open("wb") as f:
        f.truncate(1 << 30)
    shutil.copytree(small / "tokenizer", build / "tokenizer")
    publish(build, big, {**index, "key": "big", "source": [], "counts": {}},
            {"main": [{"name": "main-00000", "examples": 1, "tokens": 1 << 29}]})
    assert (big / "main-00000.tokens").stat().st_size == 1 << 30
    sets = tiny_overrides(synth_dir, tmp_path / "out", **{
        "data.train_files": [{"path": str(small), "weight": 1}, {"path": str(big), "weight": 1}],
        "data.eval_file": None, "data.seq_len": 256, "train.max_steps": 3, "train.micro_batch_size": 2,
        "train.zero_stage": 0})
    cfg = load_config(["configs/quickstart.yaml"], sets)
    loader = TrainLoader(build_data(cfg.data, 0, tmp_path / "unused").train, cfg.seed, 0, 1, 2, 1, 0, 8, 256)
    drawn = loader.stream.example_ids(range(3 * 2))
    assert {e >= loader.data.sizes[0] for e in drawn} == {False, True}  # the 3 steps read both sources
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LIMITED_RUN, str(256 << 20), str(big / "main-00000.tokens"), *sets],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"step": 3, "tokens": 3 * 2 * 256.0, "control": "MemoryError"}
    assert np.memmap(big / "main-00000.tokens", dtype=np.uint16, mode="r").shape == (1 << 29,)
