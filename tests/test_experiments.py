"""The methods x seeds harness (``tools/experiments``): report arithmetic, and a micro experiment end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools" / "experiments"))
import methods as experiment_methods  # noqa: E402
import report  # noqa: E402


def test_summary_and_the_worst_versus_best_check():
    stats = report.summarize([50.0, 52.0, 57.0])
    assert stats["mean"] == pytest.approx(53.0)
    assert stats["sd"] == pytest.approx(((3**2 + 1**2 + 4**2) / 2) ** 0.5)  # sample sd, n - 1
    assert stats["range"] == pytest.approx(7.0)
    assert report.summarize([40.0])["sd"] is None
    assert report.worst_vs_best([60.0, 58.6], {"Standard": [50.6, 53.7], "Clipped": [55.6, 58.4]}) == "yes"
    assert report.worst_vs_best([50.8, 53.8], {"Clipped": [47.9, 50.9]}) == "no (Clipped best 50.90 > 50.80)"


def test_table_rows_hold_each_seed_the_statistics_and_the_check(tmp_path):
    """results.md from hand-written result files: a method that loses to the baseline's best run says so."""
    from run import Run

    accuracies = {"Standard": {1: 0.50, 2: 0.60}, "MIRROR": {1: 0.55, 2: 0.70}, "P-POTS": {1: 0.65, 2: 0.61}}
    runs = []
    for method, by_seed in accuracies.items():
        for seed, acc in by_seed.items():
            run = Run(method, seed, tmp_path / "runs" / experiment_methods.slug(method) / f"seed_{seed}")
            run.directory.mkdir(parents=True)
            run.result_file.write_text(json.dumps({"method": method, "seed": seed, "accuracy": acc, "correct": 0,
                                                   "total": 100, "no_answer": 0}))
            runs.append(run)
    table = report.markdown_table(report.load_results(runs), [1, 2], ["Standard"], {})
    rows = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Method")}
    assert rows["Standard"] == ["50.00", "60.00", "55.00", "7.07", "10.00", "+0.00", "(baseline)"]
    assert rows["MIRROR"] == ["55.00", "70.00", "62.50", "10.61", "15.00", "+7.50", "no (Standard best 60.00 > 55.00)"]
    assert rows["P-POTS"] == ["65.00", "61.00", "63.00", "2.83", "4.00", "+8.00", "yes"]


def test_every_method_maps_to_overrides_or_a_clean_reason():
    for name in experiment_methods.METHODS:
        why = experiment_methods.availability(name, ["configs/quickstart.yaml"], [])
        assert why is None or why.startswith(("unknown config key", "config key")), (name, why)
    assert experiment_methods.availability("Standard", ["configs/quickstart.yaml"], []) is None
    assert experiment_methods.availability("MIRROR", ["configs/quickstart.yaml"], []) is None
    assert experiment_methods.availability("Nonsense", ["configs/quickstart.yaml"], []).startswith("unknown method")
    assert experiment_methods.slug("P-POTS+MIRROR") == "p-pots+mirror"


def micro_experiment(synth_dir, tmp_path) -> tuple[Path, Path]:
    """A 3-step tiny-model training config and a 4-record eval file."""
    config = tmp_path / "micro.yaml"
    config.write_text(f"""
model: {{preset: tiny}}
data: {{train_file: {synth_dir / 'train.jsonl'}, eval_file: {synth_dir / 'eval.jsonl'}, seq_len: 192,
        response_eos_pad: 40}}
train: {{max_steps: 3, micro_batch_size: 4, lr: 3.0e-3, eval_every: 0, eval_samples: 8, log_every: 1,
         zero_stage: 0}}
logging: {{progress_bar: never}}
""")
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("".join((synth_dir / "eval.jsonl").read_text().splitlines(True)[:4]))
    return config, eval_data


