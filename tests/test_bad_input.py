"""Bad input through the command line: each problem ends the run with exit status 2 and one line on stderr that
names the problem and where it is (key, file and line, parameter), and leaves nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import tiny_overrides, write_jsonl
from mdm_scale.cli import main


@pytest.fixture(scope="module")
def finished_run(synth_dir, tmp_path_factory, dist_env) -> Path:
    """An output directory holding a 2-step run of the tiny model."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli(tiny_overrides(synth_dir, out, **{"train.max_steps": 2})) == 0
    return out


def cli(overrides: list[str]) -> int:
    argv = ["train", "--config", "configs/quickstart.yaml"]
    for item in overrides:
        argv += ["--set", item]
    return main(argv)


def no_mask_tokenizer(path: Path, synth: Path) -> str:
    from transformers import PreTrainedTokenizerFast

    from mdm_scale.data.tokenizer import build_char_tokenizer

    backend = build_char_tokenizer([(synth / "train.jsonl").read_text()]).backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|eos|>",
                            unk_token="<|unk|>").save_pretrained(str(path))
    return str(path)


GOOD = {"prompt": "1 + 1 =", "response": "2"}
CHAT = {"messages": [{"role": "user", "content": "1 + 1 ="}, {"role": "assistant", "content": "2"}]}
CASES = {
    "misspelt key": (lambda tmp, synth: {"train.max_step": 3},
                     r"unknown config key 'train.max_step' \(did you mean 'train.max_steps'\?\)"),
    "batch arithmetic": (lambda tmp, synth: {"train.global_batch_size": 5},
                         r"config key 'train.global_batch_size' = 5: it must equal train.micro_batch_size \(4\) x "
                         r"train.grad_accum \(1\) x world size \(1\) = 4"),
    "missing file": (lambda tmp, synth: {"data.train_file": str(tmp / "nope.jsonl")},
                     r"config key 'data.train_file': file not found: .*nope.jsonl"),
    "malformed line": (lambda tmp, synth: {"data.train_file": write_jsonl(tmp / "t.jsonl", [
        GOOD, GOOD, '{"prompt": "x",'])}, r"t.jsonl:3: not valid JSON"),
    "empty response": (lambda tmp, synth: {"data.train_file": write_jsonl(tmp / "t.jsonl", [
        GOOD, {"prompt": "a", "response": " "}])}, r"t.jsonl:2: empty response"),
    "over-long prompt": (lambda tmp, synth: {"data.train_file": write_jsonl(tmp / "t.jsonl", [
        GOOD, {"prompt": "7" * 300, "response": "1"}])},
                         r"t.jsonl:2: over-long prompt \(\d+ tokens leave no room for a response in "
                         r"data.seq_len=192\)"),
    "chat without assistant turn": (lambda tmp, synth: {"data.train_file": write_jsonl(tmp / "t.jsonl", [CHAT, {
        "messages": [{"role": "user", "content": "1 + 1 ="}]}])}, r"t.jsonl:2: no assistant turn \(nothing to score\)"),
    "chat with unknown role": (lambda tmp, synth: {"data.train_file": write_jsonl(tmp / "t.jsonl", [CHAT, {
        "messages": [{"role": "human", "content": "1 + 1 ="}, {"role": "assistant", "content": "2"}]}])},
        r"t.jsonl:2: unknown role \(message 1: 'human'; roles are system, user, assistant, tool\)"),
    "chat with non-string content": (lambda tmp, synth: {"data.train_file": write_jsonl(tmp / "t.jsonl", [CHAT, {
        "messages": [{"role": "user", "content": ["1 + 1 ="]}, {"role": "assistant", "content": "2"}]}])},
        r"t.jsonl:2: content not a string \(message 1, user: list\)"),
    "mixture without every weight": (lambda tmp, synth: {"data.train_files": [
        {"path": str(synth / "train.jsonl"), "weight": 2}, {"path": str(synth / "eval.jsonl")}]},
        r"config key 'data.train_files\[\*\].weight' = \[2.0, None\]: give a weight to every source or to none"),
    "tokenizer without mask": (lambda tmp, synth: {"data.tokenizer": no_mask_tokenizer(tmp / "tok", synth)},
                               r"no \[MASK\] token: the tokenizer \(config key 'data.tokenizer' = '.*tok'\) has no "
                               r"mask token"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_in_one_line_naming_the_place_and_writes_nothing(case, synth_dir, tmp_path, dist_env,
                                                                         capsys):
    make, message = CASES[case]
    out = tmp_path / "out"
    overrides = tiny_overrides(synth_dir, out)
    overrides += [f"{k}={v}" for k, v in make(tmp_path, synth_dir).items()]
    capsys.readouterr()
    assert cli(overrides) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mdm-scale: error: "), err
    assert re.search(message, err), err
    assert not out.exists()


def test_checkpoint_of_another_shape_and_output_dir_of_another_run(finished_run, synth_dir, tmp_path, dist_env,
                                                                   capsys):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    checkpoint = finished_run / "checkpoints" / "step_00000002"
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli(tiny_overrides(synth_dir, out, **{"model.overrides": {"hidden_size": 32},
                                                  "train.resume": str(checkpoint)})) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (f"checkpoint {checkpoint} is from another model shape: parameter 'lm_head.weight' is [" in err
            and "] in this run" in err), err
    assert not out.exists()

    assert cli(tiny_overrides(synth_dir, finished_run, **{"model.preset": "small"})) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"train.output_dir '{finished_run}' holds another run (model.preset: " in err, err
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before
