"""Failures inside one run (one in-process ZeRO-3 rank): non-finite steps, stop signals, damaged checkpoints,
and how a process finds its place in a SLURM or MPI job."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port, read_scalars, tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError
from mdm_scale.distributed.discovery import discover, first_host, slurm_step_env, tasks_on_node
from mdm_scale.training.checkpoint import MANIFEST, CheckpointError
from mdm_scale.training.faults import NonFiniteError
from mdm_scale.training.trainer import Trainer


def trainer(synth, out, env, **overrides) -> Trainer:
    return Trainer(load_config(["configs/quickstart.yaml"], tiny_overrides(synth, out, **overrides)), env)


def partitions(t: Trainer) -> torch.Tensor:
    """This rank's ZeRO-3 parameter partitions (all of them with one rank)."""
    return torch.cat([p.ds_tensor.detach().float().flatten().clone() for p in t.engine.module.parameters()])


def test_nonfinite_steps_are_skipped_counted_and_too_many_abort_with_the_last_good_state(synth_dir, tmp_path,
                                                                                        dist_env):
    t = trainer(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 10, "train.max_nonfinite_steps": 3})
    bad_steps, snapshots = {3, 5, 6, 7}, {}
    forward, train_step = t.engine.forward, t.train_step

    def poisoned_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if t.step + 1 in bad_steps:
            out.loss = out.loss * float("nan") if t.step + 1 != 6 else out.loss * float("inf")
        return out

    def recording_step():
        result = train_step()
        snapshots[t.step] = partitions(t)
        return result

    t.engine.forward, t.train_step = poisoned_forward, recording_step
    with pytest.raises(NonFiniteError, match=r"3 optimiser steps in a row \(5\.\.7\) had a non-finite loss or "
                                             r"gradient .* no update was applied since step 4, whose parameters "
                                             r"are saved in .*step_00000007"):
        t.fit()
    assert torch.equal(snapshots[3], snapshots[2]) and not torch.equal(snapshots[4], snapshots[3])
    assert all(torch.equal(snapshots[s], snapshots[4]) for s in (5, 6, 7))
    assert torch.isfinite(snapshots[7]).all()
    skipped = read_scalars(tmp_path / "run" / "tensorboard", "train/skipped_steps")
    assert [skipped[s] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert t.checkpoints.verify(tmp_path / "run" / "checkpoints" / "step_00000007", checksums=True) is None
    resumed = trainer(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 10, "train.max_nonfinite_steps": 3})
    assert resumed.step == 7 and resumed.guard.state_dict() == {"skipped": 4, "in_a_row": 3}  # counting goes on


def test_stop_signal_checkpoints_at_the_step_boundary_and_the_next_run_resumes(synth_dir, tmp_path, dist_env):
    t = trainer(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 6})
    train_step = t.train_step

    def signalled_step():
        result = train_step()
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives in the middle of the loop, handled at the boundary
        return result

    t.train_step = signalled_step
    summary = t.fit()
    assert summary["stopped_by"] == "SIGUSR1" and summary["step"] == 3 and summary["eval_loss"] is None
    assert summary["checkpoint"].endswith("step_00000003")
    resumed = trainer(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 6})
    assert resumed.step == 3
    summary = resumed.fit()
    assert summary["stopped_by"] is None and summary["step"] == 6 and summary["eval_loss"] is not None


def test_damaged_checkpoints_are_reported_and_the_previous_good_one_is_used(synth_dir, tmp_path, dist_env, capsys):
    out = tmp_path / "run"
    trainer(synth_dir, out, dist_env, **{"train.max_steps": 4, "train.save_every": 2, "train.keep_last": 3}).fit()
    ckpt = out / "checkpoints"
    shard = next(p for p in sorted((ckpt / "step_00000004").iterdir()) if p.name.endswith("optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the checksum sees it
    shard.write_bytes(bytes(data))
    (ckpt / "step_00000006").mkdir()  # an interrupted save: files but no manifest
    (ckpt / "step_00000006" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"partial")

    with pytest.raises(ConfigError, match=r"train.resume' = .*step_00000004.*fails its checksum"):
        trainer(synth_dir, tmp_path / "other", dist_env, **{"train.resume": str(ckpt / "step_00000004")})
    resumed = trainer(synth_dir, out, dist_env, **{"train.max_steps": 6, "train.save_every": 2})
    log = capsys.readouterr().out
    assert "step_00000006 is unusable: incomplete (no manifest" in log
    assert f"step_00000004 is damaged: file {shard} fails its checksum" in log
    assert resumed.step == 2 and (ckpt / "step_00000004.damaged").is_dir()
    lone = tmp_path / "lone" / "checkpoints"
    shutil.copytree(ckpt / "step_00000004.damaged", lone / "step_00000004")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*lone/checkpoints: every complete one is "
                                              r"damaged \(newest: step_00000004"):
        trainer(synth_dir, lone.parent, dist_env)
    assert resumed.fit()["step"] == 6
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    assert (ckpt / "step_00000006" / MANIFEST).is_file()


def test_slurm_host_lists_and_task_counts():
    assert first_host("gpu-[003-005,009],cpu1") == "gpu-003"
    assert first_host("node7,node8") == "node7"
    assert first_host("a[1-2]-ib[5-6]") == "a1-ib5"
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]


def test_discovery_prefers_the_launcher_then_srun_then_mpi():
    launcher = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert discover(dict(launcher)) == "launcher"
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "n[07-08]", "SLURM_JOB_ID": "1234"}
    environ = dict(srun)
    assert discover(environ) == "srun"
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT")} == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                        "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n07",
                                                        "MASTER_PORT": "21234"}
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}  # not inside srun
    assert slurm_step_env(batch_script) is None and discover(dict(batch_script)) == "mpi"


AGREE_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from mdm_scale.distributed.env import DistEnv, check_ranks_agree
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
env = DistEnv(rank, 2, rank, torch.device("cpu"))
check_ranks_agree("the configuration", "same everywhere", env)
check_ranks_agree("the data", sys.argv[1], env)
"""


def test_ranks_that_disagree_on_the_data_all_stop_with_a_clear_error(tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", AGREE_SCRIPT, text], cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port})
             for rank, text in enumerate(["tokens 1000", "tokens 999"])]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0
        assert "RuntimeError: ranks disagree on the data: ranks [1] differ from rank 0" in err, err[-2000:]
