"""The study tools: family_errors.py credits exactly what it claims; abc_summary.py applies the MIRROR rule."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "experiments"))

from abc_summary import rule  # noqa: E402
from family_errors import error_profile  # noqa: E402
from run import pending, plan  # noqa: E402


def _record(prompt: str, prediction: str, correct: bool) -> dict:
    return {"prompt": prompt, "prediction": prediction, "correct": correct}


def test_sort_profile_separates_copying_from_ordering():
    records = [_record("sort 3 1 2\n", "#### 123", True),       # right
               _record("sort 3 1 2\n", "#### 321", False),      # digits kept, not ordered
               _record("sort 5 1 7 0\n", "#### 0157", True),
               _record("sort 5 1 7 0\n", "#### 0177", False)]   # ordered, a digit lost
    p = error_profile("sort", records)
    assert (p["correct"], p["multiset kept"], p["ordered"]) == (0.5, 0.75, 0.75)
    assert p["accuracy_by_size"] == {3: 0.5, 4: 0.5}


def test_count_profile_separates_near_misses_from_counting_the_whole_list():
    records = [_record("count 3 in 3 1 3 9\n", "#### 2", True),    # right
               _record("count 3 in 3 1 3 9\n", "#### 4", False),   # the list's length
               _record("count 1 in 3 1 3 9 1\n", "#### 3", False)]  # off by one
    p = error_profile("count", records)
    assert p["correct"] == 1 / 3 and p["off by one"] == 2 / 3 and p["said the list length"] == 1 / 3
    assert p["accuracy_by_size"] == {4: 0.5, 5: 0.0}


def test_lookup_profile_checks_every_link_of_the_chain():
    prompt = "k=42, q=17, c=m, z=q, m=k, y=z. c?\n"
    records = [_record(prompt, "c=m=k=42 #### 42", True),
               _record(prompt, "c=m=q=17 #### 17", False),   # m=q is not an assignment
               _record(prompt, "c=m=k=42 #### 17", False)]   # right chain, answer not its end
    p = error_profile("lookup", records)
    assert p["chain valid"] == 2 / 3 and p["answer = chain end"] == 2 / 3
    assert p["accuracy_by_size"] == {3: 1 / 3}


def test_set_profiles_separate_wrong_digits_from_left_out_ones():
    records = [_record("missing 7 3 0 9 3 1 2 4 5\n", "#### 68", True),
               _record("missing 7 3 0 9 3 1 2 4 5\n", "#### 678", False),   # 7 is in the list
               _record("missing 7 3 0 9 3 1 2 4\n", "#### 58", False)]      # 6 is left out (true 568)
    p = error_profile("missing", records)
    assert p["correct"] == 1 / 3 and p["no wrong digit"] == 2 / 3 and p["no digit left out"] == 2 / 3
    assert p["accuracy_by_size"] == {8: 0.0, 9: 0.5}
    q = error_profile("common", [_record("common 1 5 7 ; 5 3 7 9\n", "#### 5", False)])  # true 57
    assert (q["no wrong digit"], q["no digit left out"], q["accuracy_by_size"]) == (1.0, 0.0, {4: 0.0})


def test_minmax_profile_checks_each_end():
    records = [_record("minmax 7 3 0 9 3\n", "#### 09", True),
               _record("minmax 7 3 0 9 3\n", "#### 39", False),   # min wrong
               _record("minmax 5 1 7\n", "#### 18", False)]       # max wrong (true 17)
    p = error_profile("minmax", records)
    assert p["correct"] == 1 / 3 and p["min right"] == 2 / 3 and p["max right"] == 2 / 3
    assert p["accuracy_by_size"] == {3: 0.0, 5: 0.5}


def test_add_profile_counts_digits_from_the_right():
    p = error_profile("add", [_record("4172 - 856 =\n", "#### 3326", False)])  # true 3316
    assert p["length right"] == 1.0 and p["digits right"] == 0.75


def _report(mirror_a: float) -> dict:
    standard = {"A": 1.0, "B": 0.2, "C": 0.3, "total": 1.5}
    mirror = {"A": mirror_a, "B": 0.2, "C": 0.3, "total": mirror_a + 0.5}
    return {"methods": {"standard": {"loss": standard}, "mirror": {"loss": mirror},
                        "ppots": {"loss": {**standard, "total": 1.2}}}}


def test_mirror_rule_compares_the_pair_spread_with_one_rows_variance():
    # pair-mean A = (A + K)/2: 0.3 -> K = -0.4, A - K = 1.4 < V = 1.5; 0.2 -> K = -0.6, A - K = 1.6 > V
    loses, pays = rule(_report(0.3), "loss"), rule(_report(0.2), "loss")
    assert abs(loses["A-K"] - 1.4) < 1e-12 and loses["A-K"] < loses["V"] and loses["mirror/std, equal rows"] > 1
    assert abs(pays["A-K"] - 1.6) < 1e-12 and pays["A-K"] > pays["V"] and pays["mirror/std, equal rows"] < 1
    assert abs(pays["ppots/std"] - 0.8) < 1e-12 and abs(pays["B/V"] - 0.2 / 1.5) < 1e-12
    assert rule(_report(0.2), "grad") is None


def test_pending_runs_go_seed_major_and_skip_finished_ones(tmp_path):
    entries = plan(["Standard", "MIRROR"], ["batch"], 8, 16)
    runs = [run for entry in entries for run in entry.runs(tmp_path, [3, 1, 2])]
    runs[0].directory.mkdir(parents=True)
    runs[0].result_file.write_text("{}")  # Standard seed 3 is finished
    order = [(r.method, r.seed) for r in pending(runs, [3, 1, 2])]
    assert order == [("MIRROR", 3), ("Standard", 1), ("MIRROR", 1), ("Standard", 2), ("MIRROR", 2)]
