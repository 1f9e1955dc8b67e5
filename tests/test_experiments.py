"""The methods x seeds harness (``mdm-scale experiment run``, ``mdm_scale/experiments``): report arithmetic, and a
micro experiment end to end."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, process_env
from mdm_scale.experiments import harness as experiment_run
from mdm_scale.experiments import methods as experiment_methods
from mdm_scale.experiments import report


def test_summary_and_the_worst_versus_best_check():
    stats = report.summarize([50.0, 52.0, 57.0])
    assert stats["mean"] == pytest.approx(53.0)
    assert stats["sd"] == pytest.approx(((3**2 + 1**2 + 4**2) / 2) ** 0.5)  # sample sd, n - 1
    assert (stats["worst"], stats["best"]) == (50.0, 57.0)
    assert report.summarize([40.0])["sd"] is None
    assert report.worst_vs_best([60.0, 58.6], {"Standard": [50.6, 53.7], "Clipped": [55.6, 58.4]}) == "yes"
    assert report.worst_vs_best([50.8, 53.8], {"Clipped": [47.9, 50.9]}) == "no (Clipped best 50.90 > 50.80)"


def test_table_rows_hold_each_seed_the_statistics_and_the_check(tmp_path):
    """results.md from hand-written result files: a method that loses to the baseline's best run says so, and
    the Δ columns compare with Standard at the same sequences (equal batch) and the same rows (equal compute)."""
    accuracies = {"Standard": {1: 0.50, 2: 0.60}, "Standard 2x": {1: 0.58, 2: 0.66},
                  "MIRROR": {1: 0.55, 2: 0.70}, "P-POTS": {1: 0.65, 2: 0.61}}  # by the labels reports show
    groups = []
    for entry in experiment_run.plan(["standard", "standard 2x", "mirror", "ppots"], ["batch"], micro=4, rows=4):
        runs = entry.runs(tmp_path, [1, 2])
        for run in runs:
            run.directory.mkdir(parents=True)
            run.result_file.write_text(json.dumps({"method": run.method, "seed": run.seed, "correct": 0,
                                                   "accuracy": accuracies[entry.label][run.seed], "total": 100,
                                                   "no_answer": 0}))
        groups.append((entry, runs))
    table = report.markdown_table(report.load_results(groups), [1, 2], ["standard"], {})
    header = next(line for line in table.splitlines() if line.startswith("| Method")).strip("| ").split(" | ")
    rows = {cells[0]: dict(zip(header, cells)) for line in table.splitlines() if line.startswith("| ")
            and (cells := line.strip("| ").split(" | "))[0] != "Method"}
    stats = ("seed 1", "seed 2", "mean", "sd", "worst", "best", "Δ vs Standard, equal batch",
             "Δ vs Standard, equal compute", "worst run ≥ best baseline run")
    assert [rows["Standard"][k] for k in stats] == ["50.00", "60.00", "55.00", "7.07", "50.00", "60.00", "–", "–",
                                                    "(baseline)"]
    # MIRROR (4 sequences, 8 rows): +7.50 over Standard at equal batch, +0.50 over Standard 2x at equal rows; its
    # worst run (55) is below the best baseline run of both its peers (Standard: 60, Standard 2x: 66).
    assert [rows["MIRROR"][k] for k in stats] == [
        "55.00", "70.00", "62.50", "10.61", "55.00", "70.00", "+7.50", "+0.50",
        "no (Standard best 60.00 > 55.00; Standard 2x best 66.00 > 55.00)"]
    assert [rows["P-POTS"][k] for k in stats] == ["65.00", "61.00", "63.00", "2.83", "61.00", "65.00", "+8.00",
                                                  "+8.00", "yes"]


def test_every_method_maps_to_overrides_or_a_clean_reason():
    """The harness's methods are the package's table (one spelling); reports and run directories use the derived
    display names, so directories of studies from before the table keep their names (``p-pots+mirror``)."""
    from mdm_scale.config.methods import parts

    for name in [*parts(), "ppots+mirror", "ppots+strats", "standard 2x"]:
        why = experiment_methods.availability(name, ["configs/quickstart.yaml"], [])
        assert why is None or why.startswith(("unknown config key", "config key")), (name, why)
    assert experiment_methods.availability("isad", ["configs/quickstart.yaml"], []) is None
    assert experiment_methods.availability("Nonsense", ["configs/quickstart.yaml"], []).startswith("unknown method")
    assert experiment_methods.availability("P-POTS", ["configs/quickstart.yaml"], []).startswith("unknown method")
    assert not experiment_methods.known("MIRROR") and experiment_methods.known("standard 2x")
    assert experiment_methods.overrides("ppots+mirror") == ["variance.t_sampler.name=ppots",
                                                             "variance.masks.name=mirror"]
    assert experiment_methods.overrides("ema") == ["variance.ema.bins=10"]
    assert [experiment_methods.rows_per_sequence(m) for m in ("mirror", "ppots+mirror", "auto", "standard 2x")] == \
        [2, 2, 1, 1]
    assert experiment_methods.display("ppots+strats") == "P-POTS+StraTS"
    assert experiment_methods.slug("ppots+mirror") == "p-pots+mirror"
    assert experiment_methods.slug("standard 2x") == "standard_2x"


def test_both_protocols_share_the_runs_they_have_in_common(tmp_path):
    methods = ["standard", "standard 2x", "ppots", "mirror", "ppots+mirror", "auto"]
    entries = experiment_run.plan(methods, ["batch", "rows"], micro=64, rows=128)
    got = {(e.label, e.method, e.micro, e.rows, "+".join(e.protocols)) for e in entries}
    assert got == {("Standard", "standard", 64, 64, "batch"), ("Standard 2x", "standard", 128, 128, "batch+rows"),
                   ("P-POTS", "ppots", 64, 64, "batch"), ("P-POTS 2x", "ppots", 128, 128, "rows"),
                   ("MIRROR", "mirror", 64, 128, "batch+rows"),
                   ("P-POTS+MIRROR", "ppots+mirror", 64, 128, "batch+rows"),
                   ("auto", "auto", 64, 64, "batch"), ("auto 2x", "auto", 128, 128, "rows")}
    directories = [run.directory for e in entries for run in e.runs(tmp_path, [1, 2])]
    assert len(set(directories)) == len(directories) == 2 * len(entries)
    assert tmp_path / "runs" / "standard" / "mb_128" / "seed_2" in directories
    # Equal rows at R = B: only the MIRROR family moves (to half the sequences); Standard 2x is batch-only.
    half = {(e.label, e.micro, "+".join(e.protocols)) for e in experiment_run.plan(methods, ["rows"], 64, 64)}
    assert half == {("Standard", 64, "rows"), ("P-POTS", 64, "rows"), ("MIRROR 0.5x", 32, "rows"),
                    ("P-POTS+MIRROR 0.5x", 32, "rows"), ("auto", 64, "rows")}


def as_chat(record: dict) -> str:
    return json.dumps({"messages": [{"role": "user", "content": record["prompt"]},
                                    {"role": "assistant", "content": record["response"]}]})


def micro_experiment(synth_dir, tmp_path) -> tuple[Path, Path]:
    """A 3-step tiny-model training config, mixing prompt/response records with chat records, and a 4-record eval
    file of chat records."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(as_chat(json.loads(line)) + "\n" for line in
                            (synth_dir / "train.jsonl").read_text().splitlines()[:100]))
    config = tmp_path / "micro.yaml"
    config.write_text(f"""
model: {{preset: tiny}}
data: {{train_files: [{{path: {synth_dir / 'train.jsonl'}, weight: 3}}, {{path: {chat}, weight: 1}}],
        eval_file: {synth_dir / 'eval.jsonl'}, seq_len: 192, response_eos_pad: 40}}
train: {{max_steps: 3, micro_batch_size: 4, lr: 3.0e-3, eval_every: 1, eval_samples: 8, log_every: 1,
         zero_stage: 0}}
logging: {{progress_bar: never}}
""")
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("".join(as_chat(json.loads(line)) + "\n"
                                 for line in (synth_dir / "eval.jsonl").read_text().splitlines()[:4]))
    return config, eval_data


