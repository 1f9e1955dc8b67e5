"""The methods x seeds harness (``tools/experiments``): report arithmetic, and a micro experiment end to end."""

from __future__ import annotations

import csv
import subprocess
import sys

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


def test_every_method_maps_to_overrides_or_a_clean_reason():
    for name in experiment_methods.METHODS:
        why = experiment_methods.availability(name, ["configs/quickstart.yaml"], [])
        assert why is None or why.startswith(("unknown config key", "config key")), (name, why)
    assert experiment_methods.availability("Standard", ["configs/quickstart.yaml"], []) is None
    assert experiment_methods.availability("MIRROR", ["configs/quickstart.yaml"], []) is None
    assert experiment_methods.availability("Nonsense", ["configs/quickstart.yaml"], []).startswith("unknown method")
    assert experiment_methods.slug("P-POTS+MIRROR") == "p-pots+mirror"


@pytest.mark.distributed
def test_micro_experiment_runs_end_to_end_and_resumes(synth_dir, tmp_path):
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
    assert rows["MIRROR"].rstrip(" |").endswith(("yes", ")"))
    assert "- Nonsense: unknown method" in table
    with (out / "results.csv").open() as f:
        records = list(csv.DictReader(f))
    assert sorted((r["method"], r["seed"]) for r in records) == [("MIRROR", "1"), ("MIRROR", "2"),
                                                                  ("Standard", "1"), ("Standard", "2")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and r["total"] == "4" for r in records)
    assert (out / "results.png").stat().st_size > 1000
    assert len((out / "runs" / "mirror" / "seed_2" / "pred.jsonl").read_text().splitlines()) == 4

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 runs, 4 already finished, 0 to do" in again.stdout


def test_error_profile_of_true_and_corrupted_answers(tmp_path):
    import json

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
