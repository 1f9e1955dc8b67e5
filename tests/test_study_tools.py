"""The study tools: ``mdm-scale experiment errors`` credits exactly what it claims; ``mdm-scale variance summary``
applies the MIRROR rule."""

from __future__ import annotations

from mdm_scale.experiments.answer_errors import family_profile
from mdm_scale.experiments.harness import pending, plan
from mdm_scale.variance.summary import rule


def _record(prompt: str, prediction: str, correct: bool) -> dict:
    return {"prompt": prompt, "prediction": prediction, "correct": correct}


def test_sort_profile_separates_copying_from_ordering():
    records = [_record("sort 3 1 2\n", "#### 123", True),       # right
               _record("sort 3 1 2\n", "#### 321", False),      # digits kept, not ordered
               _record("sort 5 1 7 0\n", "#### 0157", True),
               _record("sort 5 1 7 0\n", "#### 0177", False)]   # ordered, a digit lost
    p = family_profile("sort", records)
    assert (p["correct"], p["multiset kept"], p["ordered"]) == (0.5, 0.75, 0.75)
    assert p["accuracy_by_size"] == {3: 0.5, 4: 0.5}


def test_count_profile_separates_near_misses_from_counting_the_whole_list():
    records = [_record("count 3 in 3 1 3 9\n", "#### 2", True),    # right
               _record("count 3 in 3 1 3 9\n", "#### 4", False),   # the list's length
               _record("count 1 in 3 1 3 9 1\n", "#### 3", False)]  # off by one
    p = family_profile("count", records)
    assert p["correct"] == 1 / 3 and p["off by one"] == 2 / 3 and p["said the list length"] == 1 / 3
    assert p["accuracy_by_size"] == {4: 0.5, 5: 0.0}


def test_lookup_profile_checks_every_link_of_the_chain():
    prompt = "k=42, q=17, c=m, z=q, m=k, y=z. c?\n"
    records = [_record(prompt, "c=m=k=42 #### 42", True),
               _record(prompt, "c=m=q=17 #### 17", False),   # m=q is not an assignment
               _record(prompt, "c=m=k=42 #### 17", False)]   # right chain, answer not its end
    p = family_profile("lookup", records)
    assert p["chain valid"] == 2 / 3 and p["answer = chain end"] == 2 / 3
    assert p["accuracy_by_size"] == {3: 1 / 3}


def test_set_profiles_separate_wrong_digits_from_left_out_ones():
    records = [_record("missing 7 3 0 9 3 1 2 4 5\n", "#### 68", True),
               _record("missing 7 3 0 9 3 1 2 4 5\n", "#### 678", False),   # 7 is in the list
               _record("missing 7 3 0 9 3 1 2 4\n", "#### 58", False)]      # 6 is left out (true 568)
    p = family_profile("missing", records)
    assert p["correct"] == 1 / 3 and p["no wrong digit"] == 2 / 3 and p["no digit left out"] == 2 / 3
    assert p["accuracy_by_size"] == {8: 0.0, 9: 0.5}
    q = family_profile("common", [_record("common 1 5 7 ; 5 3 7 9\n", "#### 5", False)])  # true 57
    assert (q["no wrong digit"], q["no digit left out"], q["accuracy_by_size"]) == (1.0, 0.0, {4: 0.0})


def test_minmax_profile_checks_each_end():
    records = [_record("minmax 7 3 0 9 3\n", "#### 09", True),
               _record("minmax 7 3 0 9 3\n", "#### 39", False),   # min wrong
               _record("minmax 5 1 7\n", "#### 18", False)]       # max wrong (true 17)
    p = family_profile("minmax", records)
    assert p["correct"] == 1 / 3 and p["min right"] == 2 / 3 and p["max right"] == 2 / 3
    assert p["accuracy_by_size"] == {3: 0.0, 5: 0.5}


def test_add_profile_counts_digits_from_the_right():
    p = family_profile("add", [_record("4172 - 856 =\n", "#### 3326", False)])  # true 3316
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
    entries = plan(["standard", "mirror"], ["batch"], 8, 16)
    runs = [run for entry in entries for run in entry.runs(tmp_path, [3, 1, 2])]
    runs[0].directory.mkdir(parents=True)
    runs[0].result_file.write_text("{}")  # Standard seed 3 is finished
    order = [(r.method, r.seed) for r in pending(runs, [3, 1, 2])]
    assert order == [("mirror", 3), ("standard", 1), ("mirror", 1), ("standard", 2), ("mirror", 2)]