@pytest.mark.distributed
def test_micro_experiment_runs_end_to_end_and_resumes(synth_dir, tmp_path):
    config, eval_data = micro_experiment(synth_dir, tmp_path)
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "mdm_scale.cli", "experiment", "run", "--config", str(config), "--methods",
           "standard,standard 2x,mirror,Nonsense", "--seeds", "1,2", "--eval-data", str(eval_data), "--out",
           str(out), "--budget", "batch,rows", "--parallel", "2", "--eval-arg=--gen-length=40",
           "--eval-arg=--steps=4", "--eval-arg=--block-length=20"]
    done = subprocess.run(cmd, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Nonsense: not available (unknown method" in done.stdout
    assert "6 runs, 0 already finished, 6 to do" in done.stdout  # Standard 2x and MIRROR serve both protocols

    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method")).strip("| ").split(" | ")
    assert header[4:6] == ["seed 1", "seed 2"] and header[-3:] == ["rows / run", "tokens / run", "FLOPs / run"]
    rows = {cells[0]: dict(zip(header, cells)) for line in table.splitlines() if line.startswith("| ")
            and (cells := line.strip("| ").split(" | "))[0] != "Method" and not cells[0].startswith("-")}
    assert set(rows) == {"Standard", "Standard 2x", "MIRROR"}
    assert rows["Standard 2x"]["protocols"] == rows["MIRROR"]["protocols"] == "batch, rows"
    assert rows["Standard"]["worst run ≥ best baseline run"] == "(baseline)"
    assert rows["MIRROR"]["Δ vs Standard, equal batch"] != "–" != rows["MIRROR"]["Δ vs Standard, equal compute"]
    assert "- Nonsense: unknown method" in table
    with (out / "results.csv").open() as f:
        records = {(r["label"], int(r["seed"])): r for r in csv.DictReader(f)}
    assert sorted(records) == [(label, seed) for label in ("MIRROR", "Standard", "Standard 2x") for seed in (1, 2)]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and r["total"] == "4" for r in records.values())
    # The check column is computed from the runs' accuracies: MIRROR's worst run against Standard's best.
    worst = min(100 * float(r["accuracy"]) for (label, _), r in records.items() if label == "MIRROR")
    best = max(100 * float(r["accuracy"]) for (label, _), r in records.items() if label == "Standard")
    check = "yes" if worst >= best else f"no (Standard best {best:.2f} > {worst:.2f})"
    assert rows["MIRROR"]["worst run ≥ best baseline run"] == check
    # Every run spent 3 steps x its rows per micro-batch; MIRROR's rows are Standard 2x's, its tokens twice
    # Standard's on the same sequences (same seed, same data order at micro-batch 4); FLOPs are tokens x F.
    for (label, seed), r in records.items():
        assert float(r["rows"]) == 3 * {"Standard": 4, "Standard 2x": 8, "MIRROR": 8}[label]
        assert float(r["flops"]) == pytest.approx(float(r["tokens"]) * float(records["Standard", 1]["flops"])
                                                  / float(records["Standard", 1]["tokens"]), rel=1e-12)
        if label == "MIRROR":
            assert float(r["tokens"]) == 2 * float(records["Standard", seed]["tokens"])
    # The held-out loss curve: an eval every step, at the FLOPs spent so far (the last: the run's total).
    result = json.loads((out / "runs" / "mirror" / "mb_4" / "seed_1" / "result.json").read_text())
    curve = report.eval_loss_by_flops(result, report.run_scalars(result, out / "runs" / "mirror" / "mb_4" / "seed_1"))
    assert sorted(curve) == [1, 2, 3] and curve[3][0] == pytest.approx(result["flops"], rel=1e-9)
    assert curve[1][0] == pytest.approx(result["flops"] / 3, rel=0.2)
    assert curve[3][1] == pytest.approx(result["eval_loss"], rel=1e-6)  # TensorBoard keeps float32
    assert (out / "results.png").stat().st_size > 1000
    assert len((out / "runs" / "mirror" / "mb_4" / "seed_2" / "pred.jsonl").read_text().splitlines()) == 4

    again = subprocess.run(cmd, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "6 runs, 6 already finished, 0 to do" in again.stdout


def test_auto_study_plans_equal_rows_first_and_collects_the_decisions(tmp_path):
    """``python -m tools.experiments.auto_study``: per family Standard, auto and MIRROR 0.5x at the config's
    micro-batch of rows, with ``--equal-batch`` also MIRROR at equal batch and Standard 2x, scheduled after every
    equal-rows run; ``auto_decisions.csv`` and ``auto_summary.md`` from the runs' variance lines (here the console
    lines of ``train.log``, estimates with their intervals: ``variance/mirror`` at step s is the setting from step
    s + 1 on; the SE of the rule's numbers is the interval's half-width / 1.96)."""
    from tools.experiments import auto_study

    options = argparse.Namespace(seeds="7,8", rows=None, set=[], equal_batch=["minmax"], synth_train=40,
                                 synth_eval=8, eval_batch=8)
    plans = {name: auto_study.family_args(name, tmp_path, options) for name in ("sort", "minmax")}
    entries, todo = auto_study.study_jobs(plans, tmp_path, [7, 8])
    labels = {name: {(e.label, e.micro, e.rows) for e in family} for name, family in entries.items()}
    equal_rows = {("Standard", 64, 64), ("auto", 64, 64), ("MIRROR 0.5x", 32, 64)}
    assert labels == {"sort": equal_rows, "minmax": equal_rows | {("MIRROR", 64, 128), ("Standard 2x", 128, 128)}}
    assert len(todo) == 2 * (3 + 5)  # every run of both seeds (none finished)
    order = [(run.method, run.micro, run.seed) for run, _, _ in todo]
    assert order[-4:] == [("standard", 128, 7), ("mirror", 64, 7), ("standard", 128, 8), ("mirror", 64, 8)]
    assert (tmp_path / "minmax" / "data" / "eval.jsonl").is_file()

    finished, unfinished = (experiment_run.Run("auto", 64, seed, tmp_path / f"seed_{seed}") for seed in (7, 8))
    finished.directory.mkdir()
    (finished.directory / "train.log").write_text(
        "[train step 50] loss=2.0\n[variance step 50] V=0.9 [0.8, 1] gain=-0.1 [-0.2, 0] mirror=0\n"
        "[variance step 100] V=0.8 [0.7, 0.9] gain=0.3 [0.1, 0.5] mirror=1\n"
        "[variance step 150] V=0.7 [0.6, 0.8] gain=0.2 [0.1, 0.3] mirror=1\n")
    finished.result_file.write_text(json.dumps({"tensorboard_dir": None}))
    table, summary = auto_study.write_decisions(tmp_path, [finished, unfinished])
    with table.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["step"], r["mirror"], r["gain"], r["gain_lo"], r["V_hi"]) for r in rows] == [
        ("7", "50", "0.0", "-0.1", "-0.2", "1.0"), ("7", "100", "1.0", "0.3", "0.1", "0.9"),
        ("7", "150", "1.0", "0.2", "0.1", "0.8")]
    assert float(rows[1]["gain_se"]) == pytest.approx(0.2 / 1.959964, rel=1e-6)
    lines = summary.read_text().splitlines()
    assert lines[2] == "| 7 | 3 | 2 | 101 | 0.2 (0.05102), –, – |" and lines[3].startswith("| 8 | not finished")