@pytest.mark.distributed
def test_micro_experiment_runs_end_to_end_and_resumes(synth_dir, tmp_path):
    config, eval_data = micro_experiment(synth_dir, tmp_path)
    out = tmp_path / "exp"
    cmd = [sys.executable, "tools/experiments/run.py", "--config", str(config), "--methods",
           "Standard,MIRROR,Nonsense", "--seeds", "1,2", "--eval-data", str(eval_data), "--out", str(out),
           "--parallel", "2", "--eval-arg=--gen-length=40", "--eval-arg=--steps=4", "--eval-arg=--block-length=20"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Nonsense: not available (unknown method" in done.stdout

    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert header.split(" | ")[1:3] == ["seed 1", "seed 2"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["Standard"].rstrip(" |").endswith("(baseline)")
    assert "- Nonsense: unknown method" in table
    with (out / "results.csv").open() as f:
        records = list(csv.DictReader(f))
    # The check column is computed from the runs' accuracies: MIRROR's worst run against Standard's best.
    accuracy = {m: [100 * float(r["accuracy"]) for r in records if r["method"] == m] for m in ("Standard", "MIRROR")}
    worst, best = min(accuracy["MIRROR"]), max(accuracy["Standard"])
    check = "yes" if worst >= best else f"no (Standard best {best:.2f} > {worst:.2f})"
    assert rows["MIRROR"].rstrip(" |").endswith(f" | {check}")
    assert sorted((r["method"], r["seed"]) for r in records) == [("MIRROR", "1"), ("MIRROR", "2"),
                                                                  ("Standard", "1"), ("Standard", "2")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and r["total"] == "4" for r in records)
    assert (out / "results.png").stat().st_size > 1000
    assert len((out / "runs" / "mirror" / "seed_2" / "pred.jsonl").read_text().splitlines()) == 4

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 runs, 4 already finished, 0 to do" in again.stdout


def test_error_profile_of_true_and_corrupted_answers(tmp_path):
    import synth_errors

    from mdm_scale.data.synthetic import write_synthetic_task

    paths = write_synthetic_task(tmp_path, train=10, eval=40, seed=1, min_ops=2, max_ops=3)
    records = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    true = [{"prompt": r["prompt"], "prediction": r["response"], "correct": True} for r in records]
    p = synth_errors.error_profile(true)
    shares = ("accuracy", "start_copied", "steps_true", "chained", "answer_is_last_step")
    assert [p[k] for k in shares] == [1, 1, 1, 1, 1]
    assert set(p["accuracy_by_ops"]) == {2, 3}
    # Off by one in every first result: that step is false, the next no longer chains, the answer is kept.
    wrong = []
    for r in true:
        first = synth_errors.STEP.search(r["prediction"])
        bad = f"{first.group(1)} {first.group(2)} {first.group(3)} = {int(first.group(4)) + 1}"
        wrong.append({**r, "prediction": r["prediction"].replace(first.group(0), bad, 1), "correct": False})
    q = synth_errors.error_profile(wrong)
    steps = sum(len(synth_errors.STEP.findall(r["response"])) for r in records)
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
    done = subprocess.run([sys.executable, "tools/experiments/run.py", "--config", str(config), "--methods",
                           "Standard,ARM", "--seeds", "5", "--init", str(init), "--eval-data", str(eval_data),
                           "--out", str(out), "--set", "train.max_steps=1", "--set", "train.lr=1e-6",
                           "--eval-arg=--gen-length=8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"ARM: not available (--init {init} holds a bidirectional model; ARM needs a causal one" in done.stdout
    run = out / "runs" / "standard" / "seed_5"
    config_used = json.loads((run / "train" / "run.json").read_text())["config"]
    assert (config_used["model"]["path"], config_used["data"]["tokenizer"], config_used["seed"]) == (str(init),
                                                                                                      str(init), 5)
    trained = load_generation_model(run / "train", torch.device("cpu"), torch.float32).model.state_dict()
    start = pretrained.state_dict()
    assert trained.keys() == start.keys()
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) < 1e-4
    assert json.loads((run / "result.json").read_text())["total"] == 4