def test_the_commands_print_the_tables_of_the_library(tmp_path, capsys):
    """``mdm-scale experiment errors`` and ``mdm-scale variance summary`` print one row per file, with the numbers
    of ``family_profile`` and ``rule``; an unknown family is a one-line error (exit 2)."""
    import json

    from mdm_scale.cli import main

    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in [_record("sort 3 1 2\n", "#### 123", True),
                                                                  _record("sort 3 1 2\n", "#### 321", False)]))
    assert main(["experiment", "errors", "--family", "sort", str(predictions)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "| predictions | records | accuracy % | multiset kept % | ordered % | accuracy % by size |"
    assert rows[2] == f"| {predictions} | 2 | 50.0 | 100.0 | 50.0 | 3: 50 |"
    assert main(["experiment", "errors", "--family", "nonsense", str(predictions)]) == 2
    assert "--family 'nonsense': unknown" in capsys.readouterr().err

    report = tmp_path / "report.json"
    report.write_text(json.dumps(_report(0.2)))
    assert main(["variance", "summary", str(report)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3 and rows[2].startswith(f"| {report} | loss | 1.5 | 0.67 | 0.13 | 0.20 | 1.6 | yes |")
    assert rows[2].endswith("| 0.80 |")  # P-POTS / Standard


def test_plot_online_draws_a_runs_variance_scalars_with_their_intervals(tmp_path, capsys):
    """A run that logged intervals (``X_lo``, ``X_hi``) gets a band per estimate and a panel for the rule's
    gain; a run from before the intervals is drawn without them."""
    from matplotlib.collections import PolyCollection
    from torch.utils.tensorboard import SummaryWriter

    from mdm_scale.cli import main
    from mdm_scale.variance.online_plot import plot, read_variance_scalars

    values = {"A": 0.2, "B": 0.1, "C": 0.7, "V": 1.0, "A_share": 0.2, "B_share": 0.1, "C_share": 0.7,
              "pair_half_sq": 0.3}
    for name, intervals in (("new", True), ("old", False)):
        with SummaryWriter(str(tmp_path / name)) as writer:
            for step in (10, 20, 30):
                logged = {**values, "gain": -0.7} if intervals else dict(values)
                if intervals:
                    logged.update({f"{k}{end}": v + d for k, v in dict(logged).items()
                                   for end, d in (("_lo", -0.05), ("_hi", 0.05))})
                for key, value in {**logged, "mirror": float(step == 20)}.items():
                    writer.add_scalar(f"variance/{key}", value, step)
        assert main(["variance", "plot-online", str(tmp_path / name), "--out", str(tmp_path / f"{name}.png")]) == 0
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        figure = plot(read_variance_scalars(tmp_path / name), name)
        bands = [sum(isinstance(c, PolyCollection) for c in axis.collections) for axis in figure.axes]
        assert bands == ([3, 5, 1] if intervals else [0, 0])  # shares; A, B, C, V, pair; gain
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["variance", "plot-online", str(empty), "--out", str(tmp_path / "none.png")]) == 2
    assert "no variance/* scalars" in capsys.readouterr().err and not (tmp_path / "none.png").exists()


def test_variance_without_a_subcommand_is_measure(tmp_path, capsys):
    from mdm_scale.cli import build_parser, main
    from mdm_scale.variance.cli import with_subcommand

    old = ["--local_rank=0", "variance", "--config", "c.yaml", "--out", "r.json"]
    assert with_subcommand(old) == ["--local_rank=0", "variance", "measure", "--config", "c.yaml", "--out", "r.json"]
    for argv in (["variance", "summary", "r.json"], ["train", "--config", "variance"], ["variance", "--help"]):
        assert with_subcommand(argv) == argv
    args = build_parser().parse_args(with_subcommand(old))
    assert (args.variance_command, args.config, args.out) == ("measure", ["c.yaml"], "r.json")
    missing = tmp_path / "missing.yaml"
    assert main(["variance", "--config", str(missing), "--out", str(tmp_path / "r.json")]) == 2  # measure's error
    assert capsys.readouterr().err == f"mdm-scale: error: config file not found: {missing}\n"