def test_error_profile_of_true_and_corrupted_answers(tmp_path):
    from mdm_scale.data.synthetic import write_synthetic_task
    from mdm_scale.experiments import answer_errors

    paths = write_synthetic_task(tmp_path, train=10, eval=40, seed=1, min_ops=2, max_ops=3)
    records = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    true = [{"prompt": r["prompt"], "prediction": r["response"], "correct": True} for r in records]
    p = answer_errors.arith_profile(true)
    shares = ("accuracy", "start_copied", "steps_true", "chained", "answer_is_last_step")
    assert [p[k] for k in shares] == [1, 1, 1, 1, 1]
    assert set(p["accuracy_by_ops"]) == {2, 3}
    # Off by one in every first result: that step is false, the next no longer chains, the answer is kept.
    wrong = []
    for r in true:
        first = answer_errors.STEP.search(r["prediction"])
        bad = f"{first.group(1)} {first.group(2)} {first.group(3)} = {int(first.group(4)) + 1}"
        wrong.append({**r, "prediction": r["prediction"].replace(first.group(0), bad, 1), "correct": False})
    q = answer_errors.arith_profile(wrong)
    steps = sum(len(answer_errors.STEP.findall(r["response"])) for r in records)
    assert q["steps_true"] == pytest.approx((steps - len(records)) / steps)
    assert q["chained"] == pytest.approx((steps - 2 * len(records)) / (steps - len(records)))
    assert (q["accuracy"], q["start_copied"], q["answer_is_last_step"]) == (0, 1, 1)


