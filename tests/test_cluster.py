"""Cluster operations with real components on CPU: a one-node SLURM on localhost (``tools/slurm_local.sh``),
``mpirun`` (MPICH from pip) with mpi4py discovery, ``kill -9`` of a rank, and elastic resumes 2 -> 1 and 1 -> 2
ranks.

Every scenario trains the same 2-rank run (same global batch, so the same samples with the same noise) and must
end exactly where the uninterrupted reference run ends: the same final train loss and held-out loss.

A missing SLURM or mpirun is never silent: the skip is listed in a banner at the end of the pytest run, and in
CI (``CI=true``) it is a failure unless ``MDM_ALLOW_CLUSTER_SKIP=1`` (``conftest.skip_cluster_test``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import (
    REPO,
    final_summary,
    free_port,
    process_env,
    read_scalars,
    run_deepspeed,
    skip_cluster_test,
    tiny_overrides,
)
from mdm_scale.config.loader import load_config
from mdm_scale.training.checkpoint import MANIFEST, CheckpointError
from mdm_scale.training.trainer import Trainer

pytestmark = pytest.mark.distributed

STEPS = 100
RUN = {"train.max_steps": STEPS, "train.save_every": 25, "train.keep_last": 4, "train.lr_schedule": "cosine"}


def train_args(synth: Path, out: Path, **extra) -> list[str]:
    args = ["--config", "configs/quickstart.yaml"]
    for item in tiny_overrides(synth, out, **RUN, **extra):
        args += ["--set", item]
    return args


def end_point(summary: dict) -> tuple[float, float]:
    """(train loss at the last step, held-out loss) of a finished run."""
    return read_scalars(summary["tensorboard_dir"], "train/loss")[STEPS], summary["eval_loss"]


@pytest.fixture(scope="module")
def reference(synth_dir, tmp_path_factory):
    """The uninterrupted 2-rank run through the deepspeed launcher; its checkpoints are kept (25, 50, 75, 100)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_deepspeed(["train", *train_args(synth_dir, out)], ranks=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = final_summary(proc.stdout)
    assert summary["step"] == STEPS
    return {"out": out, "summary": summary, "end": end_point(summary)}


# ---- SLURM ----------------------------------------------------------------------------------------------------
def slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (tools/test.sh installs and starts it as root: bash tools/slurm_local.sh start)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or not re.search(r"idle|mixed|allocated", probe.stdout):
        return f"no SLURM node is up (start one with: bash tools/slurm_local.sh start): {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def slurm():
    """Requested before ``reference``, so that a missing SLURM skips before the reference run is paid for."""
    reason = slurm_unavailable()
    if reason:
        skip_cluster_test(reason)


def job_state(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def submit(mode: str, log: Path, args: list[str], *sbatch_options: str) -> str:
    env = process_env(MDM_LAUNCH=mode, MDM_RANKS_PER_NODE="2")
    proc = subprocess.run(["sbatch", "--parsable", "--oversubscribe", f"--output={log}", *sbatch_options,
                           "launch/slurm/train.sbatch", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def finished(job: str) -> dict[str, str] | None:
    state = job_state(job)
    return state if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None


def test_slurm_both_modes_and_a_preempted_requeued_job_end_like_the_uninterrupted_run(slurm, synth_dir, tmp_path,
                                                                                      reference):
    """srun mode (one task per rank, SLURM discovery): SIGUSR1 mid-run -> checkpoint, exit 75, the script
    requeues the job, the requeued run resumes and ends exactly like the reference. deepspeed mode (one task per
    node running the deepspeed launcher with a hostfile from SLURM_JOB_NODELIST) runs alongside, uninterrupted."""
    logs = {mode: tmp_path / f"{mode}.log" for mode in ("srun", "deepspeed")}
    preempted = submit("srun", logs["srun"], train_args(synth_dir, tmp_path / "srun"), "--ntasks-per-node=2")
    plain = submit("deepspeed", logs["deepspeed"], train_args(synth_dir, tmp_path / "deepspeed"))

    def training_started():
        return logs["srun"].is_file() and "[train step 3]" in logs["srun"].read_text()

    wait_for(training_started, 600, "the srun-mode job to train")
    subprocess.run(["scancel", "--signal=USR1", preempted], check=True)
    for job, mode in ((preempted, "srun"), (plain, "deepspeed")):
        state = wait_for(lambda job=job: finished(job), 900, f"the {mode}-mode job to finish")
        log = logs[mode].read_text()
        assert state["JobState"] == "COMPLETED", f"{mode}: {state}\n{log[-4000:]}"
        summary = final_summary(log)
        assert summary["step"] == STEPS and summary["stopped_by"] is None
        assert end_point(summary) == pytest.approx(reference["end"], rel=1e-6), mode
    log = logs["srun"].read_text()
    stop = re.search(r"stopped by SIGUSR1 at step (\d+); checkpoint (\S+);", log)
    assert stop, log[-4000:]
    assert 3 <= int(stop.group(1)) < STEPS
    assert f"requeueing job {preempted}" in log and f"resumed from {stop.group(2)} at step {stop.group(1)}" in log
    assert job_state(preempted)["Restarts"] == "1" and job_state(plain)["Restarts"] == "0"
    assert "(srun mode)" in log and "(deepspeed mode)" in logs["deepspeed"].read_text()


# ---- mpirun and kill -9 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpirun() -> Path:
    """MPICH's mpirun from the dev extra's ``mpich`` wheel, next to this venv's python."""
    path = Path(sys.executable).with_name("mpirun")
    if not path.is_file():
        skip_cluster_test(f"{path} not found (the dev extra's mpich wheel provides it: pip install -e '.[dev]')")
    return path


def test_mpirun_discovery_and_kill_9_of_a_rank_then_resume(mpirun, synth_dir, tmp_path, reference):
    out = tmp_path / "run"
    cmd = [str(mpirun), "-np", "2", sys.executable, "-m", "mdm_scale.cli", "train", *train_args(synth_dir, out)]
    env = process_env(MASTER_PORT=str(free_port()))
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        first = out / "checkpoints" / "step_00000025" / MANIFEST
        wait_for(lambda: first.is_file() or proc.poll() is not None, 600, "the first checkpoint")
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "mdm_scale.cli" in p.cmdline()]
        assert len(ranks) == 2, (tmp_path / "killed.log").read_text()[-4000:]
        victim = next(p for p in ranks if p.environ().get("PMI_RANK") == "1")
        victim.kill()  # SIGKILL: no handler, no checkpoint
        assert proc.wait(timeout=300) != 0
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert int(latest.split("_")[1]) < STEPS, "the run finished before the kill"

    proc = subprocess.run(cmd, cwd=REPO, env=process_env(MASTER_PORT=str(free_port())), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert re.search(r"resumed from \S+step_000000\d\d at step \d+", proc.stdout), proc.stdout[-3000:]
    assert "2 rank(s) on cpu" in proc.stdout  # both ranks found each other through mpi4py
    assert end_point(final_summary(proc.stdout)) == pytest.approx(reference["end"], rel=1e-6)


# ---- elastic --------------------------------------------------------------------------------------------------
def assert_follows_reference_from_76(summary: dict, reference: dict) -> None:
    """A run resumed at step 75 with another world size (same global batch) follows the 2-rank reference's train
    losses and held-out loss up to float summation order."""
    ours = read_scalars(summary["tensorboard_dir"], "train/loss")
    theirs = read_scalars(reference["summary"]["tensorboard_dir"], "train/loss")
    for step in range(76, STEPS + 1):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-3), step
    assert summary["eval_loss"] == pytest.approx(reference["summary"]["eval_loss"], rel=1e-3)


def test_two_rank_checkpoint_resumes_on_one_rank_through_a_universal_checkpoint(synth_dir, tmp_path, reference,
                                                                              dist_env):
    """Same global batch on 1 rank (2 accumulated micro-batches): the same samples with the same noise, so the
    losses follow the 2-rank run up to float summation order (as in test_distributed)."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference["out"] / "checkpoints" / "step_00000075", out / "checkpoints" / "step_00000075")
    shutil.copytree(reference["out"] / "tokenizer", out / "tokenizer")
    shutil.copy(reference["out"] / "run.json", out / "run.json")

    def one_rank(**extra) -> Trainer:
        return Trainer(load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, out, **RUN, **extra)),
                       dist_env)

    with pytest.raises(CheckpointError, match=r"global batch of 8 sequences and this run has 4; .*"
                                              r"train.grad_accum = 8 / \(train.micro_batch_size x 1\)"):
        one_rank()
    trainer = one_rank(**{"train.grad_accum": 2})
    assert trainer.step == 75 and (out / "checkpoints" / "step_00000075" / "universal").is_dir()
    summary = trainer.fit()
    assert sorted(read_scalars(summary["tensorboard_dir"], "train/loss")) == list(range(76, STEPS + 1))
    assert_follows_reference_from_76(summary, reference)


def test_one_rank_checkpoint_resumes_on_two_ranks_through_a_universal_checkpoint(synth_dir, tmp_path, reference,
                                                                                dist_env):
    """The other direction: a 1-rank run (2 accumulated micro-batches) stopped at step 75 goes on with 2 ranks
    under the deepspeed launcher, where rank 0 converts the checkpoint while rank 1 waits, and ends where the
    2-rank reference ends."""
    out = tmp_path / "run"
    trainer = Trainer(load_config(["configs/quickstart.yaml"],
                                  tiny_overrides(synth_dir, out, **RUN, **{"train.grad_accum": 2})), dist_env)
    train_step = trainer.train_step

    def stop_at_75():
        result = train_step()
        if trainer.step == 75:
            os.kill(os.getpid(), signal.SIGUSR1)  # handled at the step boundary: checkpoint, then return
        return result

    trainer.train_step = stop_at_75
    assert trainer.fit()["step"] == 75
    proc = run_deepspeed(["train", *train_args(synth_dir, out)], ranks=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = final_summary(proc.stdout)
    assert (out / "checkpoints" / "step_00000075" / "universal").is_dir()
    assert_follows_reference_from_76(summary, reference)
