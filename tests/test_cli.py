"""First-hour command-line behaviour: ``--set`` with several pairs, the hint for missing synthetic data, and
one-process runs that pick their own rendezvous port."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, final_summary, process_env, tiny_overrides
from mdm_scale.cli import build_parser, main
from mdm_scale.config.loader import load_config


@pytest.mark.parametrize("command,extra", [(["train"], []), (["variance", "measure"], ["--out", "r.json"])])
def test_set_takes_several_pairs_per_flag_and_repeats(command, extra):
    argv = [*command, "--config", "c.yaml", "--set", "train.lr=1e-3", "train.max_steps=70", *extra,
            "--set", "seed=5", "train.lr=2e-3"]
    overrides = build_parser().parse_args(argv).set
    assert overrides == ["train.lr=1e-3", "train.max_steps=70", "seed=5", "train.lr=2e-3"]
    cfg = load_config([REPO / "configs/quickstart.yaml"], overrides)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.seed) == (2e-3, 70, 5)  # applied in order: the last lr wins


@pytest.mark.parametrize("command,extra", [(["train"], []), (["variance", "measure"], ["--out", "report.json"])])
def test_missing_synthetic_task_names_the_command_that_makes_it(command, extra, tmp_path, monkeypatch, capsys,
                                                                dist_env):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no data/synth yet
    assert main([*command, "--config", str(REPO / "configs/quickstart.yaml"), *extra]) == 2
    err = capsys.readouterr().err
    assert "data/synth/train.jsonl" in err and "`mdm-scale data synth --out data/synth`" in err, err
    assert main([*command, "--config", str(REPO / "configs/quickstart.yaml"), "--set",
                 "data.train_file=mine/train.jsonl", *extra]) == 2
    assert "data synth" not in capsys.readouterr().err  # only the synthetic task's own layout gets the hint


def test_master_port_keeps_a_given_port_and_the_default_for_launched_jobs():
    from mdm_scale.distributed.discovery import DEFAULT_PORT, master_port

    assert master_port("mpi", {"MASTER_PORT": "1234"}) == (1234, False)
    assert master_port("launcher", {}) == (DEFAULT_PORT, False)


def test_two_plain_runs_at_once_pick_their_own_free_ports(synth_dir, tmp_path):
    """Without a launcher and without MASTER_PORT, each one-process run rendezvous on a free port (no two runs
    on one machine fight over 29500)."""
    env = process_env()
    runs = [subprocess.Popen(
        [sys.executable, "-m", "mdm_scale.cli", "train", "--config", "configs/quickstart.yaml", "--set",
         *tiny_overrides(synth_dir, tmp_path / f"run{i}", **{"train.max_steps": 2, "train.save_every": 0})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    ports = []
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
        assert final_summary(out)["step"] == 2
        ports += re.findall(r"rendezvous on free port (\d+)", err)
    assert len(ports) == 2 and ports[0] != ports[1] and "29500" not in ports, ports


def test_readme_answer_regex_for_whole_response_answers():
    """The README's ``--answer-regex`` for answers that are the whole response does what the README says."""
    from mdm_scale.generation.answers import AnswerPattern

    readme = (REPO / "README.md").read_text()
    example = re.search(r"whole text with `--answer-regex '([^']+)'`", readme)
    assert example is not None, "README: no --answer-regex example for whole-response answers"
    answers = AnswerPattern(example.group(1))
    assert answers.extract(" chat.\n") == "chat"
    assert answers.extract("two\nlines ") == "two\nlines"