def test_init_fine_tunes_every_run_from_a_pretrained_directory(synth_dir, tmp_path):
    """``--init DIR``: each run trains from DIR's weights and tokenizer (one step at lr 1e-6 moves no weight by
    more than ~1e-6, while another initialisation differs by ~0.02), and ARM, which needs a causal model, is
    reported as not available for a bidirectional DIR."""
    import torch

    from mdm_scale.data.tokenizer import build_char_tokenizer
    from mdm_scale.generation.model_source import load_generation_model
    from mdm_scale.models.configuration_mdm import MDMConfig
    from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

    tokenizer = build_char_tokenizer([(synth_dir / name).read_text() for name in ("train.jsonl", "eval.jsonl")])
    torch.manual_seed(123)
    pretrained = MDMForMaskedDiffusion(MDMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 mask_token_id=tokenizer.mask_token_id))
    init = tmp_path / "pretrained"
    pretrained.save_pretrained(str(init))
    tokenizer.save_pretrained(str(init))
    config, eval_data = micro_experiment(synth_dir, tmp_path)
    out = tmp_path / "exp"
    done = subprocess.run([sys.executable, "-m", "mdm_scale.cli", "experiment", "run", "--config", str(config),
                           "--methods",
                           "standard,arm", "--seeds", "5", "--init", str(init), "--eval-data", str(eval_data),
                           "--out", str(out), "--set", "train.max_steps=1", "--set", "train.lr=1e-6",
                           "--eval-arg=--gen-length=8"], cwd=REPO, env=process_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"arm: not available (--init {init} holds a bidirectional model; ARM needs a causal one" in done.stdout
    run = out / "runs" / "standard" / "mb_4" / "seed_5"  # micro_experiment: micro-batch 4
    config_used = json.loads((run / "train" / "run.json").read_text())["config"]
    assert (config_used["model"]["path"], config_used["data"]["tokenizer"], config_used["seed"]) == (str(init),
                                                                                                      str(init), 5)
    trained = load_generation_model(run / "train", torch.device("cpu"), torch.float32).model.state_dict()
    start = pretrained.state_dict()
    assert trained.keys() == start.keys()
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) < 1e-4
    assert json.loads((run / "result.json").read_text())["total"] == 4


def test_bad_flags_are_one_line_errors_before_any_run(synth_dir, tmp_path, capsys):
    from mdm_scale.cli import main

    base = ["experiment", "run", "--config", str(REPO / "configs/quickstart.yaml"), "--methods", "Standard",
            "--eval-data", str(synth_dir / "eval.jsonl"), "--out", str(tmp_path / "exp")]
    cases = {("--seeds", "1,x"): "--seeds '1,x': expected comma-separated integers",
             ("--seeds", "1", "--init", str(synth_dir)): f"--init {synth_dir}: not a Hugging Face directory",
             ("--seeds", "1", "--budget", "steps"): "--budget 'steps': expected one or both of batch, rows"}
    for flags, message in cases.items():
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"mdm-scale: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "exp").exists()
