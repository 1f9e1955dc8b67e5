"""Shared fixtures: a small synthetic task, one in-process rank, and a launcher for multi-rank runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdm_scale.data.cache import CACHE_ENV
from mdm_scale.distributed.discovery import LAUNCHER_VARS, free_port

CLUSTER_SKIP_OPT_OUT = "MDM_ALLOW_CLUSTER_SKIP"
"""Set to 1 to let CI pass while a cluster test (SLURM, mpirun) cannot run; without it such a skip fails in CI."""

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """The data cache (``data/cache.py``) of every test, and of the runs they launch: a temporary directory."""
    path = tmp_path_factory.mktemp("data_cache")
    os.environ[CACHE_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from mdm_scale.data.synthetic import write_synthetic_task

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_task(out, train=600, eval=64, seed=0, pretrain=200)
    return out


@pytest.fixture(scope="session")
def dist_env():
    """This pytest process as a world of one rank (gloo), shared by every in-process training test."""
    from mdm_scale.distributed.env import init_distributed

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        os.environ.setdefault(key, value)
    return init_distributed()


def tiny_overrides(synth: Path, out: Path, **extra) -> list[str]:
    """``--set`` items for a seconds-long run of the tiny model on the synthetic task."""
    items = {
        "model.preset": "tiny", "data.train_file": str(synth / "train.jsonl"),
        "data.eval_file": str(synth / "eval.jsonl"), "data.seq_len": 192, "train.output_dir": str(out),
        "train.max_steps": 6, "train.micro_batch_size": 4, "train.lr": 3e-3, "train.warmup_steps": 0,
        "train.log_every": 1, "train.eval_every": 0, "train.eval_samples": 32, "logging.progress_bar": "never",
    }
    items.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in items.items()]


def run_deepspeed(args: list[str], ranks: int = 2, timeout: int = 600, env: dict | None = None,
                  script: str | None = None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N --module mdm_scale.cli ARGS`` (or ``SCRIPT ARGS``) on CPU; returns the finished
    process."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    target = [script] if script else ["--module", "mdm_scale.cli"]
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(free_port()), *target, *args]
    full_env = process_env(**(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def process_env(**extra: str) -> dict[str, str]:
    """The environment for a child process of its own: this one's on CPU, one thread, this interpreter's scripts
    first on PATH, and without the rank variables that ``dist_env`` sets here (a child would try to join this
    process's world on its port; a launcher sets its own); plus ``extra`` (which may set some of them)."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARS}
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": path, **extra}


def write_jsonl(path: str | Path, records: list) -> str:
    """``records`` (mappings, or lines written as they are) as a JSON-lines file at ``path``; returns the path
    as a string, as config values hold it."""
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def final_summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith('{"final"')]
    assert lines, f"no final summary in output:\n{stdout[-3000:]}"
    return json.loads(lines[-1])["final"]


def read_scalars(tb_dir: str | Path, tag: str) -> dict[int, float]:
    """Scalars of one tag read back with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


FIXTURES_ENV = "MDM_SCALE_FIXTURES"
"""Where the tiny LLaDA / Dream checkpoint fixtures are (default: ``../shared/fixtures`` beside the checkout)."""


def format_fixture(name: str) -> Path:
    """``llada-tiny`` or ``dream-tiny``: a checkpoint in the released format with upstream reference logits
    (``reference.safetensors``). Skips, saying why, where the fixtures are absent (a plain clone)."""
    root = Path(os.environ.get(FIXTURES_ENV) or REPO.parent / "shared" / "fixtures")
    path = root / name
    if not (path / "reference.safetensors").is_file():
        pytest.skip(f"checkpoint fixture {path} is absent: set {FIXTURES_ENV} to the folder holding llada-tiny and "
                    f"dream-tiny to run the native-format tests")
    return path


@pytest.fixture(scope="session")
def llada_fixture() -> Path:
    return format_fixture("llada-tiny")


@pytest.fixture(scope="session")
def dream_fixture() -> Path:
    return format_fixture("dream-tiny")


@pytest.fixture(scope="session")
def tiny_export(synth_dir, dist_env, tmp_path_factory) -> tuple[Path, Path]:
    """``(run_dir, export_dir)``: a 2-step tiny training run and its ``mdm-scale export``."""
    from mdm_scale.cli import main
    from mdm_scale.config.loader import load_config
    from mdm_scale.training.trainer import Trainer

    root = tmp_path_factory.mktemp("tiny_export")
    run_dir, export_dir = root / "run", root / "export"
    Trainer(load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, run_dir, **{"train.max_steps": 2})),
            dist_env).fit()
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(export_dir)]) == 0
    return run_dir, export_dir


# ---- cluster tests that cannot run are loud ---------------------------------------------------------------
def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_cluster_test(reason: str) -> None:
    """Skip a test that needs a cluster tool (SLURM, mpirun) that is missing here, with the reason in the
    terminal summary's banner (``pytest_terminal_summary``). In CI (``CI=true``) it fails instead, unless
    ``MDM_ALLOW_CLUSTER_SKIP=1`` says that this CI machine is known to lack the tool."""
    if in_ci() and os.environ.get(CLUSTER_SKIP_OPT_OUT) != "1":
        pytest.fail(f"cluster test cannot run in CI: {reason} (tools/test.sh installs SLURM and mpirun; set "
                    f"{CLUSTER_SKIP_OPT_OUT}=1 to allow this skip)", pytrace=False)
    pytest.skip(f"CLUSTER TEST SKIPPED: {reason}")


def pytest_terminal_summary(terminalreporter):
    """A banner after the run listing every cluster test that was skipped and why (a plain ``s`` in the
    progress line is easy to miss)."""
    skipped = [report for report in terminalreporter.stats.get("skipped", [])
               if isinstance(report.longrepr, tuple) and "CLUSTER TEST SKIPPED" in report.longrepr[2]]
    if not skipped:
        return
    terminalreporter.section(f"{len(skipped)} CLUSTER TEST(S) SKIPPED: SLURM / mpirun were NOT tested", sep="!",
                             red=True, bold=True)
    for report in skipped:
        terminalreporter.write_line(f"{report.nodeid}: {report.longrepr[2].split('CLUSTER TEST SKIPPED: ')[-1]}",
                                    red=True)
    terminalreporter.write_line(f"(in CI, CI=true turns these skips into failures unless {CLUSTER_SKIP_OPT_OUT}=1)")
